"""Timings of path patching and causal tracing on SmolLM2-135M, and the ROME figures.

Two parts, one model load:

* ``path``: IOI (``IOIDataset``, 32 pairs by default). First the direct effect of every head
  on the logits (``receivers="logits"``), which picks out name-mover-like heads; then every
  head's effect through the queries of the top three of those heads (``receiver_input="q"``),
  which picks out the heads that tell the name movers where to look (S-inhibition-like).
  Prints both wall times (target: under 60 s each) and the top heads.
* ``rome``: causal tracing averaged over ROME's known facts that SmolLM2 gets right (100 by
  default), in ROME's six position groups, with the MLP and attention windows of 10 layers as
  in the paper's figures; writes ``docs/img/rome_mlp.png`` and ``docs/img/rome_attn.png``
  (``--out-json`` also saves the results). This takes a while on a CPU: about
  ``n_facts x n_samples x 7 s`` with one free core.

* ``speed``: the two methods against their naive loops in one run, one model load:
  path patching of every head to the logits on one IOI pair against three full forward passes
  per sender (written out with plain interventions), and causal tracing of one ~10-token
  prompt (3 components x 30 layers x every position x 10 noise samples) against one forward
  pass per (component, layer, position, sample). The causal-tracing loop is timed on a seeded
  random subset of its forwards (``--naive-forwards``) and scaled to the whole loop (every
  forward has the same size); the path-patching loop is timed in full.

Run: ``python benchmarks/bench_methods.py path``, ``... rome``, ``... speed`` or ``... all``
(``--threads``, ``--pairs``, ``--facts``, ``--samples``, ``--window``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"


def bench_path(model, n_pairs: int, seed: int = 0) -> dict:
    """Time the two IOI path-patching sweeps; returns timings and top heads."""
    from causalpatch import path_patching
    from causalpatch.datasets import IOIDataset

    ioi = IOIDataset(model, n=n_pairs, seed=seed)
    path_patching(model, ioi.subset([0]), senders="attn_head", receivers="logits")  # warm-up
    t0 = time.perf_counter()
    direct = path_patching(model, ioi, senders="attn_head", receivers="logits")
    t_direct = time.perf_counter() - t0
    print(f"path patching, every head -> logits, {len(ioi)} IOI pairs: {t_direct:.1f} s")
    print(direct.summary())
    movers = [idx for idx, value in direct.top_components(3, by="value") if value > 0]
    t0 = time.perf_counter()
    via_q = path_patching(model, ioi, senders="attn_head", receivers=movers, receiver_input="q")
    t_q = time.perf_counter() - t0
    print(f"\npath patching, every head -> queries of {movers}, {len(ioi)} pairs: {t_q:.1f} s")
    print(via_q.summary())
    return {"n_pairs": len(ioi), "direct_s": t_direct, "via_q_s": t_q, "movers": movers,
            "direct_top": direct.top_components(5), "via_q_top": via_q.top_components(5)}


def bench_rome(model, n_facts: int, n_samples: int, window: int, seed: int = 0,
               out_json: str | None = None) -> dict:
    """Average causal tracing over known facts; writes the two ROME figures."""
    from causalpatch import causal_tracing_dataset
    from causalpatch.datasets import known_facts

    facts = known_facts(model, n_facts, seed=seed)
    print(f"{len(facts)} known facts that {model.name} gets right")
    done = [time.perf_counter()]

    def progress(k: int, total: int) -> None:
        if k % 10 == 0 or k == total:
            elapsed = time.perf_counter() - done[0]
            print(f"  {k}/{total} facts, {elapsed:.0f} s", flush=True)

    t0 = time.perf_counter()
    result = causal_tracing_dataset(model, facts, noise=3.0, samples=n_samples, seed=seed,
                                    components=("mlp", "attn"), window=window,
                                    progress=progress)
    elapsed = time.perf_counter() - t0
    print(f"causal tracing of {len(facts)} facts ({n_samples} noise samples, window {window}): "
          f"{elapsed:.0f} s")
    print(result.summary())
    IMG.mkdir(parents=True, exist_ok=True)
    for kind in ("mlp", "attn"):
        res = result[kind]
        title = (f"Restoring {'MLP' if kind == 'mlp' else 'attention'} outputs "
                 f"(window {window}) — {model.name}, {len(facts)} known facts, "
                 f"{n_samples} noise samples")
        fig = result.plot(kind, title=title)
        path = IMG / f"rome_{kind}.png"
        fig.savefig(path, dpi=130)
        print(f"wrote {path}")
        print("mean IE per group (max over layers, at layer):")
        for g, name in enumerate(res.labels["group"]):
            column = res.effect_matrix[:, g]
            print(f"  {name:>24}: {float(column.max()):+.4f} at layer {int(column.argmax())}"
                  f"  (n={res.extra['group_counts'][g]})")
    print(f"p_clean {float(result.p_clean.mean()):.3f}, p_corrupted "
          f"{float(result.p_corrupted.mean()):.3f}")
    if out_json:
        payload = {kind: json.loads(result[kind].to_json()) for kind in result}
        payload["p_clean"] = result.p_clean.tolist()
        payload["p_corrupted"] = result.p_corrupted.tolist()
        Path(out_json).write_text(json.dumps(payload), encoding="utf-8")
        print(f"wrote {out_json}")
    return {"n_facts": len(facts), "seconds": elapsed}


def _naive_path_patching(model, clean: list[int], corrupted: list[int], correct: int,
                         incorrect: int) -> tuple[float, list[float]]:
    """Three forwards per sender (freeze="heads", noising): cache, frozen run, patched run."""
    import causalpatch.interventions as iv

    n, H = model.n_layers, model.n_heads
    clean = model.to_tokens(clean)[0].tolist()
    corrupted = model.to_tokens(corrupted)[0].tolist()
    z_names = [f"blocks.{layer}.attn.z" for layer in range(n)]
    final = f"blocks.{n - 1}.resid_post"
    t0 = time.perf_counter()
    effects = []
    base_ld = source_ld = None
    for layer in range(n):
        for head in range(H):
            base = model.trace([clean], cache=z_names).run()  # 1: base and source caches
            source = model.trace([corrupted], cache=[z_names[layer]]).run()
            if base_ld is None:
                base_ld = float(base.last_logits[0, correct] - base.last_logits[0, incorrect])
                s_last = source.last_logits[0]
                source_ld = float(s_last[correct] - s_last[incorrect])
            frozen = {}
            for other in range(n):
                z = base.cache[z_names[other]].clone()
                if other == layer:
                    z[:, :, head] = source.cache[z_names[layer]][:, :, head]
                frozen[z_names[other]] = iv.replace_with(z)
            resid = model.trace([clean], interventions=frozen, cache=[final]).run().cache[final]
            out = model.trace([clean], interventions={final: iv.replace_with(  # 3: patched run
                resid[:, -1:], positions=[len(clean) - 1])}).run().last_logits[0]
            effects.append((float(out[correct] - out[incorrect]) - base_ld)
                           / (source_ld - base_ld))
    return time.perf_counter() - t0, effects


def bench_speed(model, naive_forwards: int, seed: int = 0) -> dict:
    """Fast methods against their naive loops, same run."""
    from causalpatch import causal_tracing, path_patching
    from causalpatch.datasets import IOIDataset
    import causalpatch.interventions as iv

    pair = IOIDataset(model, n=1, seed=seed)
    clean, corrupted = pair.clean[0], pair.corrupted[0]
    good, bad = model.to_single_token(pair.correct[0]), model.to_single_token(pair.incorrect[0])
    path_patching(model, pair, senders="attn_head", receivers="logits")  # warm-up
    fast_s = []
    for _ in range(3):
        t0 = time.perf_counter()
        fast = path_patching(model, pair, senders="attn_head", receivers="logits")
        fast_s.append(time.perf_counter() - t0)
    naive_s, naive = _naive_path_patching(model, clean, corrupted, good, bad)
    diff = max(abs(a - b) for a, b in zip(fast.effect_matrix.flatten().tolist(), naive))
    print(f"path patching, {model.n_layers * model.n_heads} heads -> logits, 1 IOI pair: fast "
          f"{min(fast_s):.2f} s, naive (3 forwards per sender) {naive_s:.1f} s: "
          f"{naive_s / min(fast_s):.0f}x; max |fast - naive| {diff:.1e}")

    prompt, subject = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
    kinds = ("resid_post", "mlp", "attn")
    t0 = time.perf_counter()
    traced = causal_tracing(model, prompt, subject, samples=10, components=kinds,
                            position_groups=False)
    trace_s = time.perf_counter() - t0
    ids = model.to_tokens(prompt)[0].tolist()
    T, n = len(ids), model.n_layers
    span = traced.spans[0]
    noise = traced.noise[0]
    answer = traced.answers[0]
    clean_cache = model.trace([ids], cache=[f"blocks.{layer}.{k}" for k in kinds
                                            for layer in range(n)]).run().cache
    cells = [(k, layer, p, smp) for k in kinds for layer in range(n) for p in range(T)
             for smp in range(noise.shape[0])]
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(cells), generator=gen)[:naive_forwards].tolist()
    full_noise = torch.zeros(noise.shape[0], T, model.d_model)
    full_noise[:, span[0]:span[1]] = noise
    t0 = time.perf_counter()
    for c in chosen:
        kind, layer, p, smp = cells[c]
        restore = {}
        layers = [layer] if kind == "resid_post" else [
            x for x in range(layer - 5, layer + 5) if 0 <= x < n]
        for x in layers:
            name = f"blocks.{x}.{kind}"
            restore[name] = iv.replace_with(clean_cache[name][:, p:p + 1], positions=[p])
        restore["embed"] = iv.add(full_noise[smp].to(model.dtype))
        model.trace([ids], interventions=restore).run()
    per_forward = (time.perf_counter() - t0) / len(chosen)
    naive_total = per_forward * len(cells)
    print(f"causal tracing, {T} tokens x {n} layers x 3 components x 10 samples: fast "
          f"{trace_s:.1f} s, naive {len(cells)} forwards x {per_forward * 1e3:.1f} ms = "
          f"{naive_total:.0f} s (timed on {len(chosen)}): {naive_total / trace_s:.0f}x")
    return {"path_fast_s": min(fast_s), "path_naive_s": naive_s, "path_max_diff": diff,
            "trace_fast_s": trace_s, "trace_naive_s": naive_total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["path", "rome", "speed", "all"], nargs="?",
                        default="path")
    parser.add_argument("--naive-forwards", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--facts", type=int, default=100)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--out-json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from causalpatch import InterpretableModel

    model = InterpretableModel("smollm2")
    print(f"{model!r}\ntorch threads: {args.threads}\n")
    if args.part in ("path", "all"):
        bench_path(model, args.pairs)
    if args.part in ("speed", "all"):
        bench_speed(model, args.naive_forwards)
    if args.part in ("rome", "all"):
        bench_rome(model, args.facts, args.samples, args.window, out_json=args.out_json)


if __name__ == "__main__":
    main()
