"""The ``causalpatch`` command line.

Examples::

    causalpatch patch --model smollm2 \\
        --clean "When Mary and John went to the store, John gave a drink to" \\
        --corrupted "When Mary and John went to the store, Mary gave a drink to" \\
        --correct " Mary" --incorrect " John" --component attn_head --out out/ioi
    causalpatch ioi --model smollm2 --n 16 --out out/demo
    causalpatch ioi --n 256 --executor ray --address HOST:PORT --workers 8
    causalpatch trace --model smollm2 --prompt "The Eiffel Tower is in the city of" \\
        --subject "Eiffel Tower" --out out/trace
    causalpatch trace --dataset known_facts --n 100 --out out/rome
    causalpatch report out/ioi/*.json out/trace/*.json --out report.html
    causalpatch models
    causalpatch info smollm2

Design (docs/cli.md):

* **Start-up**: this module and ``import causalpatch`` import neither torch nor transformers;
  every command imports what it needs inside its body, so ``--help`` and ``models`` are fast.
* **Errors before the weights load**: each command checks its arguments in two tiers. Tier 0
  needs no imports (empty prompts, integer lists, ``--out``, component-name typos, metrics,
  directions, dtypes). Tier 1 reads only the model's config and tokenizer
  (:func:`causalpatch.loading.load_config` / :func:`~causalpatch.loading.load_tokenizer`):
  layer and head ranges, answers that are not one token (or lack the leading space), prompts
  of unequal token length with ``--by-position``. The library checks everything again after
  the load; tier 1 only makes the common mistakes fail fast.
* **Outputs are never lost**: ``--out`` is probed for writability before the compute; if
  writing still fails afterwards, the result JSON goes to a temporary folder and the error
  says where.
* **Global flags** (``--quiet``, ``--json``, ``--verbose``, ``--debug``, ``--no-progress``) work
  before or after the subcommand.

User errors print one line and exit with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

#: Flags of the top-level callback that are also accepted after a subcommand.
GLOBAL_FLAGS = ("--quiet", "-q", "--verbose", "-v", "--debug", "--json", "--no-progress")
#: Work shorter than this shows no progress bar (seconds).
PROGRESS_DELAY = 2.0

#: Mirrors of the library's vocabularies, so that tier-0 checks need no torch import
#: (tests/test_cli_startup.py checks each against the library).
SWEEP_COMPONENTS = ("resid_pre", "resid_mid", "resid_post", "attn", "mlp", "attn_head",
                    "attn_head_q", "attn_head_k", "attn_head_v", "mlp_neuron")
COMPONENT_WORDS = (*SWEEP_COMPONENTS, "embed", "ln_final", "hook_resid_pre", "hook_resid_mid",
                   "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.z", "attn.q",
                   "attn.k", "attn.v", "mlp.post", "attn.hook_z", "attn.hook_q", "attn.hook_k",
                   "attn.hook_v", "mlp.hook_post", "attn.in", "mlp.in", "attn.raw", "mlp.raw",
                   "mlp.gate", "mlp.up", "mlp.pre", "attn.q_normed", "attn.k_normed")
RESID_KINDS = ("resid_pre", "resid_mid", "resid_post")
PER_HEAD_COMPONENTS = ("attn_head", "attn_head_q", "attn_head_k", "attn_head_v")
METRICS = ("logit_diff", "logit", "prob", "logprob", "ce_diff", "l2", "mse", "cosine", "kl")
DIRECTIONS = ("denoise", "noise")
DTYPES = ("float32", "float16", "bfloat16")
TRACE_COMPONENTS = ("resid_pre", "resid_post", "mlp", "attn")
FIGURE_FORMATS = ("png", "svg", "pdf")
PLOTLY_MODES = ("inline", "cdn")
MODEL_HELP = "Alias (smollm2, gemma3-270m), .gguf path, HF folder or hub name."


# -- global state and flags --------------------------------------------------------------------
class _State:
    debug = False
    quiet = False
    verbose = False
    json = False
    progress = True
    warnings: list[str] = []

    @classmethod
    def reset(cls) -> None:
        cls.debug = cls.quiet = cls.verbose = cls.json = False
        cls.progress = True
        cls.warnings = []


def _declares(command: Any, flag: str) -> bool:
    return any(flag in p.opts or flag in p.secondary_opts for p in command.params)


def _takes_value(command: Any, token: str) -> bool:
    for p in command.params:
        if token in (*p.opts, *p.secondary_opts):
            return not getattr(p, "is_flag", False) and not getattr(p, "count", False)
    return False


def hoist_global_flags(group: Any, ctx: Any, args: list[str]) -> list[str]:
    """Move :data:`GLOBAL_FLAGS` that follow a subcommand in front of it (where the callback
    reads them). A flag the subcommand declares itself (``--json``) stays; option values
    (``--clean -q``) and everything after ``--`` are left alone."""
    hoisted: list[str] = []
    kept: list[str] = []
    command = group
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            kept += args[i:]
            break
        if hasattr(command, "get_command") and not token.startswith("-"):  # a group
            sub = command.get_command(ctx, token)
            kept.append(token)
            i += 1
            if sub is None:  # let click report the unknown command
                kept += args[i:]
                break
            command = sub
            continue
        if token in GLOBAL_FLAGS and command is not group and not _declares(command, token):
            hoisted.append(token)
            i += 1
            continue
        kept.append(token)
        if token.startswith("-") and "=" not in token and _takes_value(command, token) \
                and i + 1 < len(args):
            kept.append(args[i + 1])
            i += 1
        i += 1
    return hoisted + kept


class _Group(TyperGroup):
    """Typer's group, with global flags accepted after the subcommand too."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_flags(self, ctx, list(args)))


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True,
                  rich_markup_mode="rich", pretty_exceptions_enable=False,
                  help="Fast, exact activation patching for Hugging Face language models.",
                  epilog="Global flags (--quiet, --json, --verbose, --debug, --no-progress) "
                         "also work after the command: causalpatch models --quiet")
console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)


@app.callback()
def main(ctx: typer.Context,
         debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
         quiet: bool = typer.Option(False, "--quiet", "-q",
                                    help="Print nothing on success (errors still print)."),
         verbose: bool = typer.Option(False, "--verbose", "-v",
                                      help="Show transformers' loading logs and bars, timings."),
         as_json: bool = typer.Option(False, "--json", help="Print only JSON on stdout."),
         no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
         ) -> None:
    """Fast, exact activation patching for Hugging Face language models."""
    _State.reset()
    _State.debug, _State.quiet, _State.verbose = debug, quiet, verbose and not quiet
    _State.json, _State.progress = as_json, not no_progress
    if quiet:
        _silence(ctx)


def _silence(ctx: Any) -> None:
    """``--quiet``: Python warnings and every logger (transformers' too) off for the command."""
    import logging
    import warnings

    catcher = warnings.catch_warnings()
    ctx.with_resource(catcher)
    warnings.simplefilter("ignore")
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    ctx.call_on_close(lambda: logging.disable(before))
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _chatty(as_json: bool = False) -> bool:
    """Whether to print tables, notes and progress (not with --quiet or --json)."""
    return not _State.quiet and not (as_json or _State.json)


def _warn(message: str) -> None:
    """A warning: printed (unless quiet/JSON) and listed in the JSON output."""
    _State.warnings.append(message)
    if _chatty():
        console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def _note(message: str) -> None:
    if _chatty():
        console.print(f"[cyan]note:[/] {escape(message)}", soft_wrap=True)


# -- errors ------------------------------------------------------------------------------------
def _error(message: str) -> Exception:
    from ..errors import InvalidArgumentError

    return InvalidArgumentError(message)


def _fail(exc: BaseException, code: int = 2) -> None:
    if _State.debug:
        traceback.print_exception(exc)
    console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(code=code)


class OutputsSavedElsewhere(Exception):
    """Writing to ``--out`` failed after the compute; the results were saved to ``fallback``."""


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn causalpatch's errors (and bad files) into one line and exit code 2."""
    from ..errors import CausalPatchError

    try:
        yield
    except typer.Exit:
        raise
    except OutputsSavedElsewhere as exc:
        _fail(exc, code=1)
    except (CausalPatchError, FileNotFoundError, PermissionError, NotADirectoryError,
            IsADirectoryError, ValueError, ImportError) as exc:
        _fail(exc)


# -- tier 0: checks that need no imports --------------------------------------------------------
def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise _error(f"{what} must be comma-separated integers like '0,5,-1', got {text!r}") \
            from None
    if not values:
        raise _error(f"{what} is empty; give comma-separated integers like '0,5,-1'")
    if len(set(values)) != len(values):
        raise _error(f"{what} has repeated entries: {text!r}")
    return values


def _check_prompt(text: str, what: str) -> None:
    if not text.strip():
        raise _error(f"{what} is empty: give a prompt with some text")


def _check_answer_text(text: str | None, what: str) -> None:
    if text is not None and text == "":
        raise _error(f"{what} is empty: give one token, e.g. {what} ' Mary' (with its leading "
                     "space)")


def _check_choice(value: str, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise _error(f"unknown {what} {value!r}.{hint} Expected one of {', '.join(choices)}")


def _check_component_word(component: str) -> None:
    """Reject a likely typo of a component word (``attn_heads``) at once.

    Anything else (raw module paths, full site names) is checked against the model's config
    in tier 1 or by the library after the load.
    """
    if not component.strip():
        raise _error("--component is empty; expected one of " + ", ".join(SWEEP_COMPONENTS))
    if component in COMPONENT_WORDS or component.startswith("blocks."):
        return
    close = difflib.get_close_matches(component, COMPONENT_WORDS, n=3, cutoff=0.75)
    if close:
        raise _error(
            f"unknown component {component!r}. Did you mean: {', '.join(close)}? Expected one "
            f"of {', '.join(SWEEP_COMPONENTS)}, a per-layer site kind (e.g. 'attn.in'), or a "
            "full site name such as 'blocks.5.mlp'")


def _is_resid(component: str) -> bool:
    leaf = component.split(".")[-1]
    return leaf.removeprefix("hook_") in RESID_KINDS


def _probe_dir(folder: Path) -> str | None:
    """Why no file can be created in the existing folder ``folder`` (None: it can)."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".causalpatch-probe-")
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(name)
    return None


def check_out_dir(out: Path, what: str = "--out") -> None:
    """Fail before any compute when ``out`` cannot become a folder we can write into."""
    if out.exists() and not out.is_dir():
        raise _error(f"{what} {str(out)!r} is a file, but it must be a folder (the command "
                     f"writes several files into it); pass a folder such as "
                     f"{str(out.with_suffix('')) + '_out'!r}")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise _error(f"{what} {str(out)!r} cannot be created: {str(existing)!r} is a file")
    why = _probe_dir(existing)
    if why is not None:
        raise _error(f"{what} {str(out)!r} is not writable: cannot create files in "
                     f"{str(existing)!r} ({why}); pass a folder you can write to")


def check_out_file(out: Path, what: str = "--out") -> None:
    """Fail before any work when the file ``out`` cannot be written."""
    if out.is_dir():
        raise _error(f"{what} {str(out)!r} is a folder, but it must be a file name such as "
                     f"{str(out / 'report.html')!r}")
    check_out_dir(out.parent, f"the folder of {what}")
    if out.exists() and not os.access(out, os.W_OK):
        raise _error(f"{what} {str(out)!r} exists and is not writable")


def _executor_args(executor: str | None, address: str | None, workers: int | None) -> None:
    if executor is None or executor == "local":
        if address is not None or workers is not None:
            raise _error("--address and --workers need --executor ray")
        return
    if executor != "ray":
        raise _error(f"unknown --executor {executor!r}; expected local or ray")
    if workers is not None and workers < 1:
        raise _error(f"--workers must be at least 1, got {workers}")


def _executor(executor: str | None, address: str | None, workers: int | None) -> Any:
    """``--executor/--address/--workers`` as the methods' ``executor=`` (None: local)."""
    _executor_args(executor, address, workers)
    if executor is None or executor == "local":
        return None
    from ..executors import RayExecutor, import_ray

    import_ray()
    return RayExecutor(address=address, num_workers=workers)


# -- tier 1: the model's config and tokenizer, no weights ---------------------------------------
@dataclass
class ModelInfo:
    """What the pre-load checks know about a model: its tokenizer, config and sizes."""

    name: str
    tokenizer: Any
    config: Any
    architecture: str
    dims: Any
    kinds: list[str]
    family_kinds: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, model: Any) -> ModelInfo:
        """From a loaded model (tests, and commands that already hold one)."""
        from ..names import site_kinds

        return cls(model.name, model.tokenizer, model.config, model.architecture, model.dims,
                   site_kinds(model.adapter, model.config), site_kinds(model.adapter))

    def prompt_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])  # as causalpatch.tokens.encode

    def answer_ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]


class FastTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` library (no transformers import),
    answering the calls the checks make exactly as the transformers tokenizer does."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": self._tok.encode(text, add_special_tokens=True).ids}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


@dataclass(frozen=True)
class ConfigDims:
    """The sizes the checks need, read from ``config.json`` (``n_layers``, ``n_heads``)."""

    n_layers: int
    n_heads: int


def _config_int(config: dict[str, Any], *keys: str) -> int | None:
    for where in (config, config.get("text_config") or {}):
        for key in keys:
            if isinstance(where.get(key), int):
                return int(where[key])
    return None


def _fast_inspect(model: str) -> ModelInfo | None:
    """Tier 1 without torch or transformers: a local folder (or the GGUF weight cache entry)
    with ``tokenizer.json`` and ``config.json``; None when there is none."""
    from ..loading import resolve_source, valid_cache_entry

    source = resolve_source(model)
    if source.gguf_file is not None:
        folder = valid_cache_entry(source)
    else:
        folder = Path(source.folder) if source.local else None
    if folder is None or not (folder / "tokenizer.json").is_file() \
            or not (folder / "config.json").is_file():
        return None
    config = json.loads((folder / "config.json").read_text("utf-8"))
    n_layers = _config_int(config, "num_hidden_layers", "n_layer", "num_layers")
    n_heads = _config_int(config, "num_attention_heads", "n_head")
    if not isinstance(config, dict) or n_layers is None or n_heads is None:
        return None
    return ModelInfo(source.display_name or str(model), FastTokenizer(folder / "tokenizer.json"),
                     config, str(config.get("model_type", "?")), ConfigDims(n_layers, n_heads),
                     [], [])


def _fail_fast_if_unknown(model: str) -> None:
    """A hub name that is neither cached nor fetchable fails now, without transformers."""
    from ..loading import fail_fast_if_hub_unreachable, resolve_source

    source = resolve_source(model)
    if source.local:
        return
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return
    if not isinstance(try_to_load_from_cache(source.folder, "config.json"), str):
        fail_fast_if_hub_unreachable(source.folder)


def _inspect(model: str, need_kinds: bool = False) -> ModelInfo | None:
    """The model's config and tokenizer (no weights), or None when they cannot be read this
    way (the full load then decides). Unknown models and unsupported architectures raise.

    Local folders and cached GGUFs are read with ``tokenizers`` and ``json`` only (well under a
    second); otherwise, or with ``need_kinds`` (the site kinds come from the adapters, which
    import torch), through :func:`causalpatch.loading.load_config` / ``load_tokenizer``.
    """
    from ..errors import CausalPatchError

    if not need_kinds:
        try:
            fast = _fast_inspect(model)
        except CausalPatchError:
            raise
        except Exception as exc:  # noqa: BLE001 - fall back to the transformers path
            fast = None
            if _State.verbose:
                console.print(f"fast pre-load checks skipped ({type(exc).__name__}: {exc})")
        if fast is not None:
            return fast
    _fail_fast_if_unknown(model)
    from ..loading import load_config, load_tokenizer

    quiet = not _State.verbose
    try:
        config = load_config(model, quiet=quiet)
        tokenizer = load_tokenizer(model, quiet=quiet)
    except CausalPatchError:
        raise
    except Exception as exc:  # noqa: BLE001 - a quirk of this path must not block a valid run
        if _State.verbose:
            console.print(f"pre-load checks skipped ({type(exc).__name__}: {exc})")
        return None
    from ..adapters import adapter_for
    from ..loading import resolve_source
    from ..names import site_kinds

    adapter = adapter_for(config)
    name = resolve_source(model).display_name or str(model)
    return ModelInfo(name, tokenizer, config, adapter.name, adapter.dims(config),
                     site_kinds(adapter, config), site_kinds(adapter))


def _check_layers(info: ModelInfo, layers: list[int] | None, what: str = "--layers") -> None:
    n = info.dims.n_layers
    for layer in layers or []:
        if not -n <= layer < n:
            raise _error(f"{what} contains {layer}, out of range: this model has {n} layers, so "
                         f"{what} must be in [{-n}, {n - 1}]")


def _check_component(info: ModelInfo, component: str, heads: list[int] | None) -> None:
    kind: str | None = component
    if component.startswith("blocks."):
        parts = component.split(".", 2)
        if len(parts) == 3 and parts[1].lstrip("-").isdigit():
            _check_layers(info, [int(parts[1])], f"--component {component!r}: layer")
            kind = parts[2]
        else:
            kind = None
    if info.family_kinds and kind is not None:  # the adapters' view (torch is loaded)
        from ..names import canonical_kind

        kind = canonical_kind(kind)
        if kind in info.family_kinds and kind not in info.kinds:
            raise _error(f"component {component!r} does not exist in this {info.architecture} "
                         f"model (config); it has {', '.join(info.kinds)}")
    if heads is not None and component in PER_HEAD_COMPONENTS:
        n = info.dims.n_heads
        for h in heads:
            if not 0 <= h < n:
                raise _error(f"--heads contains {h}, out of range: this model has {n} heads, "
                             f"so --heads must be in [0, {n - 1}]")
    elif heads is not None and component in (*RESID_KINDS, "attn", "mlp", "mlp_neuron"):
        raise _error(f"--heads given but component {component!r} has no heads; use "
                     "--component attn_head (or attn_head_q/k/v)")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def check_answer(info: ModelInfo, answer: str | None, prompts: Sequence[str], what: str) -> None:
    """One token; and, after a prompt ending in a word, mind the leading space."""
    if answer is None:
        return
    ids = info.answer_ids(answer)
    needs_space = (not answer[:1].isspace()
                   and any(p and not p[-1:].isspace() for p in prompts))
    spaced = info.answer_ids(" " + answer) if needs_space else []
    if len(ids) != 1:
        hint = "answers must be single tokens (mind the leading space)"
        if needs_space and len(spaced) == 1:
            hint = (f"{' ' + answer!r} (with a leading space) is one token, and after a word "
                    f"that is what the model predicts: {what} {_quote(' ' + answer)}")
        raise _error(f"{what} {answer!r} is {len(ids)} tokens for this tokenizer "
                     f"({info.pieces(ids)}), expected exactly one; {hint}")
    if needs_space and len(spaced) == 1 and spaced[0] != ids[0]:
        _warn(f"{what} {answer!r} has no leading space. After a word the model predicts "
              f"{' ' + answer!r} (token {spaced[0]}), a different token from {answer!r} (token "
              f"{ids[0]}). Did you mean {what} {_quote(' ' + answer)}?")


def _dtype(dtype: str | None) -> Any:
    if dtype is None:
        return None
    import torch

    return getattr(torch, dtype)


# -- loading -----------------------------------------------------------------------------------
def _load(model: str, dtype: str | None = None) -> Any:
    """The full model (weights). Everything checkable was checked before this."""
    from ..interpretable import InterpretableModel
    from ..loading import quiet_loading

    if dtype is not None and dtype not in DTYPES:
        raise _error(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    status = console.status(f"loading {model}…") if _chatty() else nullcontext()
    t0 = time.perf_counter()
    with status, quiet_loading(not _State.verbose):
        loaded = InterpretableModel(model, dtype=_dtype(dtype))
    if _State.verbose:
        console.print(f"loaded {model} in {time.perf_counter() - t0:.1f} s")
    return loaded


# -- progress ----------------------------------------------------------------------------------
class ProgressDisplay:
    """Rich progress bars (counts, elapsed, ETA) that appear only when the work takes longer
    than :data:`PROGRESS_DELAY`; ``task(label)`` returns a ``(done, total)`` callback."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._stopped = False

    def __enter__(self) -> ProgressDisplay:
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=console, transient=True)
            self._timer = threading.Timer(PROGRESS_DELAY, self._start)
            self._timer.daemon = True
            self._timer.start()
        return self

    def _start(self) -> None:
        with self._lock:
            if not self._stopped:
                self._progress.start()

    def __exit__(self, *exc: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self._stopped = True
            if self._progress is not None:
                self._progress.stop()

    def task(self, label: str, total: int | None = None) -> Callable[[int, int], None] | bool:
        if self._progress is None:
            return False
        task = self._progress.add_task(escape(label), total=total)

        def update(done: int, total: int) -> None:
            self._progress.update(task, completed=done, total=total)

        return update

    def done(self, label: str) -> None:
        """Hide a finished task."""
        if self._progress is not None:
            for task in self._progress.tasks:
                if task.description == escape(label):
                    self._progress.update(task.id, visible=False)


def _progress(as_json: bool) -> ProgressDisplay:
    return ProgressDisplay(_State.progress and _chatty(as_json))


# -- outputs -----------------------------------------------------------------------------------
def _top_table(result: Any, k: int = 10) -> Any:
    from rich.table import Table

    table = Table(title=f"top {k} components: {result.component} ({result.metric}, "
                        f"{result.direction})")
    axes = list(result.axes)
    for axis in axes:
        table.add_column(axis)
    table.add_column("effect", justify="right")
    for index, effect in result.top_components(k):
        idx = index if isinstance(index, tuple) else (index,)
        cells = []
        for axis, value in zip(axes, idx):
            if axis == "position":
                cells.append(str(result.labels["position"][result.extra["positions"].index(value)]
                                 if value in result.extra.get("positions", []) else value))
            else:
                cells.append(str(value))
        table.add_row(*map(escape, cells), f"{effect:+.3f}")
    return table


def _stem(result: Any) -> str:
    return result.component + ("_by_position" if "position" in result.axes else "")


def _write_outputs(results: list[Any], out: Path, title: str,
                   figure: Callable[[Any], Any] | None = None, fmt: str = "png",
                   plotly: str = "inline") -> dict[str, str]:
    """Write each result's JSON first, then its figure (``figure(result)``, default
    ``result.plot()``) as ``fmt``, then one HTML report of all of them, into ``out``."""
    from ..render.figure import save_figure
    from ..render.html import report

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    single = len(results) == 1
    stems = ["result"] if single else [_stem(r) for r in results]
    for r, stem in zip(results, stems):
        r.to_json(out / f"{stem}.json")
        files[stem] = str(out / f"{stem}.json")
    for r, stem in zip(results, stems):
        path = out / f"{'heatmap' if single else stem}.{fmt}"
        if figure is None:
            r.save(path, format=fmt)
        else:
            fig = figure(r)
            if hasattr(fig, "save"):
                fig.save(path, format=fmt)
            else:
                save_figure(fig, path, format=fmt)
        if single:
            files["heatmap"] = str(path)
    report(results, out / "report.html", title=title, plotly=plotly)
    files["report"] = str(out / "report.html")
    return files


def save_outputs(results: list[Any], out: Path, title: str,
                 figure: Callable[[Any], Any] | None = None, fmt: str = "png",
                 plotly: str = "inline") -> dict[str, str]:
    """:func:`_write_outputs`; when that fails, save the JSON to a temporary folder and raise
    :class:`OutputsSavedElsewhere` naming it (the computed results are never lost)."""
    try:
        return _write_outputs(results, out, title, figure, fmt, plotly)
    except Exception as exc:  # noqa: BLE001 - whatever failed, keep the computed results
        if _State.debug:
            traceback.print_exception(exc)
        fallback = Path(tempfile.mkdtemp(prefix="causalpatch-results-"))
        single = len(results) == 1
        saved = []
        for r in results:
            path = fallback / f"{'result' if single else _stem(r)}.json"
            r.to_json(path)
            saved.append(str(path))
        raise OutputsSavedElsewhere(
            f"could not write the outputs to {str(out)!r} ({type(exc).__name__}: {exc}). The "
            f"computed results were saved to {fallback}: {', '.join(saved)}. Build the report "
            f"with: causalpatch report {fallback}/*.json --out report.html") from exc


def _emit_json(payload: dict[str, Any]) -> None:
    if _State.warnings:
        payload = {**payload, "warnings": list(_State.warnings)}
    typer.echo(json.dumps(payload, indent=2))


def _finish(results: list[Any], files: dict[str, str], as_json: bool) -> None:
    if as_json or _State.json:
        _emit_json({"files": files, "results": [
            {"component": r.component, "metric": r.metric, "direction": r.direction,
             "shape": list(r.effect_matrix.shape), "clean_metric": r.clean_metric,
             "corrupted_metric": r.corrupted_metric, "timings": r.timings,
             "top": [[list(i) if isinstance(i, tuple) else i, e] for i, e in r.top_components(10)]}
            for r in results]})
        return
    if not _State.quiet:
        for r in results:
            out_console.print(_top_table(r))
        for name, path in files.items():
            out_console.print(f"[green]wrote[/] {escape(name)}: {escape(path)}")


def _executor_summary(results: list[Any]) -> None:
    """Per-worker throughput of the distributed sweeps (after the results)."""
    from ..executors import format_summary

    for r in results:
        summary = r.extra.get("executor") if isinstance(r.extra, dict) else None
        if summary:
            console.print(f"{r.component}: " + format_summary(summary))


def _format_option() -> Any:
    return typer.Option("png", "--format", help="Figure format: png, svg or pdf.")
_EXECUTOR_HELP = "local (default) or ray: distribute pairs over Ray workers."
_ADDRESS_HELP = "Ray cluster HOST:PORT (default $RAY_ADDRESS, else local Ray)."
_COMPONENT_HELP = (
    "What to patch: resid_pre, resid_mid, resid_post, attn, mlp (one cell per layer), "
    "attn_head, attn_head_q, attn_head_k, attn_head_v (per layer and head), mlp_neuron (per "
    "layer and neuron); a per-layer site kind such as attn.in, mlp.post, mlp.gate; or one site "
    "such as blocks.5.mlp. See causalpatch info MODEL.")


# -- commands ----------------------------------------------------------------------------------
@app.command(epilog="Global flags work here too: causalpatch patch ... --quiet")
def patch(
    clean: str = typer.Option(..., help="Clean prompt."),
    corrupted: str = typer.Option(..., help="Corrupted prompt (same number of tokens for "
                                  "--by-position)."),
    model: str = typer.Option("smollm2", help=MODEL_HELP),
    correct: Optional[str] = typer.Option(None, help="Correct answer token, e.g. ' Mary' "
                                          "(mind the leading space)."),
    incorrect: Optional[str] = typer.Option(None, help="Incorrect answer token, e.g. ' John'."),
    component: str = typer.Option("resid_post", help=_COMPONENT_HELP),
    metric: str = typer.Option("logit_diff", help="logit_diff, logit, prob, logprob, ce_diff, "
                               "l2, mse, cosine or kl."),
    by_position: Optional[bool] = typer.Option(
        None, "--by-position/--no-by-position",
        help="One patch per token position. Default: on for resid_* (patching a whole "
             "residual stream restores everything, +1.000 at every layer), off otherwise."),
    direction: str = typer.Option("denoise", help="denoise (clean into corrupted) or noise."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layers, e.g. 0,5,-1 "
                                         "(default all)."),
    heads: Optional[str] = typer.Option(None, help="Comma-separated heads (default all)."),
    positions: Optional[str] = typer.Option(None, help="Comma-separated positions."),
    dtype: Optional[str] = typer.Option(None, help="float32, float16 or bfloat16."),
    out: Path = typer.Option(Path("out/patch"), help="Output folder."),
    fmt: str = _format_option(),
    as_json: bool = typer.Option(False, "--json", help="Print only machine-readable JSON."),
    executor: Optional[str] = typer.Option(None, "--executor", help=_EXECUTOR_HELP),
    address: Optional[str] = typer.Option(None, "--address", help=_ADDRESS_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray workers (model copies)."),
) -> None:
    """Patch one clean/corrupted pair; write result.json, a heatmap and report.html.

    Example (IOI: which attention heads move the name?):

      CLEAN="When Mary and John went to the store, John gave a drink to"
      CORRUPTED="When Mary and John went to the store, Mary gave a drink to"
      causalpatch patch --clean "$CLEAN" --corrupted "$CORRUPTED" \\
        --correct " Mary" --incorrect " John" --component attn_head --out out/ioi

    Example (the residual stream; by position is the default for resid_*):

      causalpatch patch --clean "$CLEAN" --corrupted "$CORRUPTED" \\
        --correct " Mary" --incorrect " John" --layers 0,10,20,29 --format svg

    Answers are single tokens; after a word they start with a space (" Mary").
    Arguments are checked against the model's config and tokenizer before the
    weights load.
    """
    with _user_errors():
        _State.json = as_json = as_json or _State.json
        # tier 0: no imports
        _check_prompt(clean, "--clean")
        _check_prompt(corrupted, "--corrupted")
        _check_answer_text(correct, "--correct")
        _check_answer_text(incorrect, "--incorrect")
        if correct is not None and correct == incorrect:
            raise _error(f"--correct and --incorrect are the same ({correct!r}); the logit "
                         "difference would be 0")
        _check_component_word(component)
        _check_choice(metric, METRICS, "--metric")
        _check_choice(direction, DIRECTIONS, "--direction")
        if dtype is not None:
            _check_choice(dtype, DTYPES, "--dtype")
        layer_list = _ints(layers, "--layers")
        head_list = _ints(heads, "--heads")
        position_list = _ints(positions, "--positions")
        _executor_args(executor, address, workers)
        _check_choice(fmt, FIGURE_FORMATS, "--format")
        check_out_dir(out)
        auto_by_position = by_position is None
        if by_position is None:
            by_position = _is_resid(component)
        # tier 1: config and tokenizer, no weights
        info = _inspect(model)
        if info is not None:
            _check_layers(info, layer_list)
            _check_component(info, component, head_list)
            lengths = (len(info.prompt_ids(clean)), len(info.prompt_ids(corrupted)))
            if by_position and lengths[0] != lengths[1]:
                raise _error(
                    f"--by-position needs prompts of equal token length: --clean is "
                    f"{lengths[0]} tokens, --corrupted {lengths[1]}. Make them the same "
                    "length (swap names of equal token count)"
                    + ("" if not _is_resid(component) else
                       ", or pass --no-by-position (trivial for resid_*)"))
            for p in position_list or []:
                if not -min(lengths) <= p < min(lengths):
                    raise _error(f"--positions contains {p}, out of range for a prompt of "
                                 f"{min(lengths)} tokens")
            check_answer(info, correct, [clean, corrupted], "--correct")
            check_answer(info, incorrect, [clean, corrupted], "--incorrect")
        if auto_by_position and by_position:
            _note(f"{component} is patched by position (patching the whole residual stream "
                  "restores the clean run: +1.000 at every layer); --no-by-position forces it")
        elif not by_position and _is_resid(component) and position_list is None:
            _warn(f"--no-by-position with {component}: patching the whole residual stream "
                  "restores the clean run, so every layer shows +1.000; use --by-position")
        ex = _executor(executor, address, workers)
        m = _load(model, dtype)
        from ..methods.activation_patching import activation_patching

        label = f"patching {component}" + (" by position" if by_position else "")
        with _progress(as_json) as bars:
            result = activation_patching(
                m, clean, corrupted, component=component, metric=metric, correct=correct,
                incorrect=incorrect, by_position=by_position, direction=direction,
                layers=layer_list, heads=head_list, positions=position_list,
                progress=bars.task(label), executor=ex)
        if ex is not None:
            ex.shutdown()
        files = save_outputs([result], out, f"causalpatch: {component}", fmt=fmt)
    if _chatty(as_json):
        _executor_summary([result])
    _finish([result], files, as_json)


@app.command(epilog="Global flags work here too: causalpatch ioi ... --quiet")
def ioi(
    model: str = typer.Option("smollm2", help=MODEL_HELP),
    n: int = typer.Option(16, help="Number of IOI prompt pairs."),
    seed: int = typer.Option(0, help="Dataset seed."),
    out: Path = typer.Option(Path("out/ioi"), help="Output folder."),
    fmt: str = _format_option(),
    dtype: Optional[str] = typer.Option(None, help="float32, float16 or bfloat16."),
    as_json: bool = typer.Option(False, "--json", help="Print only machine-readable JSON."),
    executor: Optional[str] = typer.Option(None, "--executor", help=_EXECUTOR_HELP),
    address: Optional[str] = typer.Option(None, "--address", help=_ADDRESS_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray workers (model copies)."),
) -> None:
    """Indirect-object identification: resid_post, attn and mlp by position, then heads.

    Example:

      causalpatch ioi --model smollm2 --n 16 --out out/demo

      causalpatch ioi --n 256 --executor ray --address HOST:PORT --workers 8
    """
    with _user_errors():
        _State.json = as_json = as_json or _State.json
        if n < 1:
            raise _error(f"--n must be at least 1, got {n}")
        if dtype is not None:
            _check_choice(dtype, DTYPES, "--dtype")
        _executor_args(executor, address, workers)
        _check_choice(fmt, FIGURE_FORMATS, "--format")
        check_out_dir(out)
        _inspect(model)  # unknown models and architectures fail before the weights load
        ex = _executor(executor, address, workers)
        m = _load(model, dtype)
        from ..datasets import IOIDataset
        from ..methods.activation_patching import activation_patching

        dataset = IOIDataset(m, n=n, seed=seed)
        aligned = IOIDataset(m, n=n, seed=seed, equal_length=True)  # one length: by position
        results = []
        plan = [("resid_post", True), ("attn", True), ("mlp", True), ("attn_head", False)]
        with _progress(as_json) as bars:
            for step, (component, by_position) in enumerate(plan, 1):
                label = (f"step {step}/{len(plan)}: {component}"
                         + (" by position" if by_position else " per head"))
                t0 = time.perf_counter()
                data = aligned if by_position else dataset
                results.append(activation_patching(m, data, component=component,
                                                   by_position=by_position,
                                                   progress=bars.task(label), executor=ex))
                bars.done(label)
                if _chatty(as_json):
                    cells = results[-1].effect_matrix.numel()
                    console.print(f"[green]✓[/] {escape(label)}: {cells} cells x {len(data)} "
                                  f"pairs in {time.perf_counter() - t0:.1f} s")
        if ex is not None:
            ex.shutdown()
        files = save_outputs(results, out, f"IOI on {m.name} ({len(dataset)} pairs)", fmt=fmt)
    if _chatty(as_json):
        _executor_summary(results)
    _finish(results, files, as_json)


@app.command(epilog="Global flags work here too: causalpatch trace ... --quiet")
def trace(
    prompt: Optional[str] = typer.Option(None, help="A factual prompt (one fact)."),
    subject: Optional[str] = typer.Option(None, help="The subject inside --prompt, to corrupt."),
    answer: Optional[str] = typer.Option(
        None, help="Answer token, e.g. ' Paris' (default: the model's top-1 next token)."),
    dataset: Optional[str] = typer.Option(
        None, help="known_facts: average over ROME's known facts the model gets right."),
    n: int = typer.Option(100, help="Number of facts with --dataset."),
    model: str = typer.Option("smollm2", help=MODEL_HELP),
    components: str = typer.Option("resid_post,mlp,attn",
                                   help="Comma-separated: resid_post, mlp, attn, resid_pre."),
    samples: int = typer.Option(10, help="Noise samples per prompt."),
    noise: float = typer.Option(3.0, help="Noise scale, a multiple of the embedding std."),
    window: int = typer.Option(1, help="Layers restored together for mlp/attn (ROME: 10)."),
    seed: int = typer.Option(0, help="Noise seed (and the facts' shuffle with --dataset)."),
    dtype: Optional[str] = typer.Option(None, help="float32, float16 or bfloat16."),
    out: Path = typer.Option(Path("out/trace"), help="Output folder."),
    fmt: str = _format_option(),
    as_json: bool = typer.Option(False, "--json", help="Print only machine-readable JSON."),
    executor: Optional[str] = typer.Option(None, "--executor", help=_EXECUTOR_HELP),
    address: Optional[str] = typer.Option(None, "--address", help=_ADDRESS_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray workers (model copies)."),
) -> None:
    """ROME causal tracing: noise the subject, restore one state per layer and position.

    --prompt traces one fact at every position; --dataset known_facts averages ROME's facts.
    Writes each component's JSON and ROME-style figure, and report.html.

    Example:

      causalpatch trace --model smollm2 --subject "Eiffel Tower" \\
        --prompt "The Eiffel Tower is in the city of" --out out/trace

      causalpatch trace --dataset known_facts --n 100 --window 10 --out out/rome
    """
    with _user_errors():
        _State.json = as_json = as_json or _State.json
        if (prompt is None) == (dataset is None):
            raise _error(
                "give either --prompt (with --subject) for one fact or --dataset known_facts")
        if dataset is not None and dataset != "known_facts":
            raise _error(f"unknown --dataset {dataset!r}; expected known_facts")
        if prompt is not None:
            _check_prompt(prompt, "--prompt")
            if subject is None:
                raise _error("--subject is required with --prompt")
            if not subject.strip():
                raise _error("--subject is empty: give the subject's words as they appear in "
                             "--prompt")
            if subject not in prompt:
                raise _error(f"--subject {subject!r} not found in --prompt {prompt!r} (it must "
                             "appear exactly, case included)")
            _check_answer_text(answer, "--answer")
        if dataset is not None and (subject is not None or answer is not None):
            raise _error("--subject and --answer are for --prompt; each known fact has its own")
        if n < 1:
            raise _error(f"--n must be at least 1, got {n}")
        if samples < 1 or window < 1:
            raise _error(f"--samples and --window must be at least 1, got {samples} and "
                         f"{window}")
        if not noise > 0:
            raise _error(f"--noise must be positive (a multiple of the embeddings' standard "
                         f"deviation; ROME uses 3.0), got {noise}")
        kinds = tuple(c for c in components.replace(" ", "").split(",") if c)
        if not kinds:
            raise _error("--components is empty; expected some of " + ", ".join(TRACE_COMPONENTS))
        for kind in kinds:
            _check_choice(kind, TRACE_COMPONENTS, "component in --components")
        if dtype is not None:
            _check_choice(dtype, DTYPES, "--dtype")
        _executor_args(executor, address, workers)
        _check_choice(fmt, FIGURE_FORMATS, "--format")
        check_out_dir(out)
        info = _inspect(model)
        if info is not None and prompt is not None:
            check_answer(info, answer, [prompt], "--answer")
        ex = _executor(executor, address, workers)
        m = _load(model, dtype)
        from ..methods.causal_tracing import causal_tracing, causal_tracing_dataset
        from ..render.plots import plot_trace

        settings = dict(noise=noise, samples=samples, seed=seed, components=kinds,
                        window=window, executor=ex)
        with _progress(as_json) as bars:
            if prompt is not None:
                traced = causal_tracing(m, prompt, subject, answer=answer,
                                        position_groups=False,
                                        progress=bars.task("causal tracing (prompts)"),
                                        **settings)
                title = f"Causal tracing: {prompt}"
            else:
                from ..datasets import known_facts

                facts = known_facts(m, n, seed=seed)
                if not facts:
                    raise _error(f"none of ROME's known facts is answered correctly by {m.name}")
                traced = causal_tracing_dataset(m, facts,
                                                progress=bars.task("causal tracing (facts)"),
                                                **settings)
                title = f"Causal tracing: {len(facts)} known facts on {m.name}"
        if ex is not None:
            ex.shutdown()
        results = list(traced.values())
        files = save_outputs(results, out, title, figure=plot_trace, fmt=fmt)
    if _chatty(as_json):
        out_console.print(traced.summary(), highlight=False)
    _finish(results, files, as_json)


def _result_files(paths: Sequence[Path]) -> list[Path]:
    """Files as given; a folder stands for the result JSON files inside it."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob("*.json"))
            if not found:
                raise _error(f"folder {str(path)!r} holds no .json result files")
            files += found
        elif not path.exists():
            raise _error(f"result file {str(path)!r} does not exist")
        else:
            files.append(path)
    return files


@app.command("report", epilog="Global flags work here too: causalpatch report ... --quiet")
def report_command(
    results: list[Path] = typer.Argument(..., help="Result JSON files (or folders of them), "
                                         "written by patch/ioi/trace or result.save('x.json')."),
    out: Path = typer.Option(Path("report.html"), "--out", help="The HTML file to write."),
    title: Optional[str] = typer.Option(None, help="Page title."),
    plotly: str = typer.Option("inline", help="inline: plotly.js in the file, opens offline (~4.8 MB); "
                                    "cdn: small file, needs network to draw."),
    shared_scale: bool = typer.Option(False, "--shared-scale",
                                      help="Start with one colour scale per kind of result."),
    as_json: bool = typer.Option(False, "--json", help="Print only machine-readable JSON."),
) -> None:
    """Build one HTML report from saved result JSON files.

    Example:

      causalpatch report out/ioi/*.json out/trace/*.json --out report.html

      causalpatch report out/ioi --out ioi.html --plotly cdn
    """
    with _user_errors():
        _check_choice(plotly, PLOTLY_MODES, "--plotly")
        files = _result_files(results)
        check_out_file(out)
        from ..result import write_report

        out.parent.mkdir(parents=True, exist_ok=True)
        write_report(files, out, title=title, plotly=plotly, shared_scale=shared_scale)
    if as_json or _State.json:
        _emit_json({"report": str(out), "results": [str(f) for f in files]})
    elif not _State.quiet:
        out_console.print(f"[green]wrote[/] report: {escape(str(out))} ({len(files)} results)")


@app.command(epilog="Global flags work here too: causalpatch models --quiet")
def models(as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON.")) -> None:
    """List model aliases, whether their packages are installed, and supported architectures.

    Example:

      causalpatch models
    """
    from ..adapters import ADAPTERS  # torch-free once adapters/base.py imports torch lazily
    from ..loading import ALIASES, GEMMA3_PACKAGE, SMOLLM2_PACKAGE, package_dir

    smollm2 = package_dir(SMOLLM2_PACKAGE) is not None
    installed = {"smollm2": smollm2, "smollm2-135m": smollm2,
                 "gemma3-270m": package_dir(GEMMA3_PACKAGE) is not None}
    data = {"aliases": [{"alias": a, "description": d, "installed": installed.get(a, False)}
                        for a, d in ALIASES.items()],
            "adapters": [{"name": a.name, "model_types": list(a.model_types)} for a in ADAPTERS]}
    if as_json or _State.json:
        _emit_json(data)
        return
    if _State.quiet:
        return
    from rich.table import Table

    table = Table(title="model aliases")
    for col in ("alias", "description", "installed"):
        table.add_column(col)
    for row in data["aliases"]:
        table.add_row(row["alias"], row["description"], "yes" if row["installed"] else "no")
    out_console.print(table)
    adapters = Table(title="architecture adapters")
    adapters.add_column("adapter")
    adapters.add_column("config.model_type")
    for row in data["adapters"]:
        adapters.add_row(row["name"], ", ".join(row["model_types"]))
    out_console.print(adapters)


@app.command(epilog="Global flags work here too: causalpatch info smollm2 --json")
def info(model: str = typer.Argument(..., help=MODEL_HELP),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON.")) -> None:
    """Show a model's sizes and its component names (reads the config, not the weights).

    Example:

      causalpatch info smollm2
    """
    with _user_errors():
        status = console.status(f"reading {model}…") if _chatty(as_json) else nullcontext()
        with status:
            got = _inspect(model, need_kinds=True)
        if got is None:  # config/tokenizer not readable on their own: load the model
            got = ModelInfo.of(_load(model))
    d = got.dims
    data = {"name": got.name, "architecture": got.architecture, "n_layers": d.n_layers,
            "n_heads": d.n_heads, "n_kv_heads": d.n_kv_heads, "d_model": d.d_model,
            "d_head": d.d_head, "d_mlp": d.d_mlp, "vocab_size": d.vocab_size,
            "components": [f"blocks.L.{k}" for k in got.kinds]}
    if as_json or _State.json:
        _emit_json(data)
        return
    if _State.quiet:
        return
    from rich.table import Table

    table = Table(title=f"{got.name}")
    table.add_column("property")
    table.add_column("value")
    for key, value in data.items():
        table.add_row(key, "\n".join(value) if isinstance(value, list) else str(value))
    out_console.print(table)


sae_app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich",
                      help="Sparse autoencoders (SAELens format): train one, inspect one.")
app.add_typer(sae_app, name="sae")


@sae_app.command("train")
def sae_train(
    model: str = typer.Option("smollm2", help=MODEL_HELP),
    site: str = typer.Option("blocks.20.resid_post", help="Site to read (canonical or "
                             "TransformerLens name, e.g. blocks.20.hook_resid_post)."),
    features: int = typer.Option(2048, help="Number of SAE features (d_sae)."),
    architecture: str = typer.Option("topk", help="topk (default) or standard (ReLU + L1)."),
    k: int = typer.Option(32, help="Active features per token (topk)."),
    l1: float = typer.Option(3.0, help="L1 coefficient (standard)."),
    tokens: int = typer.Option(100_000, help="Training tokens (activations collected once)."),
    eval_tokens: int = typer.Option(4096, help="Held-out tokens for the report."),
    epochs: int = typer.Option(8, help="Passes over the training activations."),
    lr: float = typer.Option(4e-4, help="Adam learning rate."),
    seed: int = typer.Option(0, help="Seed (data order and initialisation)."),
    storage_dtype: str = typer.Option("float16", help="Stored weights: float16 | float32."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: torch's)."),
    out: Path = typer.Option(Path("out/sae"), help="Output folder (SAELens format)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Train an SAE on a model's activations of offline text and save it in the SAELens format.

    The text ships with Python and causalpatch (Python's language reference, the standard
    library's docstrings, ROME's known facts; see causalpatch.sae.training_texts). Reports
    explained variance, L0, dead features and the model's loss with the SAE spliced in.

    Example:

      causalpatch sae train --model smollm2 --site blocks.20.resid_post \\
        --features 2048 --k 32 --tokens 100000 --out out/sae
    """
    with _user_errors():
        _State.json = as_json = as_json or _State.json
        if storage_dtype not in ("float16", "float32"):
            raise _error(f"--storage-dtype must be float16 or float32, got {storage_dtype!r}")
        if features < 1 or tokens < 1 or epochs < 1:
            raise _error("--features, --tokens and --epochs must be positive")
        check_out_dir(out)
        import torch

        from ..sae import save_sae, train_sae

        if threads is not None:
            torch.set_num_threads(threads)
        m = _load(model)
        log = (lambda msg: None) if not _chatty(as_json) else (
            lambda msg: console.print(escape(msg)))
        sae, report = train_sae(m, site, features, architecture=architecture, k=k,
                                l1_coefficient=l1, train_tokens=tokens,
                                eval_tokens=eval_tokens, epochs=epochs, lr=lr, seed=seed,
                                log=log)
        folder = save_sae(sae, out, storage_dtype=getattr(torch, storage_dtype))
    if as_json:
        _emit_json({"folder": str(folder), **report.to_dict()})
    elif not _State.quiet:
        out_console.print(report.summary(), highlight=False)
        out_console.print(f"[green]wrote[/] {escape(str(folder))}")


@sae_app.command("info")
def sae_info(path: Path = typer.Argument(..., help="An SAE folder (cfg.json + "
                                          "sae_weights.safetensors)."),
             as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON.")
             ) -> None:
    """Show an SAE's configuration (and its training report when it has one).

    Example:

      causalpatch sae info out/sae
    """
    from ..sae import load_sae

    with _user_errors():
        sae = load_sae(path)
    data = {"architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae,
            "k": sae.k, "site": sae.site, "hook_name": sae.hook_name,
            "model_name": sae.model_name,
            "training_report": sae.metadata.get("training_report")}
    if as_json or _State.json:
        _emit_json(data)
        return
    if _State.quiet:
        return
    from rich.table import Table

    table = Table(title=str(path))
    table.add_column("property")
    table.add_column("value")
    for key, value in data.items():
        if key == "training_report" and isinstance(value, dict):
            for name in ("explained_variance", "l0", "dead_fraction", "ce_clean",
                         "ce_spliced", "ce_recovered"):
                if name in value:
                    table.add_row(name, f"{value[name]:.4g}")
        else:
            table.add_row(key, escape(str(value)))
    out_console.print(table)


def run() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
