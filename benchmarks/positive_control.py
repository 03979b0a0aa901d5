"""The positive control's numbers: every method on the induction model, whose circuit is known.

The model (``tests/data/induction_model``, trained by ``scripts/train_induction_model.py``) and
everything about the circuit (how it is found without patching, the prompts, the corruption)
come from ``tests/methods/test_positive_control.py``, whose tests assert the same claims on
the same prompts; this script records the numbers behind ``docs/positive_control.md``, with
95% bootstrap intervals over the pairs wherever the result supports ``ci()``.

Run (one thread, about a minute)::

    python benchmarks/positive_control.py --json docs/data/positive_control.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT / "tests"), str(REPO_ROOT / "tests" / "methods"),
                str(REPO_ROOT / "src")]

#: Bootstrap resamples of every interval, and the generator of the resampling.
N_BOOT, BOOT_SEED = 1000, 0
#: Causal tracing: noise draws per prompt and the noise generator (prompt i uses NOISE_SEED + i).
SAMPLES, NOISE_SEED = 10, 0
#: The untrained control's initialisation.
RANDOM_INIT_SEED = 0


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cell(result: Any, coords: tuple[int, ...], interval: tuple[torch.Tensor, torch.Tensor] | None
         ) -> dict[str, Any]:
    """One cell's effect (and its interval) with its coordinates."""
    # + 0.0: a -0.0 effect (a product with a zero change) is written as 0.0
    out: dict[str, Any] = {"cell": list(coords),
                           "effect": float(result.effect_matrix[coords]) + 0.0}
    if interval is not None:
        out["ci95"] = [float(interval[0][coords]) + 0.0, float(interval[1][coords]) + 0.0]
    return out


def top(result: Any, k: int, interval: tuple[torch.Tensor, torch.Tensor] | None = None
        ) -> list[dict[str, Any]]:
    return [cell(result, coords, interval) for coords, _ in result.top_cells(k)]


def edges(result: Any, k: int, known: set[tuple[str, str]]) -> dict[str, Any]:
    """The top ``k`` edges and the rank (1 = largest |score|) of each known edge."""
    order = torch.argsort(torch.where(result.scored, result.scores.abs(),
                                      torch.full_like(result.scores, -1.0)),
                          descending=True, stable=True).tolist()
    names = [result.graph.edge_names(i) for i in order]
    return {"top": [{"edge": f"{s} -> {d}", "score": sc} for s, d, sc in result.top(k)],
            "known_ranks": {f"{s} -> {d}": names.index((s, d)) + 1 for s, d in sorted(known)},
            "max_abs": float(result.scores[result.scored].abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the numbers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    import transformers
    from test_positive_control import (AFTER_FIRST, CORRUPTED_POS, HELDOUT_SEED, LAST, N_PAIRS,
                                       N_SEQUENCES, TRACED, corrupted_pairs, identify_circuit,
                                       induction_model, known_edges, patterns,
                                       random_init_model)

    from causalpatch import (activation_patching, attribution_patching, causal_tracing,
                             edge_attribution, path_patching)

    def ci(result: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return result.ci(n_boot=N_BOOT, seed=BOOT_SEED)

    model = induction_model()
    circuit = identify_circuit(model)
    (_, p), (_, i) = circuit.previous_token, circuit.induction
    pairs, value_pairs = corrupted_pairs(), corrupted_pairs(at=AFTER_FIRST)
    out: dict[str, Any] = {
        "command": "python benchmarks/positive_control.py --json " + str(args.json),
        "commit": commit(), "torch": torch.__version__, "transformers": transformers.__version__,
        "machine": platform.processor() or platform.machine(), "threads": 1,
        "seed": {"heldout_sequences": HELDOUT_SEED, "pairs": HELDOUT_SEED + 1,
                 "causal_tracing_noise": NOISE_SEED, "random_init": RANDOM_INIT_SEED,
                 "bootstrap": BOOT_SEED},
        "n_boot": N_BOOT,
        "training": {k: v for k, v in json.loads(
            (REPO_ROOT / "tests/data/induction_model/training.json").read_text()).items()
            if k != "history"},
        "positions": {"corrupted": CORRUPTED_POS, "after_first": AFTER_FIRST, "last": LAST},
        "n_pairs": N_PAIRS,
    }

    # -- (0) the circuit without patching ---------------------------------------------------
    out["circuit"] = {
        "n_sequences": N_SEQUENCES,
        "previous_token_head": list(circuit.previous_token),
        "induction_head": list(circuit.induction),
        "previous_token_scores": circuit.previous_token_scores.tolist(),
        "induction_scores": circuit.induction_scores.tolist(),
        "copying_scores": circuit.copying_scores.tolist(),
        "copying_scores_layer0_max_abs": float(circuit.copying_scores[0].abs().max()),
    }

    # -- (a) activation patching ------------------------------------------------------------
    heads = activation_patching(model, pairs, component="attn_head", by_position=True,
                                metric="logprob")
    heads_ci = ci(heads)
    out["activation_patching"] = {
        "clean_logprob": heads.clean_metric, "corrupted_logprob": heads.corrupted_metric,
        "top": top(heads, 4, heads_ci),
        "previous_token_head_at_corrupted": cell(heads, (0, CORRUPTED_POS, p), heads_ci),
        "cells_ci_excluding_0": int(((heads_ci[0] > 0) | (heads_ci[1] < 0)).sum()),
        "n_cells": heads.effect_matrix.numel(),
    }
    value = activation_patching(model, value_pairs, component="attn_head", by_position=True,
                                metric="logprob")
    value_ci = ci(value)
    out["control_value_corruption"] = {
        "corrupted_logprob": value.corrupted_metric,
        "induction_head_at_last": cell(value, (1, LAST, i), value_ci),
        "previous_token_head_at_after_first": cell(value, (0, AFTER_FIRST, p), value_ci),
    }

    # -- (b) path patching: previous-token head -> induction head, per input ----------------
    out["path_patching"] = {}
    for direction in ("noise", "denoise"):
        row = {}
        for kind in ("q", "k", "v"):
            r = path_patching(model, pairs, senders=[circuit.previous_token],
                              receivers=[circuit.induction], receiver_input=kind,
                              metric="logprob", direction=direction)
            row[kind] = cell(r, (0,), ci(r))
        out["path_patching"][direction] = row
    direct = path_patching(model, pairs, senders="attn_head", receivers="logits",
                           metric="logprob")
    out["path_patching"]["direct_to_logits"] = top(direct, 3, ci(direct))

    # -- (c) causal tracing: noise on the first a_k -----------------------------------------
    traced: dict[str, Any] = {}
    for n_prompts in (TRACED, N_PAIRS):
        trace = causal_tracing(model, pairs.clean[:n_prompts],
                               (CORRUPTED_POS, CORRUPTED_POS + 1),
                               answer=pairs.correct[:n_prompts],
                               components=("resid_post", "attn"), window=1,
                               position_groups=False, samples=SAMPLES, seed=NOISE_SEED)
        row = {"p_clean": float(trace.p_clean.mean()),
               "p_noised": float(trace.p_corrupted.mean()), "samples": SAMPLES}
        for kind in ("resid_post", "attn"):
            res, interval = trace[kind], ci(trace[kind])
            row[kind] = {
                "layer0_at_corrupted": cell(res, (0, CORRUPTED_POS), interval),
                "layer0_at_after_first": cell(res, (0, AFTER_FIRST), interval),
                "layer0_max_abs_elsewhere": float(res.effect_matrix[
                    0, [t for t in range(LAST + 1) if t != AFTER_FIRST]].abs().max()),
                "layer1_at_last": cell(res, (1, LAST), interval),
                "layer1_max_abs_elsewhere": float(res.effect_matrix[1, :LAST].abs().max()),
            }
        traced[str(n_prompts)] = row
    out["causal_tracing"] = traced

    # -- (d) attribution patching ------------------------------------------------------------
    out["attribution_patching"] = {}
    key_exact = activation_patching(model, pairs, component="attn_head_k", by_position=True,
                                    metric="logprob", layers=[1])
    for method in ("atp", "atp*"):
        r = attribution_patching(model, pairs, component="attn_head", by_position=True,
                                 metric="logprob", method=method)
        k = attribution_patching(model, pairs, component="attn_head_k", by_position=True,
                                 metric="logprob", method=method, layers=[1])
        out["attribution_patching"][method] = {
            "top": top(r, 3, ci(r)),
            "induction_key_at_after_first": cell(k, (0, AFTER_FIRST, i), ci(k)),
        }
    out["attribution_patching"]["exact_induction_key_at_after_first"] = cell(
        key_exact, (0, AFTER_FIRST, i), ci(key_exact))
    # the attention step the first-order estimates cross: the induction head's attention from
    # the last position to k+1, mean over pairs, in each run
    out["attribution_patching"]["induction_attention_last_to_after_first"] = {
        name: float(patterns(model, prompts)[:, 1, i, LAST, AFTER_FIRST].mean())
        for name, prompts in (("clean", pairs.clean), ("corrupted", pairs.corrupted))}

    # -- (e) edge attribution ----------------------------------------------------------------
    known, known_value = known_edges(circuit), known_edges(circuit, value=True)
    out["edge_attribution"] = {
        "exact_noise": edges(edge_attribution(model, pairs, method="exact", metric="logprob"),
                             5, known),
        "exact_denoise": edges(edge_attribution(model, pairs, method="exact", metric="logprob",
                                                direction="denoise"), 5, known),
        "eap_denoise": edges(edge_attribution(model, pairs, method="eap", metric="logprob",
                                              direction="denoise"), 5, known),
        "eap_noise": edges(edge_attribution(model, pairs, method="eap", metric="logprob"),
                           5, known),
        "eap_ig_noise": edges(edge_attribution(model, pairs, method="eap_ig",
                                               metric="logprob"), 5, known),
        "control_value_exact_noise": edges(edge_attribution(
            model, value_pairs, method="exact", metric="logprob"), 3, known_value),
    }

    # -- negative control: the same configuration, untrained ---------------------------------
    control = random_init_model(seed=RANDOM_INIT_SEED)
    found = identify_circuit(control)
    r = activation_patching(control, pairs, component="attn_head", by_position=True,
                            metric="logprob")
    interval = ci(r)
    out["control_random_init"] = {
        "previous_token_scores_max": float(found.previous_token_scores.max()),
        "induction_scores_max": float(found.induction_scores.max()),
        "clean_logprob": r.clean_metric, "corrupted_logprob": r.corrupted_metric,
        "top": top(r, 3, interval),
        "cells_ci_excluding_0": int(((interval[0] > 0) | (interval[1] < 0)).sum()),
        "n_cells": r.effect_matrix.numel(),
    }

    out["seconds"] = round(time.perf_counter() - t0, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json} in {out['seconds']} s")


if __name__ == "__main__":
    main()
