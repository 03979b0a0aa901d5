"""Where a sweep's pairs are evaluated: in this process (default) or on a Ray cluster.

Every dataset-level method takes ``executor=``:

* ``None`` (default): the local loop of :func:`causalpatch.assemble.run_pairs`.
* ``"ray"``: Ray, connected to ``$RAY_ADDRESS`` or, when it is unset, a local Ray instance
  started on first use; one worker per CPU.
* :class:`RayExecutor` ``(address=..., num_workers=..., num_cpus_per_worker=...,
  num_gpus_per_worker=...)``.

How a distributed sweep runs (Ray does the scheduling, retries and data transfer; nothing
here is a scheduler of its own):

1. The method validates every argument and builds its plan on the driver, exactly as for a
   local run. :func:`resolve_executor` refuses a bad ``executor=`` before any compute.
2. :func:`causalpatch.assemble.run_pairs` hands the executor the method's *evaluator
   factory* (a function ``(model, stats) -> evaluator`` that captures the plan but never the
   model) and the list of ``(pair group, cells)`` tasks still to do (a checkpoint's finished
   cells are left out).
3. :meth:`RayExecutor.run` splits the tasks into shards (whole pair groups where it can, so
   each engine pass sees the same rows as locally and results are bit-identical; a group
   split by cells equals the local run up to float rounding), starts
   Ray actors that each load the model **once** from its :class:`~causalpatch.loading.LoadSpec`
   (alias, path or hub name, dtype and placement) and check its weight fingerprint, and feeds
   them shards through :class:`ray.util.ActorPool`.
4. Each actor returns the **raw** metric values of its shard (base, source, every cell);
   the driver stores them with the same code as the local loop (and checkpoints them per
   shard), then :func:`~causalpatch.assemble.build_result` aggregates them with the one rule.

Fault tolerance is Ray's: actors are created with ``max_restarts`` and ``max_task_retries``,
so a worker process that dies (SIGKILL, OOM, a lost node) is restarted (it reloads the model)
and its shard is re-run. An exception raised *by the sweep* in a worker is not retried (a
retry cannot fix it): it is raised on the driver as :class:`WorkerError` with the worker's
message, after every shard that finished has been stored.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import model_fingerprint
from .errors import CausalPatchError, InvalidArgumentError, InvalidTypeError, MissingDependencyError

if TYPE_CHECKING:
    from .loading import LoadSpec
    from .model import HookedModel

#: The extra that installs Ray (pinned in constraints.txt).
EXTRA = "causalpatch[distributed]"
EXECUTORS = ("ray",)

#: ``(pair indices, cell indices)``: one unit of work of :func:`causalpatch.assemble.run_pairs`.
Task = tuple[list[int], list[int]]


class ClusterConnectionError(CausalPatchError, ConnectionError):
    """The Ray cluster at the given address cannot be reached."""


class WorkerError(CausalPatchError, RuntimeError):
    """A worker failed in a way that a retry cannot fix; the message is the worker's."""


def import_ray() -> Any:
    """``ray``, or a :class:`MissingDependencyError` naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(
            f"executor='ray' needs Ray, an optional extra: pip install '{EXTRA}' (installs the "
            "pinned ray version; use -c constraints.txt to match the tested one)") from None
    return ray


# -- argument checking (driver, before any compute) ------------------------------------------
def resolve_executor(executor: Any, model: HookedModel) -> RayExecutor | None:
    """Validate ``executor=`` for ``model``; ``None`` means the local loop.

    Raises:
        InvalidArgumentError: an unknown executor name, or a model that was passed in loaded
            (workers load their own copy from a name or path; an object cannot be shipped).
        InvalidTypeError: ``executor`` is neither ``None``, a string nor a :class:`RayExecutor`.
        MissingDependencyError: Ray is not installed.
    """
    if executor is None:
        return None
    if isinstance(executor, str):
        if executor.lower() not in EXECUTORS:
            raise InvalidArgumentError(
                f"unknown executor {executor!r}; expected None (local), 'ray' or "
                "RayExecutor(address=..., num_workers=...)")
        chosen = default_ray_executor()
    elif isinstance(executor, RayExecutor):
        chosen = executor
    else:
        raise InvalidTypeError(
            f"executor must be None, 'ray' or a RayExecutor, got {type(executor).__name__}")
    import_ray()
    if getattr(model, "load_spec", None) is None:
        raise InvalidArgumentError(
            "executor='ray' needs a model loaded from a specification (an alias such as "
            "'smollm2', a local path or a hub name): Ray workers each load their own copy, and "
            "a model object loaded in this process cannot be shipped to them. Save it with "
            "save_pretrained(folder) and use InterpretableModel(folder)")
    return chosen


_DEFAULT: list[RayExecutor] = []
_LIVE: weakref.WeakSet[RayExecutor] = weakref.WeakSet()  # executors holding workers
_DEFAULT_LOCK = threading.Lock()


def default_ray_executor() -> RayExecutor:
    """The shared executor behind ``executor="ray"`` (its workers are reused across sweeps)."""
    with _DEFAULT_LOCK:
        if not _DEFAULT:
            _DEFAULT.append(RayExecutor())
        return _DEFAULT[0]


def _positive(value: Any, name: str, allow_none: bool, integer: bool, minimum: float) -> None:
    if value is None and allow_none:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise InvalidTypeError(
            f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if value < minimum:
        raise InvalidArgumentError(f"{name} must be at least {minimum:g}, got {value!r}")


# -- sharding ------------------------------------------------------------------------------------
def plan_shards(tasks: Sequence[Task], n_shards: int, n_workers: int = 1) -> list[list[Task]]:
    """Split tasks into about ``n_shards`` shards of similar work (pairs x cells).

    Shards hold whole tasks, in order, so every engine pass sees the same rows as in the
    local loop (bit-identical results). Only when there are fewer tasks than workers (e.g. an
    ablation's single group of every prompt) are a task's cells split, and then results equal
    the local run up to float rounding.
    """
    work = [len(g) * max(len(c), 1) for g, c in tasks]
    total = sum(work)
    if total == 0:
        return []
    target = max(1, math.ceil(total / max(1, n_shards)))
    pieces: list[Task] = []
    for (group, cells), w in zip(tasks, work):
        if len(tasks) < n_workers and w > target and len(cells) > 1:
            per = max(1, target // max(1, len(group)))
            pieces += [(group, cells[lo : lo + per]) for lo in range(0, len(cells), per)]
        else:
            pieces.append((group, cells))
    shards: list[list[Task]] = []
    current: list[Task] = []
    load = 0
    for group, cells in pieces:
        w = len(group) * max(len(cells), 1)
        if current and load + w > target:
            shards.append(current)
            current, load = [], 0
        current.append((group, cells))
        load += w
    if current:
        shards.append(current)
    return shards


# -- shipping the evaluator factory ------------------------------------------------------------
def dumps_factory(build: Callable[..., Any]) -> bytes:
    """Serialise an evaluator factory with cloudpickle, refusing to capture a model.

    Raises:
        InvalidArgumentError: the factory captures a model (a bug in the method: the factory
            must use the model it is given, the worker's).
    """
    import io

    ray = import_ray()
    from ray import cloudpickle

    from transformers import PreTrainedModel

    from .model import HookedModel

    class Refusing(cloudpickle.CloudPickler):
        def reducer_override(self, obj: Any) -> Any:
            # the language model never travels; small modules (an SAE) may
            if isinstance(obj, (PreTrainedModel, HookedModel)):
                raise InvalidArgumentError(
                    f"the sweep's evaluator captures a {type(obj).__name__}; a loaded model "
                    "cannot be shipped to Ray workers (each worker loads its own from the "
                    "model's specification)")
            return super().reducer_override(obj)

    del ray
    buffer = io.BytesIO()
    Refusing(buffer, protocol=5).dump(build)
    return buffer.getvalue()


# -- the worker ----------------------------------------------------------------------------------
class ShardWorker:
    """A Ray actor body: one model copy, loaded once, evaluating shards of a sweep."""

    def __init__(self, spec: LoadSpec, fingerprint: str, threads: int, device: str | None
                 ) -> None:
        t0 = time.perf_counter()
        torch.set_num_threads(max(1, int(threads)))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except ImportError:  # pragma: no cover - transformers is a dependency
            pass
        from .model import HookedModel

        if device is not None and spec.device_map is None:
            spec = spec.replace(device=device)
        dtype = None if spec.dtype is None else getattr(torch, spec.dtype)
        self.model = HookedModel(spec.name, dtype=dtype, device=spec.device,
                                 trust_remote_code=spec.trust_remote_code,
                                 allow_pickle=spec.allow_pickle, device_map=spec.device_map,
                                 max_memory=spec.max_memory, offload_folder=spec.offload_folder)
        got = model_fingerprint(self.model)
        if got != fingerprint:
            raise WorkerError(
                f"the worker on {socket.gethostname()} loaded {spec.name!r} with different "
                "weights than the driver (another file, revision or dtype at that path on this "
                "node); every node must see the same model")
        self.load_s = time.perf_counter() - t0
        self.key: str | None = None
        self.build: Any = None

    def info(self) -> dict[str, Any]:
        """Who this worker is and how long its model took to load."""
        return {"pid": os.getpid(), "node": socket.gethostname(), "load_s": self.load_s,
                "threads": torch.get_num_threads(), "device": str(self.model.device)}

    def run(self, key: str, payload: bytes, shard: int, tasks: list[Task]) -> dict[str, Any]:
        """Evaluate every task of a shard; raw values only (moved to the CPU)."""
        import pickle

        t0 = time.perf_counter()
        if key != self.key:
            self.build, self.key = pickle.loads(payload), key
        stats: dict[str, Any] = {}
        evaluate = self.build(self.model, stats)
        out = []
        for group, cells in tasks:
            values = evaluate(list(group), list(cells), None)
            out.append(dataclasses.replace(
                values, base=values.base.float().cpu(),
                source=None if values.source is None else values.source.float().cpu(),
                cells=values.cells.float().cpu(), payload=to_cpu(values.payload)))
        return {"shard": shard, "values": out, "stats": stats, "pid": os.getpid(),
                "node": socket.gethostname(), "compute_s": time.perf_counter() - t0}


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor inside (dataclasses, dicts, lists, tuples) moved to the CPU,
    so a GPU worker's results unpickle on a CPU-only driver."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_cpu(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


# -- the executor ----------------------------------------------------------------------------------
def _probe(address: str, timeout: float) -> None:
    """Fail fast when nothing listens at ``host:port`` (no multi-minute Ray retry loop)."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidArgumentError(
            f"Ray address must be HOST:PORT (e.g. 10.0.0.5:6379), 'auto' or ray://HOST:PORT, "
            f"got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ClusterConnectionError(
            f"cannot reach a Ray cluster at {address!r} ({exc.strerror or exc}). Start a head "
            "node there (ray start --head --port=PORT), check the address and firewall, or "
            "use executor=None to run locally") from None


class RayExecutor:
    """Distribute a sweep's pairs over Ray actors, each holding one copy of the model.

    Args:
        address: a Ray cluster (``"HOST:PORT"``, ``"auto"`` or ``"ray://HOST:PORT"``);
            default ``$RAY_ADDRESS``, else a local Ray instance is started (and reused). If
            this process is already connected to Ray (``ray.init`` was called), that
            connection is used.
        num_workers: actors (model copies); default: the cluster's CPUs divided by
            ``num_cpus_per_worker`` (GPUs divided by ``num_gpus_per_worker`` when that is
            set), at most one per shard.
        num_cpus_per_worker: CPUs reserved per actor; also its torch thread count.
        num_gpus_per_worker: GPUs per actor (``1``: one actor per GPU; ``2`` with
            ``device_map="auto"``: each actor splits the model over its two GPUs). With GPUs
            and no ``device_map``, the worker's model goes to ``"cuda"``.
        shards_per_worker: shards per actor (more: finer progress, checkpoints and balance;
            fewer: less per-shard overhead).
        max_retries: Ray restarts of a dead actor and retries of its shard.
        connect_timeout: seconds to reach ``address`` before :class:`ClusterConnectionError`.
        ready_timeout: seconds for the actors to be placed and load their model.
        log_to_driver: forward workers' stdout/stderr (only for a Ray instance started here).
        wait_for_resources: on an autoscaling cluster (KubeRay, the Ray autoscaler), wait up
            to ``ready_timeout`` for nodes to join instead of refusing ``num_workers`` that the
            cluster's current resources cannot hold.

    Workers are kept between sweeps (the model is loaded once per worker, not per sweep) until
    :meth:`shutdown`, the end of the ``with`` block, or another executor of this process
    needing the resources (sweeps of one process run one after another, so idle workers of
    an earlier executor are released for the new one).

    Example::

        ex = RayExecutor(address="10.0.0.5:6379", num_gpus_per_worker=1)
        result = activation_patching(model, ioi, component="attn_head", executor=ex)
        result.extra["executor"]["workers"]   # per-worker shards, cells, throughput
    """

    def __init__(self, address: str | None = None, *, num_workers: int | None = None,
                 num_cpus_per_worker: float = 1, num_gpus_per_worker: float = 0,
                 shards_per_worker: int = 4, max_retries: int = 3,
                 connect_timeout: float = 30.0, ready_timeout: float = 600.0,
                 log_to_driver: bool = False, wait_for_resources: bool = False) -> None:
        if address is not None and (not isinstance(address, str) or not address.strip()):
            raise InvalidArgumentError(f"address must be 'HOST:PORT' or 'auto', got {address!r}")
        _positive(num_workers, "num_workers", True, True, 1)
        _positive(num_cpus_per_worker, "num_cpus_per_worker", False, False, 0)
        _positive(num_gpus_per_worker, "num_gpus_per_worker", False, False, 0)
        if num_cpus_per_worker == 0 and num_gpus_per_worker == 0:
            raise InvalidArgumentError(
                "a worker needs at least some CPUs or GPUs: num_cpus_per_worker and "
                "num_gpus_per_worker are both 0")
        _positive(shards_per_worker, "shards_per_worker", False, True, 1)
        _positive(max_retries, "max_retries", False, True, 0)
        _positive(connect_timeout, "connect_timeout", False, False, 0.1)
        _positive(ready_timeout, "ready_timeout", False, False, 0.1)
        self.address = address
        self.num_workers = num_workers
        self.num_cpus_per_worker = num_cpus_per_worker
        self.num_gpus_per_worker = num_gpus_per_worker
        self.shards_per_worker = shards_per_worker
        self.max_retries = max_retries
        self.connect_timeout = float(connect_timeout)
        self.ready_timeout = float(ready_timeout)
        self.log_to_driver = log_to_driver
        self.wait_for_resources = wait_for_resources
        self._actors: list[Any] = []
        self._infos: list[dict[str, Any]] = []
        self._pool_key: tuple[Any, ...] | None = None
        self._fresh: set[int] = set()  # workers started (model loaded) by the current sweep
        self._sweeps = 0

    def __repr__(self) -> str:
        return (f"RayExecutor(address={self.address!r}, num_workers={self.num_workers}, "
                f"num_cpus_per_worker={self.num_cpus_per_worker}, "
                f"num_gpus_per_worker={self.num_gpus_per_worker})")

    # -- cluster -------------------------------------------------------------------------------
    def connect(self) -> Any:
        """Connect to (or start) Ray; returns the ``ray`` module."""
        ray = import_ray()
        if ray.is_initialized():
            connected = str(getattr(ray.get_runtime_context(), "gcs_address", ""))
            wanted = self.address or ""
            if wanted not in ("", "auto", "local") and not wanted.endswith(
                    ":" + connected.rpartition(":")[2]):
                import warnings

                warnings.warn(
                    f"this process is already connected to Ray at {connected}; using it, not "
                    f"{wanted!r} (call ray.shutdown() first to connect elsewhere)",
                    RuntimeWarning, stacklevel=3)
            return ray
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        if address is None or address == "local":  # a new instance, never a stale one
            ray.init(address="local", include_dashboard=False, log_to_driver=self.log_to_driver)
            return ray
        if address != "auto":
            _probe(address, min(self.connect_timeout, 10.0))
        os.environ.setdefault("RAY_gcs_rpc_server_connect_timeout_s",
                              str(max(1, int(self.connect_timeout))))
        t0 = time.perf_counter()
        try:
            ray.init(address=address, log_to_driver=self.log_to_driver)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ...
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ClusterConnectionError(
                f"could not connect to the Ray cluster at {address!r} after "
                f"{time.perf_counter() - t0:.0f} s: {reason}"
            ) from None
        return ray

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (for monitoring; changes when one restarts)."""
        if not self._actors:
            return []
        ray = import_ray()
        return [info["pid"] for info in ray.get([a.info.remote() for a in self._actors])]

    def shutdown(self) -> None:
        """Stop this executor's workers (Ray itself keeps running; ``ray.shutdown()`` stops it)."""
        if self._actors:
            ray = import_ray()
            if ray.is_initialized():
                for actor in self._actors:
                    ray.kill(actor, no_restart=True)
        self._actors, self._infos, self._pool_key = [], [], None
        _LIVE.discard(self)

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _wanted_workers(self, ray: Any, n_shards: int) -> int:
        if self.num_workers is not None:
            return self.num_workers
        resources = ray.cluster_resources()
        if self.num_gpus_per_worker:
            fit = int(resources.get("GPU", 0) // self.num_gpus_per_worker)
        else:
            fit = int(resources.get("CPU", 1) // self.num_cpus_per_worker)
        return max(1, min(fit, n_shards))

    def _workers(self, ray: Any, model: HookedModel, n: int) -> list[Any]:
        """``n`` ready actors holding ``model`` (reused from an earlier sweep when they fit)."""
        spec = model.load_spec
        assert spec is not None
        fingerprint = model_fingerprint(model)
        job = ray.get_runtime_context().get_job_id()
        key = (spec, fingerprint, job)
        if self._pool_key != key:
            self.shutdown()
            self._pool_key = key
        self._fresh = set(range(len(self._actors), max(n, len(self._actors))))
        if len(self._actors) < n:
            for other in list(_LIVE):  # release idle workers of this process's other executors
                if other is not self:
                    other.shutdown()
            self._check_fits(ray, n)
            _LIVE.add(self)
            options: dict[str, Any] = {
                "num_cpus": self.num_cpus_per_worker, "num_gpus": self.num_gpus_per_worker,
                "max_restarts": self.max_retries, "max_task_retries": self.max_retries}
            actor_cls = ray.remote(ShardWorker).options(**options)
            threads = max(1, int(self.num_cpus_per_worker))
            device = "cuda" if self.num_gpus_per_worker else None
            new = [actor_cls.remote(spec, fingerprint, threads, device)
                   for _ in range(n - len(self._actors))]
            refs = [a.info.remote() for a in new]
            ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.ready_timeout)
            if pending:
                for actor in new:
                    ray.kill(actor, no_restart=True)
                raise WorkerError(
                    f"{len(pending)} of {len(new)} Ray workers were not ready after "
                    f"{self.ready_timeout:.0f} s; the cluster has {ray.cluster_resources()} and "
                    f"each worker asks for {self.num_cpus_per_worker} CPU and "
                    f"{self.num_gpus_per_worker} GPU. Lower num_workers or add nodes")
            try:
                infos = ray.get(ready)
            except Exception as exc:
                for actor in new:
                    ray.kill(actor, no_restart=True)
                raise WorkerError(f"a Ray worker could not load the model: {_cause(exc)}") from None
            self._actors += new
            self._infos += infos
        return self._actors[:n]

    def _check_fits(self, ray: Any, n: int) -> None:
        """Refuse at once ``n`` workers that the cluster can never hold (no silent hang)."""
        if self.wait_for_resources:
            return
        total = ray.cluster_resources()
        for name, per in (("CPU", self.num_cpus_per_worker), ("GPU", self.num_gpus_per_worker)):
            have = float(total.get(name, 0))
            if per and n * per > have + 1e-9:
                raise WorkerError(
                    f"{n} workers x {per:g} {name} need {n * per:g} {name}s but the Ray cluster "
                    f"has {have:g}; lower num_workers (or num_{name.lower()}s_per_worker), add "
                    "nodes, or pass wait_for_resources=True on an autoscaling cluster")

    # -- running a sweep -----------------------------------------------------------------------
    def run(self, model: HookedModel, build: Callable[..., Any], tasks: Sequence[Task],
            on_result: Callable[[list[int], list[int], Any], None], label: str = "patching"
            ) -> dict[str, Any]:
        """Evaluate ``tasks`` on the cluster; ``on_result(group, cells, values)`` per task on the
        driver, shard by shard as they finish. Returns a summary (per-worker throughput,
        Ray's overhead) whose ``"stats"`` are the evaluators' merged counters."""
        t0 = time.perf_counter()
        payload = dumps_factory(build)
        ray = self.connect()
        t_connect = time.perf_counter() - t0
        if not tasks:
            return {"backend": "ray", "workers": [], "shards": 0, "cells": 0, "stats": [],
                    "connect_s": t_connect, "startup_s": 0.0, "wall_s": 0.0, "text": ""}
        n_guess = self._wanted_workers(ray, 1 << 30)
        shards = plan_shards(tasks, n_guess * self.shards_per_worker, n_guess)
        n_workers = min(n_guess, len(shards))
        actors = self._workers(ray, model, n_workers)
        infos = self._infos[: len(actors)]
        t_ready = time.perf_counter()
        self._sweeps += 1
        key = f"{os.getpid()}-{id(self)}-{self._sweeps}"
        payload_ref = ray.put(payload)
        from ray.util import ActorPool

        pool = ActorPool(actors)
        index = {a: i for i, a in enumerate(actors)}
        per_worker = [{"worker": i, "pid": info["pid"], "node": info["node"],
                       "load_s": info["load_s"], "loaded_now": i in self._fresh,
                       "shards": 0, "pairs": 0, "cells": 0,
                       "compute_s": 0.0, "restarts": 0} for i, info in enumerate(infos)]
        shard_stats: dict[int, dict[str, Any]] = {}
        owner: dict[int, int] = {}

        def submit(actor: Any, item: tuple[int, list[Task]]) -> Any:
            shard, shard_tasks = item
            owner[shard] = index[actor]
            return actor.run.remote(key, payload_ref, shard, shard_tasks)

        for item in enumerate(shards):
            pool.submit(submit, item)
        while pool.has_next():
            try:
                done = pool.get_next_unordered()
            except Exception as exc:
                raise WorkerError(
                    f"a Ray worker failed while evaluating a shard of the {label} sweep "
                    f"(finished shards are kept): {_cause(exc)}") from None
            shard = done["shard"]
            w = per_worker[owner[shard]]
            if done["pid"] != w["pid"]:  # Ray restarted this actor (its process died)
                w["restarts"] += 1
                w["pid"] = self._infos[owner[shard]]["pid"] = done["pid"]
            w["shards"] += 1
            w["compute_s"] += done["compute_s"]
            for (group, cells), values in zip(shards[shard], done["values"]):
                w["pairs"] += len(group)
                w["cells"] += len(group) * len(cells)
                on_result(group, cells, values)
            shard_stats[shard] = done["stats"]
            del done  # stream: a shard's values are stored, then dropped
        wall = time.perf_counter() - t0
        for w in per_worker:
            w["cells_per_s"] = w["cells"] / w["compute_s"] if w["compute_s"] > 0 else 0.0
        compute = max((w["compute_s"] for w in per_worker), default=0.0)
        sweep_s = time.perf_counter() - t_ready
        summary = {
            "backend": "ray", "address": self.address or os.environ.get("RAY_ADDRESS") or "local",
            "n_workers": len(actors), "shards": len(shards),
            "cells": sum(w["cells"] for w in per_worker), "workers": per_worker,
            "restarts": sum(w["restarts"] for w in per_worker),
            "connect_s": t_connect, "startup_s": t_ready - t0, "sweep_s": sweep_s,
            "compute_s": compute, "scheduling_s": max(0.0, sweep_s - compute), "wall_s": wall,
            "stats": [shard_stats[k] for k in sorted(shard_stats)],
        }
        summary["text"] = format_summary(summary)
        return summary


def format_summary(summary: dict[str, Any]) -> str:
    """One line per worker: shards, cells and cells/s; then Ray's overhead."""
    lines = [f"ray: {summary['n_workers']} workers, {summary['shards']} shards, "
             f"{summary['cells']} cells in {summary['wall_s']:.1f} s (startup "
             f"{summary['startup_s']:.1f} s incl. model load, scheduling "
             f"{summary['scheduling_s']:.2f} s, restarts {summary['restarts']})"]
    for w in summary["workers"]:
        load = (f"model load {w['load_s']:.1f} s" if w.get("loaded_now", True)
                else "model kept from an earlier sweep")
        lines.append(f"  worker {w['worker']} (pid {w['pid']} on {w['node']}): {w['shards']} "
                     f"shards, {w['cells']} cells, {w['cells_per_s']:.0f} cells/s, {load}")
    return "\n".join(lines)


def _cause(exc: BaseException) -> str:
    """The worker's own message inside a Ray error (its exception type and text)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        text = "".join(traceback.format_exception_only(type(cause), cause)).strip()
        return text
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__
