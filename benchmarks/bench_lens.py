"""Logit lens and direct logit attribution on SmolLM2-135M, against one plain forward pass.

Times, interleaved over ``--repeat`` rounds (the minimum of each, so load from other work on
the machine hits every side alike), on one prompt:

* ``forward``: one plain Hugging Face forward (``hf_model(input_ids)``, logits at every
  position, no hooks) — the unit of every ratio;
* ``lens``: :func:`causalpatch.logit_lens` over all 30 layers x every position, with the
  answer's probability and rank, top-5, entropy and KL, logits kept;
* ``lens_last``: the same at the last position only (``positions=[-1]``);
* ``lens_forward``: the lens's own forward alone (one forward reading the 30 ``resid_post``
  at every position, the model's unembedding at the last position only), no readout;
* ``unembed_floor``: only the arithmetic the lens cannot avoid: the final norm and the
  unembedding of the 30 x positions residual vectors (``runtime.unembed`` on a
  ``[30, pos, d_model]`` tensor), without the forward or any statistic;
* ``dla_component``, ``dla_head``, ``dla_neuron``:
  :func:`causalpatch.direct_logit_attribution` per unit.

Targets from the issue: the lens over all layers x positions within 1.5x one forward, per-head
DLA within 2x. The lens's floor: one forward on SmolLM2 costs about 269 MFLOP per token, of
which the unembedding (49152 x 576) is 57 MFLOP; reading out 30 layers costs 30 unembeddings,
about 6.3 forwards of arithmetic per token, so the all-positions lens cannot reach 1.5x with
full-vocabulary statistics (``unembed_floor`` measures that part on its own); at one position
the unembeddings are ~30 x 57 MFLOP against a forward over the whole prompt.

Run: ``python benchmarks/bench_lens.py`` (``--repeat``, ``--threads``, ``--prompt``). Prints a
table and ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

PROMPT = "When Mary and John went to the store, John gave a drink to"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--json", default=None, help="write the timings to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from causalpatch import InterpretableModel, direct_logit_attribution, logit_lens

    model = InterpretableModel("smollm2")
    prompt = args.prompt
    ids = model.to_tokens(prompt)
    n_pos = ids.shape[1]
    ioi = dict(correct=" Mary", incorrect=" John")
    with torch.no_grad():
        _, cache = model.run_with_cache(prompt, names=[
            f"blocks.{layer}.resid_post" for layer in range(model.n_layers)])
    hidden = torch.stack([cache[f"blocks.{layer}.resid_post"][0]
                          for layer in range(model.n_layers)])

    def forward() -> None:
        with torch.no_grad():
            model.hf_model(input_ids=ids)

    from causalpatch.methods.lens import _read
    from causalpatch.tokens import make_batch

    names = [f"blocks.{layer}.resid_post" for layer in range(model.n_layers)]
    rows, cols = torch.zeros(n_pos, dtype=torch.long), torch.arange(n_pos)

    def lens_forward() -> None:
        _read(model, make_batch([ids[0].tolist()], model.pad_token_id, model.device), names,
              rows, cols, full_logits=False)

    def floor() -> None:
        with torch.no_grad():
            model.runtime.unembed(hidden, model.config)

    runs = {
        "forward": forward,
        "lens": lambda: logit_lens(model, prompt, answer=" Mary"),
        "lens_last": lambda: logit_lens(model, prompt, answer=" Mary", positions=[-1]),
        "lens_forward": lens_forward,
        "unembed_floor": floor,
        "dla_component": lambda: direct_logit_attribution(model, prompt, "component", **ioi),
        "dla_head": lambda: direct_logit_attribution(model, prompt, "head", **ioi),
        "dla_neuron": lambda: direct_logit_attribution(model, prompt, "neuron", **ioi),
    }
    for fn in runs.values():  # warm-up
        fn()
    best = {name: float("inf") for name in runs}
    for _ in range(args.repeat):
        for name, fn in runs.items():
            best[name] = min(best[name], _timed(fn))

    check = direct_logit_attribution(model, prompt, "head", **ioi)
    lens = logit_lens(model, prompt, answer=" Mary")
    with torch.no_grad():
        logits = model.hf_model(input_ids=ids).logits[0]
    base = best["forward"]
    print(f"SmolLM2-135M, {n_pos} tokens, {torch.get_num_threads()} threads, min of "
          f"{args.repeat}")
    print(f"{'run':<16}{'ms':>10}{'x forward':>12}")
    for name, seconds in best.items():
        print(f"{name:<16}{seconds * 1e3:>10.1f}{seconds / base:>12.2f}")
    print(f"floor (lens_forward + unembed_floor): "
          f"{(best['lens_forward'] + best['unembed_floor']) / base:.2f} x forward")
    print(f"lens last layer vs logits: max |diff| = "
          f"{(lens.logits[-1] - logits).abs().max().item():.2e}")
    print(f"DLA per head: parts sum {sum(check.parts.values()):.6f}, logit diff "
          f"{check.logit_diff:.6f} (gap {check.sum_error:.1e}); top heads {check.top(3)}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"n_tokens": n_pos, "threads": torch.get_num_threads(),
                       "repeat": args.repeat, "seconds": best,
                       "ratios": {k: v / base for k, v in best.items()}}, fh, indent=2)


if __name__ == "__main__":
    main()
