"""Side-by-side benchmark of patching sweeps on SmolLM2-135M (float32).

One process, one model load, every implementation of each sweep timed in the same process,
repeats interleaved across implementations (repeat 1 of every implementation, then repeat 2,
...); the table reports the minimum. Implementations:

* ``fast``    causalpatch, ``engine="fast"`` (``activation_patching`` / ``ablate``);
* ``naive``   causalpatch, ``engine="naive"`` (one forward per patch and pair) -- the
              reference every effect matrix is compared with;
* ``loop``    (zero ablation only) one batch-1 forward per (head, prompt) with a plain
              forward pre-hook -- the reference of that sweep;
* ``tl``      TransformerLens 4.3, ``transformer_lens.patching`` on a batch of all pairs
              (``TransformerBridge``, eager attention, its own model copy);
* ``nnsight`` nnsight 0.8, batched invokes (one invoke per cell holding all pairs, about 64
              rows per trace; its own model copy).

Sweeps (IOI pairs from ``IOIDataset(model, n=..., seed=0)``, logit difference, denoising):

1. ``resid_post``     resid_post by position, 1 pair;
2. ``attn_head``      all 30 x 9 heads (all positions jointly), 1 pair;
3. ``ioi_attn_head``  attn_head over a 32-pair IOI dataset;
4. ``mlp_neuron``     every neuron of 2 layers (0 and 1: each patched neuron's rows run through
                      the most layers, the least favourable pair for the fast engine), 1 pair;
5. ``zero_ablation``  zero ablation of every head over 8 IOI prompts (``ablate``).

Per implementation: wall time (min of ``--repeats``), speed ratios, max abs difference of the
effect matrix from the reference, forward-equivalents (wall time / one plain batch-1 forward
of the same prompt, mean over the sweep's prompts), the work it ran (for the fast engine the
floor ``layer_tokens / (n_layers * mean tokens)`` from ``result.extra``; in seconds, the
compute floor: ``layer_tokens`` at the cost of one layer-token in a plain batched forward
measured in each repeat, printed beside the fast time each headline target asks for), and
peak memory:
each implementation's sweep runs once more in a fresh subprocess that loads the model, frees
what the load left (``malloc_trim``), resets the peak (``/proc/self/clear_refs``) and reads
``VmHWM`` after the sweep; beside it a plain batched forward of the same number of rows per
pass (last-position logits only) measured the same way.

Run: ``make bench`` (installs the peers, then the full run, which rewrites
``docs/benchmarks.md`` and ``out/bench_patching.json``). Smoke test: ``--quick`` (smaller
sizes, one repeat, never writes the docs unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

SWEEPS = ("resid_post", "attn_head", "ioi_attn_head", "mlp_neuron", "zero_ablation")
IMPL_ORDER = ("fast", "naive", "loop", "tl", "nnsight")
LABELS = {
    "fast": "causalpatch fast (`engine=\"fast\"`)",
    "naive": "causalpatch naive (`engine=\"naive\"`, 1 forward/patch)",
    "loop": "plain hooks, 1 forward per (head, prompt)",
    "tl": "TransformerLens 4.3 (`patching`, batch of all pairs)",
    "nnsight": "nnsight 0.8 (batched invokes)",
}
SHORT = {"fast": "fast", "naive": "naive", "loop": "loop", "tl": "TL", "nnsight": "nnsight"}
#: (sweep, implementation the fast engine is compared with, target ratio)
HEADLINES = (
    ("ioi_attn_head", "tl", 15.0),
    ("ioi_attn_head", "nnsight", 4.0),
    ("resid_post", "tl", 100.0),
    ("attn_head", "tl", 40.0),
    ("attn_head", "nnsight", 10.0),
    ("mlp_neuron", "naive", 20.0),
    ("zero_ablation", "loop", 10.0),
)
MEMORY_TARGET = 1.5
#: the analysis appended to the generated page (what the numbers mean, the compute floors)
NOTES = HERE / "benchmarks_notes.md"


@dataclass(frozen=True)
class Sizes:
    layers: list[int] | None  # sweeps 1, 2, 3, 5 (None: all)
    n_pairs: int  # sweep 3
    mlp_layers: list[int]  # sweep 4
    neurons: list[int] | None  # sweep 4 (None: all)
    n_prompts: int  # sweep 5


FULL = Sizes(layers=None, n_pairs=32, mlp_layers=[0, 1], neurons=None, n_prompts=8)
QUICK = Sizes(layers=[0, 29], n_pairs=3, mlp_layers=[0, 1], neurons=list(range(8)),
              n_prompts=3)


@dataclass
class Sweep:
    name: str
    title: str
    kind: str  # "patch" | "ablate"
    component: str
    by_position: bool
    peer_kind: str  # peers.PATCH_KINDS key
    dataset: Any  # IOIDataset
    layers: list[int] | None
    neurons: list[int] | None
    n_layers: int
    n_units: int  # units per selected layer
    reference: str  # "naive" | "loop"

    @property
    def n_pairs(self) -> int:
        return len(self.dataset)

    @property
    def n_cells(self) -> int:
        n_l = self.n_layers if self.layers is None else len(self.layers)
        return n_l * self.n_units


@dataclass
class Impl:
    key: str
    run: Callable[[], tuple[torch.Tensor, dict | None]]
    forwards: int  # forward calls
    rows: int  # batch rows over all forwards (= batch-1 forwards' worth, padding aside)
    rows_per_pass: Callable[[dict | None], int | None]
    #: sampled reference ``(what, k, of)``: it ran on the first ``k`` of ``of`` pairs (or
    #: neurons); its time is scaled by ``of / k`` and its effects are compared with causalpatch
    #: fast on those pairs (neurons)
    sample: tuple[str, int, int] | None = None
    #: causalpatch fast on the same part (set with ``sample``), for the equality check
    fast_on_sample: Callable[[], tuple[torch.Tensor, dict | None]] | None = None


@dataclass
class Row:
    key: str
    label: str
    times: list[float] = field(default_factory=list)
    out: torch.Tensor | None = None
    extra: dict | None = None
    forwards: int = 0
    rows: int = 0
    rows_per_pass: int | None = None
    not_run: str | None = None
    memory: dict | None = None

    @property
    def best(self) -> float:
        return min(self.times)


# ----------------------------------------------------------------------------- helpers


def rss_status() -> dict[str, float]:
    """VmRSS / VmHWM of this process in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) / 1024
    return out


def reset_peak() -> bool:
    """Free what earlier work left in the heap and reset VmHWM to the current RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": affinity,
            "ram_gib": ram_gib, "platform": platform.platform(),
            "python": platform.python_version()}


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"torch": torch.__version__}
    for dist in ("transformers", "transformer-lens", "nnsight", "causalpatch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        out["causalpatch_commit"] = commit + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        out["causalpatch_commit"] = "unknown"
    return out


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# ------------------------------------------------------------------------------- sweeps


def build_sweeps(model: Any, sizes: Sizes, names: Sequence[str]) -> list[Sweep]:
    from causalpatch.datasets import IOIDataset

    n_layers = model.n_layers
    n_heads = model.hf_model.config.num_attention_heads
    one = IOIDataset(model, n=1, seed=0)
    t_one = len(model.to_tokens(one.clean[0])[0])
    out = []
    for name in names:
        if name == "resid_post":
            out.append(Sweep(name, f"resid_post by position, 1 IOI pair ({t_one} tokens)",
                             "patch", "resid_post", True, "resid_post", one, sizes.layers, None,
                             n_layers, t_one, "naive"))
        elif name == "attn_head":
            out.append(Sweep(name, "attn_head (every head, all positions), 1 IOI pair",
                             "patch", "attn_head", False, "z", one, sizes.layers, None,
                             n_layers, n_heads, "naive"))
        elif name == "ioi_attn_head":
            ds = IOIDataset(model, n=sizes.n_pairs, seed=0)
            out.append(Sweep(name, f"attn_head over a {sizes.n_pairs}-pair IOI dataset", "patch",
                             "attn_head", False, "z", ds, sizes.layers, None, n_layers, n_heads,
                             "naive"))
        elif name == "mlp_neuron":
            d_mlp = model.hf_model.config.intermediate_size
            n_units = d_mlp if sizes.neurons is None else len(sizes.neurons)
            out.append(Sweep(name, f"mlp_neuron, layers {sizes.mlp_layers} x {n_units} neurons "
                             "(all positions jointly), 1 IOI pair", "patch", "mlp_neuron", False,
                             "mlp_post", one, list(sizes.mlp_layers), sizes.neurons, n_layers,
                             n_units, "naive"))
        elif name == "zero_ablation":
            ds = IOIDataset(model, n=sizes.n_prompts, seed=0)
            out.append(Sweep(name, f"zero ablation of every head over {sizes.n_prompts} IOI "
                             "prompts (clean prompts, logit difference)", "ablate", "attn_head",
                             False, "z", ds, sizes.layers, None, n_layers, n_heads, "loop"))
        else:
            raise SystemExit(f"unknown sweep {name!r}; choose from {', '.join(SWEEPS)}")
    return out


def base_prompts(sw: Sweep) -> list[str]:
    """The prompts the patched/ablated runs are run on (corrupted for denoising)."""
    return list(sw.dataset.corrupted if sw.kind == "patch" else sw.dataset.clean)


def peer_batch(sw: Sweep, tokenizer: Any) -> Any:
    import peers as P

    ds = sw.dataset
    return P.make_pair_batch(tokenizer, ds.clean, ds.corrupted if sw.kind == "patch" else None,
                             ds.correct, ds.incorrect)


def mean_tokens(model: Any, sw: Sweep) -> float:
    lengths = [len(model.to_tokens(p)[0]) for p in base_prompts(sw)]
    return sum(lengths) / len(lengths)


def naive_sample(sw: Sweep, naive_pairs: int | None, naive_neurons: int | None
                 ) -> tuple[str, int, int] | None:
    """The part of the sweep the naive reference runs on: ``None`` (all of it), or
    ``("pairs", k, n_pairs)`` / ``("neurons", k, n_neurons)`` (the first ``k``)."""
    if sw.kind != "patch":
        return None
    if naive_pairs is not None and naive_pairs < sw.n_pairs:
        return ("pairs", max(1, naive_pairs), sw.n_pairs)
    if naive_neurons is not None and sw.component == "mlp_neuron" and sw.neurons is None \
            and naive_neurons < sw.n_units:
        return ("neurons", max(1, naive_neurons), sw.n_units)
    return None


def build_impls(sw: Sweep, model: Any, peers_: dict[str, Any],
                naive_pairs: int | None = None, naive_neurons: int | None = None
                ) -> dict[str, Impl]:
    """The implementations of one sweep (peers only if their wrapper is in ``peers_``).

    ``naive_pairs``: run the naive reference on only the first this-many pairs of a dataset
    sweep (it is one forward per patch and pair: 8,640 forwards for 32 IOI pairs); its time is
    then scaled to all pairs and its effects checked against causalpatch fast on those pairs.
    ``naive_neurons``: likewise the first this-many neurons of each layer of an ``mlp_neuron``
    sweep over every neuron (all naive forwards have the same size, so the scaling is exact up
    to timing noise).
    """
    import peers as P
    from causalpatch import ablate, activation_patching

    hf, tok = model.hf_model, model.tokenizer
    n, cells = sw.n_pairs, sw.n_cells
    kwargs: dict[str, Any] = {"component": sw.component, "layers": sw.layers}
    if sw.neurons is not None:
        kwargs["neurons"] = sw.neurons
    impls: dict[str, Impl] = {}

    def fast_rows(extra: dict | None) -> int | None:
        if not extra:
            return None
        bs, rows = extra.get("batch_size"), extra.get("rows")
        if bs is None:
            return None
        return int(min(bs, rows)) if rows else int(bs)

    if sw.kind == "patch":
        def patch(engine: str, sample: tuple[str, int, int] | None = None
                  ) -> Callable[[], tuple[torch.Tensor, dict | None]]:
            data, kw = sw.dataset, dict(kwargs)
            if sample is not None and sample[0] == "pairs":
                data = sw.dataset.subset(range(sample[1]))
            elif sample is not None:
                kw["neurons"] = list(range(sample[1]))

            def run() -> tuple[torch.Tensor, dict | None]:
                r = activation_patching(model, data, by_position=sw.by_position,
                                        engine=engine, **kw)
                return r.effect_matrix.detach().float().cpu(), dict(r.extra)
            return run

        impls["fast"] = Impl("fast", patch("fast"), 0, 0, fast_rows)
        sample = naive_sample(sw, naive_pairs, naive_neurons)
        if sample is None:
            done = cells * n + 2 * n
        elif sample[0] == "pairs":
            done = cells * sample[1] + 2 * sample[1]
        else:
            done = (cells // sw.n_units) * sample[1] * n + 2 * n
        impls["naive"] = Impl("naive", patch("naive", sample), done, done, lambda e: 1,
                              sample=sample,
                              fast_on_sample=None if sample is None else patch("fast", sample))
    else:
        ds = sw.dataset

        def fast_ablate() -> tuple[torch.Tensor, dict | None]:
            r = ablate(model, list(ds.clean), kind="zero", correct=list(ds.correct),
                       incorrect=list(ds.incorrect), **kwargs)
            return r.effect_matrix.detach().float().cpu(), dict(r.extra)

        def ablate_rows(extra: dict | None) -> int | None:
            got = fast_rows(extra)
            if got is not None:
                return got
            try:  # the method's default rows per pass when the result does not say
                from causalpatch.methods import ablation
                return int(min(getattr(ablation, "DEFAULT_ROWS_PER_BATCH"), cells * n))
            except (ImportError, AttributeError):
                return None

        ids = [tok(p, return_tensors="pt").input_ids for p in ds.clean]
        impls["fast"] = Impl("fast", fast_ablate, 0, 0, ablate_rows)
        impls["loop"] = Impl(
            "loop", lambda: (P.loop_zero_ablate_heads(hf, ids, list(ds.correct),
                                                      list(ds.incorrect), sw.layers), None),
            cells * n + n, cells * n + n, lambda e: 1)

    batch = peer_batch(sw, tok)
    units = sw.neurons
    if "tl" in peers_:
        bridge = peers_["tl"]
        if sw.kind == "patch":
            run = lambda: (P.tl_patch_sweep(bridge, batch, sw.peer_kind, sw.layers, units), None)
            impls["tl"] = Impl("tl", run, cells + 2, (cells + 2) * n, lambda e: n)
        else:
            run = lambda: (P.tl_zero_ablate_heads(bridge, batch, sw.layers), None)
            impls["tl"] = Impl("tl", run, cells + 1, (cells + 1) * n, lambda e: n)
    if "nnsight" in peers_:
        lm = peers_["nnsight"]
        per_trace = max(1, 64 // n)
        traces = -(-cells // per_trace)
        if sw.kind == "patch":
            run = lambda: (P.nnsight_patch_sweep(lm, batch, sw.peer_kind, sw.layers, units), None)
            impls["nnsight"] = Impl("nnsight", run, traces + 2, (cells + 2) * n,
                                    lambda e: min(per_trace, cells) * n)
        else:
            run = lambda: (P.nnsight_zero_ablate_heads(lm, batch, sw.layers), None)
            impls["nnsight"] = Impl("nnsight", run, traces + 1, (cells + 1) * n,
                                    lambda e: min(per_trace, cells) * n)
    return impls


def plain_forward_fn(model: Any, sw: Sweep) -> Callable[[], float]:
    """Mean time of one plain batch-1 forward over the sweep's base prompts (pre-tokenised)."""
    hf = model.hf_model
    ids = [model.tokenizer(p, return_tensors="pt").input_ids for p in base_prompts(sw)]

    def run() -> float:
        t = 0.0
        with torch.no_grad():
            for x in ids:
                t0 = time.perf_counter()
                hf(input_ids=x)
                t += time.perf_counter() - t0
        return t / len(ids)

    return run


#: rows of the batched forward that measures the unit cost of a layer-token
UNIT_ROWS = 64


def unit_cost_fn(model: Any, sw: Sweep) -> Callable[[], float]:
    """Seconds per layer-token of a plain batched forward of the decoder stack.

    ``UNIT_ROWS`` copies of the sweep's first base prompt (``[64, T]``, ~900 tokens: inside the
    range where a decoder layer's time per token is flat) through the embedding, every decoder
    layer and the final norm (``get_decoder()``, no unembedding), divided by
    ``rows × T × n_layers``. The compute floor of a sweep is its ``layer_tokens`` at this cost.
    """
    decoder = model.hf_model.get_decoder()
    ids = model.tokenizer(base_prompts(sw)[0], return_tensors="pt").input_ids
    batch = ids.repeat(UNIT_ROWS, 1)
    layer_tokens = batch.numel() * sw.n_layers

    def run() -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            decoder(input_ids=batch)
            return (time.perf_counter() - t0) / layer_tokens

    return run


def warm_up(sw: Sweep, model: Any, peers_: dict[str, Any]) -> None:
    """Cheap warm-up of every code path (kernels, allocator, lazy imports), untimed."""
    from causalpatch import ablate, activation_patching

    plain_forward_fn(model, sw)()
    unit_cost_fn(model, sw)()
    layer0 = [sw.layers[0] if sw.layers else 0]
    kw: dict[str, Any] = {"component": sw.component, "layers": layer0}
    if sw.component == "mlp_neuron":
        kw["neurons"] = [0]
    from causalpatch.datasets import IOIDataset

    one = IOIDataset(model, n=1, seed=0)
    if sw.kind == "patch":
        activation_patching(model, one, by_position=sw.by_position, **kw)
    else:
        ablate(model, list(one.clean), kind="zero", correct=list(one.correct),
               incorrect=list(one.incorrect), **kw)
    ids = model.tokenizer(base_prompts(sw)[0], return_tensors="pt").input_ids
    with torch.no_grad():
        if "tl" in peers_:
            peers_["tl"](ids)
        if "nnsight" in peers_:
            with peers_["nnsight"].trace(ids):
                peers_["nnsight"].lm_head.output.save()


def make_peers(model: Any, want: Sequence[str], copy_model: bool = True) -> dict[str, Any]:
    import peers as P

    out: dict[str, Any] = {}
    if "tl" in want:
        out["tl"] = P.boot_tl_bridge(model.hf_model, model.tokenizer, copy_model=copy_model)
    if "nnsight" in want:
        out["nnsight"] = P.wrap_nnsight(model.hf_model, model.tokenizer, copy_model=copy_model)
    return out


# ------------------------------------------------------------------------- memory probes


def memory_probe(spec: str, quick: bool, threads: int) -> None:
    """Subprocess entry: ``SWEEP:IMPL`` or ``SWEEP:plain:ROWS``; prints one JSON line."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    from causalpatch import InterpretableModel

    sweep_name, what, *rest = spec.split(":")
    model = InterpretableModel("smollm2")
    sw = build_sweeps(model, QUICK if quick else FULL, [sweep_name])[0]
    result: dict[str, Any] = {"spec": spec}
    if what == "plain":
        rows = int(rest[0])
        ids = model.tokenizer(base_prompts(sw)[0], return_tensors="pt").input_ids
        with torch.no_grad():
            model.hf_model(input_ids=ids)  # warm-up
            ok = reset_peak()
            base = rss_status()["VmRSS"]
            model.hf_model(input_ids=ids.expand(rows, -1), logits_to_keep=1)
        result.update(rows=rows, tokens=int(ids.shape[1]))
    else:
        peers_ = make_peers(model, [what] if what in ("tl", "nnsight") else [], copy_model=False)
        impl = build_impls(sw, model, peers_)[what]
        ids = model.tokenizer(base_prompts(sw)[0], return_tensors="pt").input_ids
        with torch.no_grad():
            model.hf_model(input_ids=ids)  # warm-up (kernels, allocator)
        ok = reset_peak()
        base = rss_status()["VmRSS"]
        _, extra = impl.run()
        result["rows_per_pass"] = impl.rows_per_pass(extra)
    status = rss_status()
    result.update(reset=ok, base_mib=base, peak_mib=status["VmHWM"],
                  added_mib=status["VmHWM"] - base)
    print(json.dumps(result), flush=True)


def run_probe(spec: str, quick: bool, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", spec,
           "--threads", str(threads)] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"spec": spec, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- main


def fmt_s(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def fmt_ratio(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.1f}x" if x < 100 else f"{x:.0f}x"


def run_sweep(sw: Sweep, model: Any, peers_: dict[str, Any], args: argparse.Namespace,
              cost_per_row: dict[str, float]) -> dict[str, Any]:
    impls = build_impls(sw, model, peers_, args.naive_pairs, args.naive_neurons)
    fwd = plain_forward_fn(model, sw)
    unit = unit_cost_fn(model, sw)
    t_fwd_est = fwd()
    rows: dict[str, Row] = {}
    for key in IMPL_ORDER:
        if key not in impls or (key not in args.impls and key not in ("fast", sw.reference)):
            continue
        imp = impls[key]
        label = LABELS[key]
        if sw.kind == "ablate" and key == "tl":
            label = "TransformerLens 4.3 (`run_with_hooks`, batch of all prompts)"
        row = Row(key, label, forwards=imp.forwards, rows=imp.rows)
        if key in ("tl", "nnsight") and args.peer_budget is not None:
            per_row = cost_per_row.get(key)
            est = imp.rows * (per_row if per_row is not None else t_fwd_est)
            basis = "its measured cost per row" if per_row is not None else \
                "a plain batch-1 forward per row (lower bound)"
            if est > args.peer_budget:
                row.not_run = (f"not run: would take {imp.forwards} forwards ({imp.rows} rows), "
                               f"~{est:.0f} s per run estimated from {basis}; "
                               f"over --peer-budget {args.peer_budget:.0f} s")
        if key in ("tl", "nnsight") and args.peer_sweeps and sw.name not in args.peer_sweeps:
            row.not_run = (f"not run in this benchmark run (peers timed only on "
                           f"{', '.join(args.peer_sweeps)}: `--peer-sweeps`)")
        rows[key] = row
    warm_up(sw, model, peers_)
    fwd_times: list[float] = []
    unit_times: list[float] = []
    for rep in range(args.repeats):
        fwd_times.append(fwd())
        unit_times.append(unit())
        for key, row in rows.items():
            if row.not_run:
                continue
            if rep > 0 and args.max_repeat_seconds and row.times[0] > args.max_repeat_seconds:
                continue
            t0 = time.perf_counter()
            out, extra = impls[key].run()
            row.times.append(time.perf_counter() - t0)
            row.out, row.extra = out, extra
            print(f"  [{sw.name}] repeat {rep + 1}/{args.repeats} {SHORT[key]:8s} "
                  f"{row.times[-1]:8.2f} s", flush=True)
    t_fwd = min(fwd_times)
    t_unit = min(unit_times)
    for key, row in rows.items():
        if key in ("tl", "nnsight") and row.times:
            cost_per_row[key] = row.best / max(row.rows, 1)
        if row.times:
            row.rows_per_pass = impls[key].rows_per_pass(row.extra)
    ref = rows[sw.reference]
    fast = rows["fast"]
    sample = impls[sw.reference].sample
    check = impls[sw.reference].fast_on_sample
    subset_diff = None
    unscaled: list[float] = []
    if sample is not None:
        # the reference timed a part of the sweep: scale its time to all of it, check
        # causalpatch fast against it on that part (for pairs, one untimed fast run on the same
        # pairs; for neurons, fast's columns of those neurons), and compare every full-size
        # matrix with causalpatch fast's
        what, k, of = sample
        scale = of / k
        unscaled = list(ref.times)
        ref.times = [t * scale for t in ref.times]
        assert ref.out is not None and fast.out is not None and check is not None
        sub_out = check()[0] if what == "pairs" else fast.out[..., :k]
        subset_diff = (sub_out.reshape(ref.out.shape) - ref.out).abs().max().item()
        ref_full = fast.out
    else:
        ref_full = ref.out
    t_bar = mean_tokens(model, sw)
    records = []
    for key, row in rows.items():
        rec: dict[str, Any] = {"impl": key, "label": row.label, "forwards": row.forwards,
                               "rows": row.rows}
        if row.not_run:
            rec["not_run"] = row.not_run
            records.append(rec)
            continue
        assert row.out is not None and ref_full is not None
        if sample is not None and key == sw.reference:
            diff = 0.0  # it is the reference of the subset check
            rec["sampled"] = {"what": sample[0], "k": sample[1], "of": sample[2],
                              "scale": sample[2] / sample[1],
                              "unscaled_times": unscaled}
        elif sample is not None and key == "fast":
            diff = float(subset_diff)
        else:
            diff = (row.out.reshape(ref_full.shape) - ref_full).abs().max().item() \
                if row.out.numel() == ref_full.numel() else float("nan")
        rec.update(seconds=row.best, times=row.times, runs=len(row.times),
                   fast_speedup=row.best / fast.best, vs_naive=ref.best / row.best,
                   max_abs_diff=diff, forward_equivalents=row.best / t_fwd,
                   rows_per_pass=row.rows_per_pass, shape=list(row.out.shape))
        if key == "fast" and row.extra and "layer_tokens" in row.extra:
            rec["layer_tokens"] = int(row.extra["layer_tokens"])
            rec["floor_forward_equivalents"] = row.extra["layer_tokens"] / (sw.n_layers * t_bar)
            rec["floor_s"] = row.extra["layer_tokens"] * t_unit
            rec["engine_stats"] = {k: row.extra[k] for k in
                                   ("rows", "skipped", "chunks", "window", "batch_size")
                                   if k in row.extra}
        records.append(rec)
    res = {"name": sw.name, "title": sw.title, "n_pairs": sw.n_pairs, "n_cells": sw.n_cells,
           "layers": sw.layers, "mean_tokens": t_bar, "reference": sw.reference,
           "plain_forward_s": t_fwd, "unit_cost_s": t_unit, "impls": records,
           "prompts": base_prompts(sw)[:2]}
    for rec in records:
        if "seconds" in rec:
            print(f"{sw.name:14s} {SHORT[rec['impl']]:8s} {rec['seconds']:9.3f} s  "
                  f"fast x{rec['fast_speedup']:7.1f}  fwd-eq {rec['forward_equivalents']:8.1f}  "
                  f"max|diff| {rec['max_abs_diff']:.1e}", flush=True)
        else:
            print(f"{sw.name:14s} {SHORT[rec['impl']]:8s} {rec['not_run']}", flush=True)
    return res


def add_memory(results: list[dict], args: argparse.Namespace) -> None:
    plain_cache: dict[tuple[str, int], dict] = {}
    for res in results:
        for rec in res["impls"]:
            if "seconds" not in rec:
                continue
            if args.memory == "none" or (args.memory == "fast" and rec["impl"] != "fast"):
                continue
            print(f"  memory probe {res['name']}:{rec['impl']} ...", flush=True)
            mem = run_probe(f"{res['name']}:{rec['impl']}", args.quick, args.threads)
            rows = mem.get("rows_per_pass") or rec.get("rows_per_pass")
            if rows:
                key = (res["name"], int(rows))
                if key not in plain_cache:
                    plain_cache[key] = run_probe(f"{res['name']}:plain:{int(rows)}", args.quick,
                                                 args.threads)
                plain = plain_cache[key]
                mem["plain"] = plain
                if "peak_mib" in mem and "peak_mib" in plain:
                    mem["peak_ratio"] = mem["peak_mib"] / plain["peak_mib"]
                    mem["added_ratio"] = mem["added_mib"] / max(plain["added_mib"], 1e-9)
            rec["memory"] = mem
            if "error" in mem:
                print(f"    {mem['error']}", flush=True)
            else:
                extra = ""
                if "plain" in mem and "peak_mib" in mem["plain"]:
                    extra = (f"; plain forward of {rows} rows peak {mem['plain']['peak_mib']:.0f} "
                             f"MiB (+{mem['plain']['added_mib']:.0f}); ratio "
                             f"{mem.get('peak_ratio', float('nan')):.2f}")
                print(f"    peak {mem['peak_mib']:.0f} MiB (+{mem['added_mib']:.0f} over "
                      f"{mem['base_mib']:.0f} after load){extra}", flush=True)


def headline(results: list[dict]) -> list[dict]:
    by = {r["name"]: {i["impl"]: i for i in r["impls"]} for r in results}
    out = []
    for sweep, other, target in HEADLINES:
        if sweep not in by or other not in by[sweep]:
            continue
        rec = by[sweep][other]
        fast = by[sweep]["fast"]
        ratio = rec["seconds"] / fast["seconds"] if "seconds" in rec else None
        # the fast time the target asks for, beside the exact engine's compute floor
        needs = rec["seconds"] / target if "seconds" in rec else None
        out.append({"sweep": sweep, "vs": other, "target": target, "ratio": ratio,
                    "met": None if ratio is None else ratio >= target,
                    "note": rec.get("not_run"), "fast_s": fast["seconds"], "needs_s": needs,
                    "floor_s": fast.get("floor_s")})
    return out


def render_markdown(report: dict) -> str:
    cfg, mach, ver = report["config"], report["machine"], report["versions"]
    L = ["# Benchmarks", ""]
    if cfg["quick"]:
        L += ["**Quick smoke-test sizes (`--quick`): not the benchmark; ratios are not comparable "
              "with the targets.**", ""]
    L += [
        f"Produced by `{report['command']}` (`make bench` runs the full version) on "
        f"{report['date']}.",
        "",
        f"- Machine: {mach['cpu']}, {mach['cores']} cores ({mach['usable_cores']} usable), "
        f"{mach['ram_gib']:.1f} GiB RAM, {mach['platform']}, Python {mach['python']}; "
        f"load average {report['load_before']} before, {report['load_after']} after.",
        f"- Versions: torch {ver['torch']}, transformers {ver['transformers']}, "
        f"TransformerLens {ver['transformer-lens']}, nnsight {ver['nnsight']}, causalpatch "
        f"{ver['causalpatch']} at commit `{ver['causalpatch_commit']}`.",
        f"- SmolLM2-135M-Instruct (`InterpretableModel(\"smollm2\")`), float32, CPU, "
        f"{cfg['threads']} torch threads; load {report['load_s']:.1f} s.",
        f"- Every implementation runs in this one process; repeats ({cfg['repeats']}) are "
        "interleaved across implementations and the table shows the minimum. TransformerLens "
        "and nnsight work on their own deep copies of the model (TL switches its copy to eager "
        "attention; the others use SDPA).",
        "- IOI pairs: `IOIDataset(model, n=..., seed=0)`; metric: logit difference (correct − "
        "incorrect) at the last token; patching is denoising, effects normalised as "
        "causalpatch does (mean over pairs, then (patched − corrupted) / (clean − corrupted)). "
        "Peers get the pairs right-padded to one length (exact under causal attention).",
        "- *fast is N× faster* = this implementation's time / causalpatch fast's; *speed-up over "
        "reference* = the reference's time / this one's (reference: causalpatch naive, or the plain-hook loop "
        "for ablation); *max abs diff* = max |effect − reference effect|; *forward-eq* = wall "
        "time / one plain batch-1 forward of the same prompt (mean over the sweep's prompts); "
        "*work* = batch rows run (batch-1 forwards' worth), and for the fast engine the floor "
        "`layer_tokens / (n_layers × mean tokens)` from `result.extra`.",
        "- Peak memory: each implementation's sweep runs once more in a fresh subprocess that "
        "loads the model, frees what loading left (`malloc_trim`), resets the peak "
        "(`/proc/self/clear_refs`) and reads `VmHWM` after the sweep; *added* = peak − RSS "
        "after the load. Beside it: a plain batched forward (`hf_model(ids, logits_to_keep=1)`) "
        "of the same rows per pass, as many copies of the sweep's first prompt, measured the "
        "same way. Target: sweep peak ≤ 1.5× the plain forward's.",
        "",
    ]
    heads = report.get("headline") or []
    if heads:
        L += ["## Headline ratios (as measured)", "",
              "| sweep | causalpatch fast vs | target | measured | met | fast (s) | target "
              "needs fast ≤ (s) | compute floor (s) |", "|---|---|---:|---:|---|---:|---:|---:|"]
        for h in heads:
            measured = fmt_ratio(h["ratio"]) if h["ratio"] is not None else (h["note"] or "–")
            met = "–" if h["met"] is None else ("yes" if h["met"] else "**no**")
            needs = fmt_s(h["needs_s"]) if h.get("needs_s") is not None else "–"
            floor = fmt_s(h["floor_s"]) if h.get("floor_s") is not None else "–"
            fast_s = fmt_s(h["fast_s"]) if h.get("fast_s") is not None else "–"
            L.append(f"| {h['sweep']} | {SHORT[h['vs']]} | ≥{h['target']:.0f}x | {measured} | "
                     f"{met} | {fast_s} | {needs} | {floor} |")
        L += ["", "*target needs* = the compared implementation's time / the target ratio; "
              "*compute floor* = the fast engine's `layer_tokens` (the (row, layer, position) "
              "triples a patch can change, from `result.extra`) × this run's cost of one "
              "layer-token in a plain batched forward (64 copies of the sweep's first prompt "
              "through the decoder stack, min over the repeats). The floor leaves out the base "
              "and source runs and every per-call cost, but the engine's larger batches can run "
              "a few percent cheaper per layer-token than the 64-row one: an estimate of the "
              "least time an exact engine needs, not a strict bound. A target that needs well "
              "under the floor cannot be met without approximating.", ""]
    for res in report["sweeps"]:
        L += [f"## {res['title']}", "",
              f"`--only {res['name']}`; {res['n_cells']} cells × {res['n_pairs']} "
              f"{'prompt' if res['reference'] == 'loop' else 'pair'}(s), "
              f"layers {'all' if res['layers'] is None else res['layers']}, mean "
              f"{res['mean_tokens']:.2f} tokens; plain batch-1 forward "
              f"{res['plain_forward_s'] * 1000:.1f} ms. First prompt: "
              f"\"{res['prompts'][0]}\".", "",
              "| implementation | seconds (min) | runs | fast is N× faster | speed-up over reference | "
              "max abs diff | forward-eq | work (batch-1 fwd) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for rec in res["impls"]:
            if "seconds" not in rec:
                L.append(f"| {rec['label']} | {rec['not_run']} | | | | | | {rec['rows']} |")
                continue
            work = f"{rec['rows']}"
            if "floor_forward_equivalents" in rec:
                work = f"{rec['floor_forward_equivalents']:.1f} (floor)"
            elif rec["impl"] == "fast":
                work = "– (not in result.extra)"
            diff = "reference" if rec["impl"] == res["reference"] else f"{rec['max_abs_diff']:.1e}"
            seconds = fmt_s(rec["seconds"])
            if rec.get("sampled"):
                sm = rec["sampled"]
                seconds = (f"{seconds} (timed on {sm['k']} of {sm['of']} {sm['what']}: "
                           f"{fmt_s(min(sm['unscaled_times']))}, ×{sm['scale']:.3g})")
            L.append(f"| {rec['label']} | {seconds} | {rec['runs']} | "
                     f"{fmt_ratio(rec['fast_speedup'])} | {fmt_ratio(rec['vs_naive'])} | {diff} | "
                     f"{rec['forward_equivalents']:.1f} | {work} |")
        sampled = next((r["sampled"] for r in res["impls"] if r.get("sampled")), None)
        if sampled:
            what = sampled["what"]
            how = ("one more, untimed, fast run on the same pairs" if what == "pairs" else
                   "fast's columns of the same neurons")
            L += ["", f"The naive reference ran on the first {sampled['k']} of "
                  f"{sampled['of']} {what}{' of each layer' if what == 'neurons' else ''} "
                  f"(one forward per patch and pair) and its time is scaled "
                  f"×{sampled['scale']:.3g}; causalpatch fast's *max abs diff* is against it on "
                  f"those {what} ({how}); the other rows' *max abs diff* is against causalpatch "
                  f"fast over the whole sweep."]
        mems = [r for r in res["impls"] if r.get("memory")]
        if mems:
            L += ["", "| implementation | rows per pass | peak RSS (MiB) | added (MiB) | plain "
                  "forward, same rows: peak / added (MiB) | peak ratio | added ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
            for rec in mems:
                m = rec["memory"]
                if "error" in m:
                    L.append(f"| {rec['label']} | – | probe failed: {m['error']} | | | | |")
                    continue
                p = m.get("plain", {})
                plain = f"{p['peak_mib']:.0f} / {p['added_mib']:.0f}" if "peak_mib" in p else "–"
                pr = f"{m['peak_ratio']:.2f}" if "peak_ratio" in m else "–"
                if "peak_ratio" in m and m["peak_ratio"] > MEMORY_TARGET:
                    pr = f"**{pr}**"
                ar = f"{m['added_ratio']:.2f}" if "added_ratio" in m else "–"
                rpp = m.get("rows_per_pass") or rec.get("rows_per_pass") or "–"
                L.append(f"| {rec['label']} | {rpp} | {m['peak_mib']:.0f} | {m['added_mib']:.0f}"
                         f" | {plain} | {pr} | {ar} |")
        fast = next(r for r in res["impls"] if r["impl"] == "fast")
        if fast.get("engine_stats"):
            L += ["", "Fast engine: " + ", ".join(f"{k} {v}" for k, v in
                                                 fast["engine_stats"].items())
                  + f", layer_tokens {fast['layer_tokens']}."]
        if fast.get("floor_s") is not None and res.get("unit_cost_s"):
            L += ["", f"Compute floor: {fast['layer_tokens']} layer-tokens × "
                  f"{res['unit_cost_s'] * 1e6:.1f} µs (one layer-token of a plain batched "
                  f"forward, {UNIT_ROWS} rows) = {fmt_s(fast['floor_s'])} s; causalpatch fast "
                  f"took {fmt_s(fast['seconds'])} s ({fast['seconds'] / fast['floor_s']:.2f}× "
                  f"the floor)."]
        L.append("")
    if NOTES.exists():  # hand-written reading of the numbers, kept beside the script
        L += [NOTES.read_text(encoding="utf-8").rstrip(), ""]
    L += ["Raw numbers: the `--json` output.", ""]
    return "\n".join(L)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes, one repeat (smoke test); does not write the docs "
                             "unless --out is given")
    parser.add_argument("--only", action="append", default=None, metavar="NAME",
                        help=f"run only these sweeps (repeatable or comma-separated): "
                             f"{', '.join(SWEEPS)}")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (quick: 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write all numbers here")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/")
    parser.add_argument("--out", default=None,
                        help="markdown page (default docs/benchmarks.md; quick: none)")
    parser.add_argument("--skip-peers", action="store_true", help="no TransformerLens / nnsight")
    parser.add_argument("--impls", default=",".join(IMPL_ORDER),
                        help="implementations to run, comma-separated (causalpatch fast and the "
                             f"reference always run); default {','.join(IMPL_ORDER)}")
    parser.add_argument("--memory", choices=("all", "fast", "none"), default=None,
                        help="memory probes for every implementation (default), causalpatch "
                             "fast only (quick default), or none")
    parser.add_argument("--peer-budget", type=float, default=1200.0, metavar="S",
                        help="skip a peer whose estimated time per run exceeds S seconds "
                             "(reported as 'not run'); default 1200")
    parser.add_argument("--max-repeat-seconds", type=float, default=None, metavar="S",
                        help="do not repeat an implementation whose first run took over S s")
    parser.add_argument("--naive-pairs", type=int, default=None, metavar="K",
                        help="time the naive reference of a dataset sweep on its first K pairs "
                             "and scale (checked against fast on those pairs); default all")
    parser.add_argument("--naive-neurons", type=int, default=None, metavar="K",
                        help="time the naive reference of an all-neuron mlp_neuron sweep on the "
                             "first K neurons of each layer and scale; default all")
    parser.add_argument("--peer-sweeps", default=None, metavar="NAMES",
                        help="run TransformerLens / nnsight only on these sweeps "
                             "(comma-separated); default every sweep")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="only rewrite the page from a run's --json output (no timing)")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe, args.quick, args.threads)
        return
    if args.render:
        report = json.loads(Path(args.render).read_text(encoding="utf-8"))
        out = args.out or str(ROOT / "docs" / "benchmarks.md")
        Path(out).write_text(render_markdown(report), encoding="utf-8")
        print(f"wrote {out} from {args.render}")
        return
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.memory = args.memory or ("fast" if args.quick else "all")
    names = list(SWEEPS)
    if args.only:
        names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
        bad = [n for n in names if n not in SWEEPS]
        if bad:
            parser.error(f"unknown sweep(s) {bad}; choose from {', '.join(SWEEPS)}")
    out_md = None if args.no_write else (
        args.out or (None if args.quick else str(ROOT / "docs" / "benchmarks.md")))

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(args.threads)
    load_before = loadavg()
    from causalpatch import InterpretableModel

    t0 = time.perf_counter()
    model = InterpretableModel("smollm2")
    load_s = time.perf_counter() - t0
    sizes = QUICK if args.quick else FULL
    sweeps = build_sweeps(model, sizes, names)
    args.impls = [k.strip() for k in args.impls.split(",") if k.strip()]
    if args.peer_sweeps:
        args.peer_sweeps = [k.strip() for k in args.peer_sweeps.split(",") if k.strip()]
    if args.skip_peers:
        args.impls = [k for k in args.impls if k not in ("tl", "nnsight")]
    peers_ = make_peers(model, [k for k in ("tl", "nnsight") if k in args.impls])
    print(f"loaded in {load_s:.1f} s; sweeps: {', '.join(names)}; repeats {args.repeats}; "
          f"threads {args.threads}; peers: {', '.join(peers_) or 'none'}", flush=True)

    cost_per_row: dict[str, float] = {}
    results = [run_sweep(sw, model, peers_, args, cost_per_row) for sw in sweeps]
    del peers_
    gc.collect()
    add_memory(results, args)

    report = {
        "command": "python benchmarks/bench_patching.py" + (
            " " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(), "versions": versions(), "load_s": load_s,
        "load_before": load_before, "load_after": loadavg(),
        "config": {"quick": args.quick, "repeats": args.repeats, "threads": args.threads,
                   "sizes": sizes.__dict__, "memory": args.memory,
                   "peer_budget_s": args.peer_budget,
                   "max_repeat_seconds": args.max_repeat_seconds,
                   "naive_pairs": args.naive_pairs, "naive_neurons": args.naive_neurons,
                   "peer_sweeps": args.peer_sweeps},
        "sweeps": results,
    }
    report["headline"] = headline(results)
    md = render_markdown(report)
    print()
    print(md)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
        print(f"wrote {args.json}")
    if out_md:
        Path(out_md).write_text(md, encoding="utf-8")
        print(f"wrote {out_md}")


if __name__ == "__main__":
    main()
