"""What a command runs on once its arguments passed the checks: the model's weights and the
executor (local, or Ray workers).

:func:`load_model` is the only place the CLI loads weights; everything checkable was checked
before it runs. Commands call it through this module (``runtime.load_model(...)``), so tests
can substitute a small model.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from typing import Any

from .checks import DTYPES, check_executor_args
from .failures import error
from .state import State, chatty, console


def torch_dtype(dtype: str | None) -> Any:
    """``"bfloat16"`` as ``torch.bfloat16`` (imports torch); None stays None."""
    if dtype is None:
        return None
    import torch

    return getattr(torch, dtype)


#: Environment variables that set the CPU threads of torch (read when torch is imported).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def use_threads(ctx: Any, threads: int) -> None:
    """``--threads N`` for the whole command: the thread variables are set before torch is
    imported (every command imports it in its body), and an already imported torch is set
    directly; both are restored when the command ends (``ctx.call_on_close``)."""
    State.threads = threads
    before = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)

    def restore() -> None:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    ctx.call_on_close(restore)
    torch = sys.modules.get("torch")
    if torch is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        ctx.call_on_close(lambda: torch.set_num_threads(previous))


def apply_threads() -> None:
    """Set torch's threads to ``--threads`` (if given) now that torch is imported."""
    if State.threads is not None:
        import torch

        torch.set_num_threads(State.threads)


def load_model(model: str, dtype: str | None = None) -> Any:
    """The full model (weights), behind a "loading ..." spinner unless quiet or JSON."""
    from ..interpretable import InterpretableModel
    from ..loading import quiet_loading

    if dtype is not None and dtype not in DTYPES:
        raise error(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    apply_threads()
    status = console.status(f"loading {model}…") if chatty() else nullcontext()
    t0 = time.perf_counter()
    with status, quiet_loading(not State.verbose):
        loaded = InterpretableModel(model, dtype=torch_dtype(dtype))
    if State.verbose:
        console.print(f"loaded {model} in {time.perf_counter() - t0:.1f} s")
    return loaded


def make_executor(executor: str | None, address: str | None, workers: int | None) -> Any:
    """``--executor/--address/--workers`` as the methods' ``executor=`` (None: local)."""
    check_executor_args(executor, address, workers)
    if executor is None or executor == "local":
        return None
    from ..executors import RayExecutor, import_ray

    import_ray()
    return RayExecutor(address=address, num_workers=workers)

