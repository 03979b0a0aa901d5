"""Shared test fixtures and the one copy of the tiny test models and tokenizer (the layout of
the suite and how to add tests: ``tests/README.md``).

Fixtures:

* ``smollm2``: the embedded SmolLM2-135M-Instruct (~17 s to load); mark its tests ``real``.
* ``tiny_family`` / ``tiny_lm``: every tiny random architecture of :data:`FAMILIES`
  (parametrised; each model is built once per session, so tests must leave it unchanged).
* ``make_tiny_lm``: the factory :func:`tiny_model`, for a test that needs its own fresh copy.
* ``family_model``: ``(family, own copy of its tiny model)`` for every family, one per module.
* ``small_llama``: :func:`small_id_llama`, the 3-layer token-id LLaMA (vocabulary 32, large
  initialisation) of the path-patching and causal-tracing tests, one per module.
* ``tiny_llama_dir``: the tiny LLaMA saved as a local Hugging Face folder (:func:`save_tiny_llama`),
  for tests that load from disk (Ray workers, accelerate placement), one per module.
* ``one_thread``: run a test with one torch thread. Tiny models need it: on a busy machine each
  2-thread matmul waits ~20 ms for the second thread, making a 1 ms forward take 0.5 s.
* ``naive_cache`` (and the session's autouse ``naive_cache_session``): the per-session memo of
  the naive engine's patched forwards (:class:`NaiveCache`; ``CAUSALPATCH_TEST_NAIVE_CACHE=0``
  turns it off).

Builders and helpers (plain functions, ``from conftest import ...``):

* :func:`tiny_hf_model` / :func:`tiny_model` (``family``, optional config changes) and
  :func:`tiny_tokenizer`; :data:`CONFIGS` per family.
* :func:`id_llama_hf` / :func:`id_llama`: a seeded tiny LLaMA for prompts given as token ids
  (:class:`IdTokenizer`); :func:`small_id_llama` is its 3-layer variant.
* :class:`TextPairs`: the smallest dataset the sweeps accept; :data:`IOI_PAIRS`: IOI-like pairs
  of equal token length on the tiny tokenizer.
* :data:`REFERENCE`, :func:`reference_qkv`, :func:`capture_modules`, :func:`first_tensor`:
  expected activations from plain PyTorch hooks, independent of causalpatch.
* :func:`checkpoint_cells`: finished cells in a checkpoint file.
* :func:`assert_matches_reference`: the one non-vacuity rule of every fast-vs-reference
  comparison (relative tolerance on the largest effect, and enough cells far above it).
* :func:`assert_within`: a named absolute bound for single values (baselines, sums), printing
  what it observed under ``CAUSALPATCH_TOL_REPORT=1``.
* :func:`neuron_sample`: the rows of an ``mlp_neuron`` sweep the naive loop checks (first,
  last, seeded picks per layer, and the largest fast effects).
* :data:`TESTS_DIR`, :data:`REPO_ROOT`: files are found from these, never from a test's own
  ``__file__``, so a test module reads the same files from any subfolder.

Tiny models: each builder seeds ``torch`` so the weights are identical on every call. The models
are small enough (3 layers, ``d_model`` 48-64, vocab 256) to build in milliseconds. The
tokenizer is a character-level BPE with a few whole-word merges (``" Mary"``, ``" Paris"``...)
so short answers are single tokens, exactly like a real tokenizer, while any ASCII text still
round-trips (``"abcdefghijkl"`` is 12 tokens).

:data:`REFERENCE` holds, per family, the Hugging Face module paths written out by hand. Tests
use them to compute expected values *independently* of :mod:`causalpatch.adapters`.

Test modules in every subfolder import the plain helpers with ``from conftest import ...``
(``pythonpath = ["tests"]`` in pyproject.toml puts ``tests/`` on ``sys.path``); prefer the
fixtures where a test only needs a model.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import string
import sys
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

torch.set_num_threads(2)

#: The ``tests/`` folder and the repository root: tests that read files by path start here, so
#: they do not depend on how deep in ``tests/`` they sit.
TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

VOCAB_SIZE = 256
SEED = 0

#: Words that become single tokens (with their leading space where they have one).
WORDS = (
    "The", "When", " the", " city", " of", " is", " in", " Eiffel", " Tower", " Paris",
    " Rome", " Mary", " John", " and", " went", " to", " store", " gave", " a", " drink",
)
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")


# -- tokenizer ---------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    tokens: list[str] = list(SPECIALS) + list(string.printable[:-5])  # printable minus \t\n...
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        for end in range(2, len(word) + 1):
            prefix, new = word[: end - 1], word[:end]
            if new not in tokens:
                tokens.append(new)
                merges.append((prefix, word[end - 1]))
    assert len(tokens) <= VOCAB_SIZE, len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level BPE tokenizer with whole-word merges for :data:`WORDS`.

    Pad id 0, no special tokens added when encoding; ``decode`` concatenates tokens.
    """
    vocab, merges = _vocab_and_merges()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[^ ]+| +"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
        eos_token="<eos>")


# -- tiny model configs ------------------------------------------------------------------------
def _common(**overrides: object) -> dict[str, object]:
    """Settings shared by the LLaMA-like configs; ``initializer_range`` is raised from 0.02 so
    that activations (and the effect of ablations) are far above float32 rounding."""
    base: dict[str, object] = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        initializer_range=0.1, tie_word_embeddings=False, pad_token_id=0, bos_token_id=2,
        eos_token_id=3,
    )
    base.update(overrides)
    return base


def _without_head_dim(**overrides: object) -> dict[str, object]:
    """:func:`_common` for configs that derive ``head_dim`` (64 / 4 = 16 all the same)."""
    cfg = _common(**overrides)
    cfg.pop("head_dim")
    return cfg


def gpt2_config() -> transformers.PretrainedConfig:
    return transformers.GPT2Config(
        vocab_size=VOCAB_SIZE, n_embd=48, n_layer=3, n_head=4, n_positions=128,
        initializer_range=0.1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        pad_token_id=0, bos_token_id=2, eos_token_id=3)


def llama_config() -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(**_common())


def mistral_config() -> transformers.PretrainedConfig:
    return transformers.MistralConfig(**_common(sliding_window=None))


def smollm3_config() -> transformers.PretrainedConfig:
    """SmolLM3: the LLaMA layout; layer 1 is a NoPE layer (no rotary embedding)."""
    return transformers.SmolLM3Config(**_without_head_dim(no_rope_layers=[1, 0, 1]))


def qwen2_config() -> transformers.PretrainedConfig:
    return transformers.Qwen2Config(**_without_head_dim())


def qwen3_config() -> transformers.PretrainedConfig:
    return transformers.Qwen3Config(**_common())


def gemma_config() -> transformers.PretrainedConfig:
    """Gemma 1: the LLaMA layout (no sandwich norms), embeddings scaled by sqrt(d_model)."""
    return transformers.GemmaConfig(**_common())


def gemma2_config() -> transformers.PretrainedConfig:
    """Gemma 2: sandwich norms, one sliding-window layer (window 4) between global ones, both
    soft-caps on."""
    return transformers.Gemma2Config(**_common(
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        sliding_window=4, query_pre_attn_scalar=16, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0))


def gemma3_config() -> transformers.PretrainedConfig:
    """Two sliding-window layers (window 4) and one global one, with soft-capping on."""
    return transformers.Gemma3TextConfig(**_common(
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=4, query_pre_attn_scalar=16, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0))


def _neox_config(parallel: bool) -> transformers.PretrainedConfig:
    return transformers.GPTNeoXConfig(
        vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5,
        use_parallel_residual=parallel, initializer_range=0.1, hidden_dropout=0.0,
        attention_dropout=0.0, tie_word_embeddings=False, pad_token_id=0, bos_token_id=2,
        eos_token_id=3)


#: Family name -> config builder. Family names are the config's ``model_type``, except the two
#: GPT-NeoX residual variants.
CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "gpt2": gpt2_config,
    "llama": llama_config,
    "mistral": mistral_config,
    "smollm3": smollm3_config,
    "qwen2": qwen2_config,
    "qwen3": qwen3_config,
    "gemma": gemma_config,
    "gemma2": gemma2_config,
    "gemma3_text": gemma3_config,
    "gpt_neox_parallel": lambda: _neox_config(True),
    "gpt_neox_sequential": lambda: _neox_config(False),
}

#: Every family name accepted by :func:`tiny_model`.
FAMILIES: list[str] = list(CONFIGS)


def tiny_hf_model(family: str, **config_changes: Any) -> transformers.PreTrainedModel:
    """A seeded random ``*ForCausalLM`` of ``family`` in eval mode (float32, CPU).

    ``config_changes`` are set on the family's config before the model is built
    (``tiny_hf_model("llama", tie_word_embeddings=True)``); the seed is the same.
    """
    if family not in CONFIGS:
        raise KeyError(f"unknown tiny family {family!r}; choose from {FAMILIES}")
    config = CONFIGS[family]()
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


def tiny_model(family: str) -> Any:
    """``InterpretableModel`` wrapping :func:`tiny_hf_model` and :func:`tiny_tokenizer`."""
    from causalpatch import InterpretableModel

    return InterpretableModel(tiny_hf_model(family), tokenizer=tiny_tokenizer())


# -- hand-written reference module paths -------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """Hand-written HF module paths of one family (``{L}`` is the layer index), read off the
    ``transformers`` modelling code rather than from :mod:`causalpatch.adapters`.

    Attributes:
        sites: canonical site kind -> ``(module path, "in" | "out")``: the activation is that
            module's first input or (first) output. ``attn`` and ``mlp`` are the modules whose
            output is added to the residual stream; ``resid_pre`` is the decoder layer.
        o_proj: the attention output projection whose *input* is the per-head ``z``.
        qkv: ``(q, k, v)`` projection paths (all three equal for fused projections).
        qkv_layout: ``"separate"``, ``"gpt2"`` (``[q|k|v]`` blocks) or ``"neox"`` (per-head
            interleaved ``[q_h|k_h|v_h]``).
        raw_paths: raw or short module path -> the canonical site kind it must alias.
        parallel: attention and MLP both read ``resid_pre`` (no ``resid_mid``).
    """

    sites: dict[str, tuple[str, str]]
    o_proj: str
    qkv: tuple[str, str, str]
    qkv_layout: str
    raw_paths: dict[str, str]
    parallel: bool = False


def _llama_like(norm_after: bool) -> Reference:
    """LLaMA/Mistral/SmolLM3/Qwen/Gemma 1 layout, or Gemma 2/3's sandwich norms when
    ``norm_after``."""
    lay = "model.layers.{L}"
    sites = {
        "embed": ("model.embed_tokens", "out"), "ln_final": ("model.norm", "out"),
        "resid_pre": (lay, "in"), "resid_post": (lay, "out"),
        "attn.in": (f"{lay}.input_layernorm", "out"),
        "attn.z": (f"{lay}.self_attn.o_proj", "in"),
        "mlp.post": (f"{lay}.mlp.down_proj", "in"),
        "mlp.gate": (f"{lay}.mlp.gate_proj", "out"), "mlp.up": (f"{lay}.mlp.up_proj", "out"),
    }
    if norm_after:  # Gemma 2/3: what is added to the residual is the post-norm output
        sites.update({
            "attn": (f"{lay}.post_attention_layernorm", "out"),
            "attn.raw": (f"{lay}.self_attn", "out"),
            "resid_mid": (f"{lay}.pre_feedforward_layernorm", "in"),
            "mlp.in": (f"{lay}.pre_feedforward_layernorm", "out"),
            "mlp": (f"{lay}.post_feedforward_layernorm", "out"),
            "mlp.raw": (f"{lay}.mlp", "out"),
        })
        # A layer's 'mlp' always means the canonical MLP site (here: after its post-norm); a raw
        # module path means that module's output, so 'self_attn' is the pre-norm attn.raw.
        raw = {"model.layers.{L}.mlp": "mlp", "layers.{L}.self_attn": "attn.raw",
               "model.layers.{L}.post_feedforward_layernorm": "mlp",
               "model.layers.{L}.pre_feedforward_layernorm": "mlp.in",
               "model.layers.{L}": "resid_post"}
    else:
        sites.update({
            "attn": (f"{lay}.self_attn", "out"),
            "resid_mid": (f"{lay}.post_attention_layernorm", "in"),
            "mlp.in": (f"{lay}.post_attention_layernorm", "out"),
            "mlp": (f"{lay}.mlp", "out"),
        })
        raw = {"model.layers.{L}.mlp": "mlp", "layers.{L}.self_attn": "attn",
               "layers.{L}.mlp": "mlp", "model.layers.{L}": "resid_post",
               "model.model.layers.{L}.mlp": "mlp"}  # mlxterp spelling
    return Reference(
        sites=sites, o_proj=f"{lay}.self_attn.o_proj",
        qkv=(f"{lay}.self_attn.q_proj", f"{lay}.self_attn.k_proj", f"{lay}.self_attn.v_proj"),
        qkv_layout="separate", raw_paths=raw)


def _neox(parallel: bool) -> Reference:
    lay = "gpt_neox.layers.{L}"
    sites = {
        "embed": ("gpt_neox.embed_in", "out"), "ln_final": ("gpt_neox.final_layer_norm", "out"),
        "resid_pre": (lay, "in"), "resid_post": (lay, "out"),
        "attn.in": (f"{lay}.input_layernorm", "out"), "attn": (f"{lay}.attention", "out"),
        "attn.z": (f"{lay}.attention.dense", "in"),
        "mlp.in": (f"{lay}.post_attention_layernorm", "out"), "mlp": (f"{lay}.mlp", "out"),
        "mlp.pre": (f"{lay}.mlp.dense_h_to_4h", "out"),
        "mlp.post": (f"{lay}.mlp.dense_4h_to_h", "in"),
    }
    if not parallel:
        sites["resid_mid"] = (f"{lay}.post_attention_layernorm", "in")
    return Reference(
        sites=sites, o_proj=f"{lay}.attention.dense", qkv=(f"{lay}.attention.query_key_value",) * 3,
        qkv_layout="neox", parallel=parallel,
        raw_paths={"gpt_neox.layers.{L}.mlp": "mlp", "gpt_neox.layers.{L}.attention": "attn",
                   "layers.{L}.mlp": "mlp", "gpt_neox.layers.{L}": "resid_post",
                   "layers.{L}.self_attn": "attn"})


_GPT2_LAYER = "transformer.h.{L}"
REFERENCE: dict[str, Reference] = {
    "gpt2": Reference(
        sites={
            "embed": ("transformer.wte", "out"), "ln_final": ("transformer.ln_f", "out"),
            "resid_pre": (_GPT2_LAYER, "in"), "resid_post": (_GPT2_LAYER, "out"),
            "attn.in": (f"{_GPT2_LAYER}.ln_1", "out"), "attn": (f"{_GPT2_LAYER}.attn", "out"),
            "attn.z": (f"{_GPT2_LAYER}.attn.c_proj", "in"),
            "resid_mid": (f"{_GPT2_LAYER}.ln_2", "in"), "mlp.in": (f"{_GPT2_LAYER}.ln_2", "out"),
            "mlp": (f"{_GPT2_LAYER}.mlp", "out"), "mlp.pre": (f"{_GPT2_LAYER}.mlp.c_fc", "out"),
            "mlp.post": (f"{_GPT2_LAYER}.mlp.c_proj", "in"),
        },
        o_proj=f"{_GPT2_LAYER}.attn.c_proj", qkv=(f"{_GPT2_LAYER}.attn.c_attn",) * 3,
        qkv_layout="gpt2",
        raw_paths={"transformer.h.{L}.mlp": "mlp", "transformer.h.{L}.attn": "attn",
                   "h.{L}.mlp": "mlp", "transformer.h.{L}": "resid_post",
                   "layers.{L}.self_attn": "attn"},
    ),
    "llama": _llama_like(norm_after=False),
    "mistral": _llama_like(norm_after=False),
    "smollm3": _llama_like(norm_after=False),
    "qwen2": _llama_like(norm_after=False),
    "qwen3": _llama_like(norm_after=False),
    "gemma": _llama_like(norm_after=False),  # Gemma 1 has no sandwich norms
    "gemma2": _llama_like(norm_after=True),
    "gemma3_text": _llama_like(norm_after=True),
    "gpt_neox_parallel": _neox(parallel=True),
    "gpt_neox_sequential": _neox(parallel=False),
}


def reference_qkv(family: str, which: int, proj_out: torch.Tensor, n_heads: int,
                  n_kv_heads: int, d_head: int) -> torch.Tensor:
    """Per-head q (0), k (1) or v (2) ``[b, p, heads, d_head]`` from the raw projection output,
    following the Hugging Face modelling code of ``family`` line by line."""
    layout = REFERENCE[family].qkv_layout
    b, p, _ = proj_out.shape
    if layout == "separate":
        return proj_out.view(b, p, -1, d_head)
    if layout == "gpt2":  # self.c_attn(h).split(self.split_size, dim=2)
        return proj_out.split(n_heads * d_head, dim=2)[which].view(b, p, n_heads, d_head)
    if layout == "neox":  # .view(*shape, -1, 3 * head_size) ... .chunk(3, dim=-1)
        return proj_out.view(b, p, -1, 3 * d_head).chunk(3, dim=-1)[which]
    raise ValueError(layout)


# -- plain PyTorch hooks (no causalpatch code) -------------------------------------------------
def first_tensor(value: object) -> torch.Tensor:
    """The first tensor of a module input/output (``(x, ...)`` tuples or a bare tensor)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"no leading tensor in {type(value).__name__}")


def capture_modules(hf_model: torch.nn.Module, ids: torch.Tensor,
                    wanted: dict[str, tuple[str, str]],
                    attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Run ``hf_model`` on ``ids`` with plain PyTorch hooks (no causalpatch code) and return
    ``{key: clone of the first input ("in") or output ("out") of the module path}``."""
    got: dict[str, torch.Tensor] = {}
    handles = []

    def pre(key: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            got[key] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    def post(key: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            got[key] = first_tensor(output).detach().clone()
        return hook

    try:
        for key, (path, io) in wanted.items():
            module = hf_model.get_submodule(path)
            if io == "in":
                handles.append(module.register_forward_pre_hook(pre(key), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(post(key)))
        with torch.no_grad():
            hf_model(input_ids=ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return got


# -- the one non-vacuity rule for fast-vs-reference comparisons --------------------------------
def assert_matches_reference(fast: Any, reference: Any, unpatched: Any, *, rtol: float,
                             min_cells: int, what: str = "", margin: float = 100.0) -> float:
    """Assert that ``fast`` equals ``reference`` *and* that the comparison means something.

    The rule (``tests/README.md``, "Non-vacuity"), per family and component (one call each):

    * ``scale = max |reference - unpatched|``: the largest effect of the reference, where
      ``unpatched`` is what the same cells hold with no patch (the base run's logits or metric;
      a tensor broadcastable to ``reference``, or a number);
    * ``max |fast - reference| <= rtol * scale``: the stated relative tolerance;
    * at least ``min_cells`` cells have ``|reference - unpatched| >= 100 * rtol * scale``:
      many cells whose effect is at least 100x the tolerance, so equality is not just
      "both are the unpatched run" (a method that returns the base run fails, and so does one
      that gets every cell but the largest wrong by a small amount).

    ``margin`` (default 100) is that factor; only half-precision runs, whose tolerance is a few
    percent of the largest effect, may lower it (100x would exceed the largest effect itself).

    A zero ``scale`` fails: nothing changed, so the comparison proves nothing. Returns the
    observed ``max |fast - reference| / scale``; with ``CAUSALPATCH_TOL_REPORT=1`` it also
    prints it (and the effect scale and cell count), which is how each ``rtol`` was pinned.
    """
    import os

    fast_t = torch.as_tensor(fast).detach().double().cpu()
    ref_t = torch.as_tensor(reference).detach().double().cpu()
    base_t = torch.as_tensor(unpatched).detach().double().cpu()
    assert fast_t.shape == ref_t.shape, f"{what}: {tuple(fast_t.shape)} != {tuple(ref_t.shape)}"
    assert torch.isfinite(fast_t).all() and torch.isfinite(ref_t).all(), f"{what}: not finite"
    effect = (ref_t - base_t).abs()
    scale = effect.max().item() if effect.numel() else 0.0
    diff = (fast_t - ref_t).abs().max().item() if ref_t.numel() else 0.0
    ratio = diff / scale if scale > 0 else float("inf")
    big = int((effect >= margin * rtol * scale).sum().item()) if scale > 0 else 0
    if os.environ.get("CAUSALPATCH_TOL_REPORT"):
        print(f"\n[tol] {what}: max|fast-ref| {diff:.3g}, scale {scale:.3g}, ratio {ratio:.3g} "
              f"(rtol {rtol:g}), cells >= {margin:g}x tol: {big}/{effect.numel()}")
    assert scale > 0, f"{what}: the reference equals the unpatched run everywhere (vacuous)"
    assert ratio <= rtol, (f"{what}: max |fast - reference| = {diff:.3g} is {ratio:.3g} of the "
                           f"largest effect {scale:.3g} (rtol {rtol:g})")
    assert big >= min_cells, (f"{what}: only {big} cells have an effect >= {margin:g}x the "
                              f"tolerance ({margin * rtol * scale:.3g}); need {min_cells}")
    return ratio


def assert_within(got: Any, want: Any, atol: float, what: str = "") -> float:
    """``max |got - want| <= atol`` for values that are not a comparison of effects (a baseline
    metric, an identity of sums, one normalised value), where a relative rule has no scale to
    use. ``atol`` is a pinned constant with a comment saying what was observed; with
    ``CAUSALPATCH_TOL_REPORT=1`` the observed difference is printed. Returns it."""
    import os

    diff = float((torch.as_tensor(got, dtype=torch.float64)
                  - torch.as_tensor(want, dtype=torch.float64)).abs().max())
    if os.environ.get("CAUSALPATCH_TOL_REPORT"):
        print(f"\n[within] {what}: max |got - want| {diff:.3g} (atol {atol:g})")
    assert diff <= atol, f"{what}: max |got - want| = {diff:.3g} > {atol:g}"
    return diff


def neuron_sample(moved: torch.Tensor, n_layers: int, n_random: int = 6,
                  n_largest: int = 4) -> list[int]:
    """Rows of a layer-major ``mlp_neuron`` sweep that the naive loop checks (every neuron is
    one naive forward, so the naive side runs on a sample): each layer's first and last neuron,
    ``n_random`` seeded picks per layer, and the ``n_largest`` rows with the largest fast
    effects.

    ``moved`` ``[n_layers * n_neurons]``: how far each row of the fast sweep moves from the
    unpatched run (e.g. ``(fast - base_last).abs().amax(-1)``). Returns sorted row indices
    (``layer * n_neurons + neuron``).
    """
    n = len(moved) // n_layers
    assert n * n_layers == len(moved), f"{len(moved)} rows are not {n_layers} layers of neurons"
    gen = torch.Generator().manual_seed(0)
    rows: set[int] = set()
    for layer in range(n_layers):
        picks = torch.randperm(n, generator=gen)[:n_random].tolist()
        rows |= {layer * n + j for j in (0, n - 1, *picks)}
    rows |= set(torch.topk(moved, min(n_largest, len(moved))).indices.tolist())
    return sorted(rows)


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (LLaMA architecture, 30 layers), loaded once."""
    from causalpatch import InterpretableModel

    return InterpretableModel("smollm2")


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_family(request: pytest.FixtureRequest) -> str:
    """Name of a tiny architecture family (:data:`FAMILIES`)."""
    return request.param


@pytest.fixture(scope="session")
def tiny_lm(tiny_family: str):
    """A tiny random ``InterpretableModel`` of ``tiny_family``, built once per session."""
    return tiny_model(tiny_family)


@pytest.fixture(scope="session")
def make_tiny_lm() -> Callable[[str], Any]:
    """The factory :func:`tiny_model`: ``make_tiny_lm("llama")`` builds a fresh copy."""
    return tiny_model


@pytest.fixture(scope="module")
def family_model(tiny_family: str, make_tiny_lm) -> tuple[str, Any]:
    """``(family, own copy of its tiny random model)`` for every family of :data:`FAMILIES`, one
    copy per test module (for tests that must not share the session's ``tiny_lm``)."""
    return tiny_family, make_tiny_lm(tiny_family)


@pytest.fixture
def one_thread():
    """Use one torch thread for the test, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ForwardCounter:
    """Counts forward passes of a wrapped model's HF module with a plain hook of the user's own
    (``n``; remove it with ``handle.remove()``): a refusal before any compute leaves it at 0."""

    def __init__(self, model: Any) -> None:
        self.n = 0
        self.handle = model.hf_model.register_forward_pre_hook(self._count)

    def _count(self, module: Any, args: Any) -> None:
        self.n += 1


# -- models for prompts given as token ids ---------------------------------------------------
@dataclass
class TextPairs:
    """The smallest dataset the sweeps accept (duck-typed: four parallel lists), built from
    ``(clean, corrupted, correct, incorrect)`` rows."""

    clean: list[str]
    corrupted: list[str]
    correct: list[str]
    incorrect: list[str]

    @classmethod
    def of(cls, rows: Any) -> "TextPairs":
        return cls(*[list(col) for col in zip(*rows)])


class IdTokenizer:
    """Just enough tokenizer for prompts given as token ids: ``decode`` writes ``t5 t9``, and
    ``encode`` reads that form back (any other text is refused)."""

    pad_token_id = 0
    eos_token_id = 0

    def decode(self, ids: Any) -> str:
        return " ".join(f"t{int(i)}" for i in ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        words = text.split()
        if not words or not all(w[:1] == "t" and w[1:].isdigit() for w in words):
            raise ValueError(f"this test tokenizer only takes token ids (or 't5 t9'), got {text!r}")
        return [int(w[1:]) for w in words]

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}


def id_llama_hf(n_layers: int = 2, vocab_size: int = 64, seed: int = 0,
                dtype: torch.dtype = torch.float32, **overrides: Any) -> transformers.PreTrainedModel:
    """A seeded tiny LLaMA (d_model 32, 4 query / 2 key-value heads) for token-id prompts;
    ``overrides`` are further ``LlamaConfig`` settings and may replace these ones."""
    torch.manual_seed(seed)
    settings: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config = transformers.LlamaConfig(**{**settings, **overrides})
    return transformers.LlamaForCausalLM(config).eval().to(dtype)


def id_llama(n_layers: int = 2, vocab_size: int = 64, seed: int = 0,
             dtype: torch.dtype = torch.float32, **overrides: Any) -> Any:
    """:func:`id_llama_hf` wrapped with :class:`IdTokenizer`."""
    from causalpatch import InterpretableModel

    return InterpretableModel(id_llama_hf(n_layers, vocab_size, seed, dtype, **overrides),
                              tokenizer=IdTokenizer())


def small_id_llama(n_kv_heads: int = 4, seed: int = 0) -> Any:
    """The 3-layer token-id LLaMA of the path-patching and causal-tracing tests: vocabulary 32,
    4 query heads and ``n_kv_heads`` key/value heads, ``initializer_range`` 0.3 (so that patching
    one head moves the logits far above float32 rounding)."""
    return id_llama(n_layers=3, vocab_size=32, seed=seed, num_key_value_heads=n_kv_heads,
                    initializer_range=0.3)


@pytest.fixture(scope="module")
def small_llama():
    """:func:`small_id_llama` with its defaults (4 key/value heads), one copy per test module."""
    return small_id_llama()


# -- saved models and checkpoints (distributed, placement and checkpoint tests) ---------------
#: ``(clean, corrupted, correct, incorrect)``: IOI-like pairs whose words are single tokens of
#: the tiny tokenizer, so every pair has the same token length.
IOI_PAIRS = [
    (f"When {a} and {b} went to the {place}, {b} gave a drink to",
     f"When {a} and {b} went to the {place}, {a} gave a drink to", f" {a}", f" {b}")
    for place in ("store", "city", "Paris", "Rome") for a, b in (("Mary", "John"), ("John", "Mary"))
]


def save_tiny_llama(folder: Path) -> Path:
    """Save the seeded tiny LLaMA (:func:`tiny_hf_model`) and its tokenizer (safetensors) to
    ``folder``, a local Hugging Face model folder."""
    tiny_hf_model("llama").save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`save_tiny_llama` in a fresh temporary folder, one per test module."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def checkpoint_cells(path: Path) -> int:
    """How many finished cells the checkpoint file at ``path`` holds (0 while it is missing or
    half-written)."""
    try:
        return sum(len(c) for c in json.loads(path.read_text())["cells"].values())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


# -- vendored code snippets of the documents causalpatch reproduces ---------------------------
#: One file per snippet (``tests/data/snippets/<name>.txt``) and ``manifest.json``: the SHA-256
#: of each source document and of each vendored file, and which document each snippet is from.
SNIPPETS_DIR = TESTS_DIR / "data" / "snippets"
#: The source documents themselves, when present beside the repository (not on a clean clone).
SOURCE_DOCS = REPO_ROOT.parent / "shared" / "seeds"


def load_snippet(name: str) -> str:
    """The vendored snippet ``name`` (file stem), as written in its source document."""
    return (SNIPPETS_DIR / f"{name}.txt").read_text()


# -- the induction positive control (tests/data/induction_model) -----------------------------
#: The trained two-layer attention-only LLaMA of the positive control (safetensors + config;
#: made by ``scripts/train_induction_model.py``, whose settings and held-out accuracy are in
#: ``training.json`` there).
INDUCTION_MODEL_DIR = TESTS_DIR / "data" / "induction_model"


def induction_model() -> Any:
    """The positive-control model: a 2-layer attention-only LLaMA (4 heads per layer, MLPs
    zero) trained on ``[BOS=1] a_1..a_n a_1..a_n`` with random content tokens 2..63, loaded
    from :data:`INDUCTION_MODEL_DIR` with :class:`IdTokenizer` (prompts are token ids).

    Its circuit is known without patching, from attention patterns alone
    (``tests/methods/test_positive_control.py``: ``previous_token_scores``,
    ``induction_scores``, ``identify_circuit``): a previous-token head in layer 0 and an
    induction head in layer 1. In the edge graph of circuit discovery (nodes ``input``,
    ``a{L}.h{H}``, ``m{L}``, ``logits``) the known circuit is the three edges

    * ``a0.h{P}`` -> ``a1.h{I}.k``: the previous-token head writes "the token before me" into
      the residual stream at the token after the first occurrence, which the induction head's
      key reads (K-composition);
    * ``input`` -> ``a1.h{I}.v``: the token embedding at that position is what the induction
      head copies;
    * ``a1.h{I}`` -> ``logits``: the copied token is the prediction,

    with ``P``, ``I`` the heads ``identify_circuit`` returns. MLP nodes output exactly 0, so
    every edge from or to ``m0``/``m1`` carries nothing.

    Attention alone finds four induction-attending layer-1 heads; ``identify_circuit`` picks
    ``I`` by the weights' OV copying score as well (``copying_scores``). Which edges a
    corruption exercises depends on what it replaces: the first ``a_k`` (the tests' default)
    runs through ``input`` -> ``a0.h{P}.v``, the key edge and the logits edge; the first
    ``a_{k+1}`` through the value edge and the logits edge (``docs/positive_control.md``).
    """
    from causalpatch import InterpretableModel

    hf = transformers.LlamaForCausalLM.from_pretrained(INDUCTION_MODEL_DIR).eval()
    return InterpretableModel(hf, tokenizer=IdTokenizer())


# -- a per-session cache of the naive engine's patched forwards --------------------------------
#: ``CAUSALPATCH_TEST_NAIVE_CACHE=0`` turns the cache off: every naive forward runs.
NAIVE_CACHE_ENV = "CAUSALPATCH_TEST_NAIVE_CACHE"

#: The largest model (bytes of parameters and buffers) whose weights :class:`NaiveCache` hashes
#: on every call. The tiny models are well under 1 MB (microseconds to hash); SmolLM2's 540 MB
#: took 1.0-1.5 s per hash here, and its naive tests could share only a few rows (the sampled
#: ``resid_post`` cells of ``test_patching.py`` on the layers its sweep test patches), so its
#: naive calls run uncached.
NAIVE_CACHE_MAX_BYTES = 64 * 2**20


def _bytes_of(t: torch.Tensor) -> Any:
    """The raw bytes of ``t`` (any dtype, any device) as a flat ``uint8`` array."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


class NaiveCache:
    """A memo of :func:`causalpatch.engine.naive_patched_logits`, one patch (one forward) per
    entry, shared by every test of a session.

    A row is reused only when everything its forward reads is the same:

    * the model: the wrapper and ``hf_model`` objects themselves (by identity: a rebuilt model
      with equal weights is another model), every parameter's and buffer's name, dtype, device,
      shape, stride, ``data_ptr`` and ``_version``, a hash of their bytes (an edit through
      ``p.data`` bumps no version counter, so only the bytes show it), the config (JSON and
      attention implementation), the classes' ``forward`` functions, the pad token, the device,
      and torch's thread count and matmul settings;
    * the base ids (dtype, shape, bytes);
    * the patch: each site (by value; views compared by value or identity), frozen or not, and
      every entry's position, unit and the bytes of the value written there (the source or base
      activation, or the patch's own value: exactly what the naive loop writes).

    It falls through uncached (counted in :attr:`uncached`) when part of that cannot be keyed
    exactly: a module or the model with a ``forward`` replaced on the instance (a test counting
    forwards, accelerate's placement hooks), any hook registered on the model, a model in
    training mode or larger than :data:`NAIVE_CACHE_MAX_BYTES`, weights on the meta device, a
    site whose view is neither the identity view nor a frozen dataclass, or a patch whose
    values cannot be read (the real call then raises its own error). ``progress`` only counts
    rows: a reused row still reports one. Rows are stored as clones and returned stacked into a
    new tensor, so no caller holds the cache's memory.
    """

    def __init__(self, max_bytes: int = NAIVE_CACHE_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.hits = self.misses = self.uncached = 0
        self.original: Callable[..., torch.Tensor] | None = None
        self._rows: dict[Hashable, torch.Tensor] = {}
        self._states: dict[Hashable, int] = {}
        self._keys_of: dict[int, list[Hashable]] = {}
        self._serials: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._count = itertools.count()
        self._installed: list[Any] = []

    # -- installing ------------------------------------------------------------------------
    def install(self) -> None:
        """Replace ``naive_patched_logits`` in :mod:`causalpatch.engine` and in every loaded
        module that imported it by name."""
        import causalpatch.engine as engine

        original = engine.naive_patched_logits
        self.original = original

        @functools.wraps(original)
        def naive_patched_logits(*args: Any, **kwargs: Any) -> torch.Tensor:
            return self(*args, **kwargs)

        for module in list(sys.modules.values()):
            try:
                found = vars(module).get("naive_patched_logits") is original
            except TypeError:
                continue
            if found:
                module.naive_patched_logits = naive_patched_logits
                self._installed.append(module)

    def uninstall(self) -> None:
        for module in self._installed:
            module.naive_patched_logits = self.original
        self._installed.clear()

    # -- keys ------------------------------------------------------------------------------
    def _serial(self, obj: Any) -> int:
        """A number for ``obj`` that no other object gets, even after ``obj`` is collected
        (``id`` values are reused); the object's rows are dropped when it is collected."""
        serial = self._serials.get(obj)
        if serial is None:
            serial = next(self._count)
            self._serials[obj] = serial
            self._keys_of[serial] = []
            weakref.finalize(obj, self._forget, serial)
        return serial

    def _forget(self, serial: int) -> None:
        for key in self._keys_of.pop(serial, []):
            self._rows.pop(key, None)

    def model_state(self, model: Any) -> tuple[int, int] | None:
        """``(serial of the model, number of its exact state)``, or ``None`` (uncached)."""
        hf = getattr(model, "hf_model", None)
        runtime = getattr(model, "runtime", None)
        if not isinstance(hf, torch.nn.Module) or hf.training:
            return None
        modules = list(hf.modules())
        if any("forward" in vars(obj) for obj in (model, runtime, *modules)):
            return None
        from torch.nn.modules import module as torch_module

        if (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules)):
            return None
        tensors = [*hf.named_parameters(remove_duplicate=False),
                   *hf.named_buffers(remove_duplicate=False)]
        if (sum(t.numel() * t.element_size() for _, t in tensors) > self.max_bytes
                or any(t.device.type == "meta" for _, t in tensors)):
            return None
        digest = hashlib.blake2b(digest_size=20)
        layout = []
        for name, t in tensors:
            layout.append((name, str(t.dtype), str(t.device), tuple(t.shape), t.stride(),
                           t.storage_offset(), t.data_ptr(), t._version))
            digest.update(_bytes_of(t))
        try:
            serial = self._serial(model)
            state = (serial, self._serial(hf), type(model), type(hf).forward,
                     getattr(type(runtime), "forward", None),
                     hf.config.to_json_string(use_diff=False),
                     getattr(hf.config, "_attn_implementation", None), tuple(layout),
                     digest.digest(), model.pad_token_id, str(model.device),
                     torch.get_num_threads(), torch.get_float32_matmul_precision(),
                     torch.backends.mkldnn.enabled, torch.are_deterministic_algorithms_enabled())
        except (TypeError, ValueError):  # unhashable or unserialisable: not exact
            return None
        return serial, self._states.setdefault(state, len(self._states))

    @staticmethod
    def patch_key(patch: Sequence[Any], source: Any, base: Any) -> Hashable | None:
        """Everything the naive loop writes for one patch, or ``None`` (uncached)."""
        import dataclasses

        from causalpatch.adapters.base import View
        from causalpatch.engine import entry_values

        digest = hashlib.blake2b(digest_size=20)
        sites = []
        for sp in patch:
            view = sp.site.view
            if not (type(view) is View or (dataclasses.is_dataclass(view)
                                           and type(view).__dataclass_params__.frozen)):
                return None
            entries = []
            for pos, unit, value in entry_values(sp, source, base):
                if not isinstance(value, torch.Tensor):
                    return None
                entries.append((pos, unit, str(value.dtype), tuple(value.shape),
                                str(value.device)))
                digest.update(_bytes_of(value))
            sites.append((sp.site, sp.frozen, tuple(entries)))
        return tuple(sites), digest.digest()

    # -- the call --------------------------------------------------------------------------
    def __call__(self, model: Any, base_ids: torch.Tensor, patches: Sequence[Any], source: Any,
                 progress: Callable[[int], None] | None = None, base: Any = None
                 ) -> torch.Tensor:
        original = self.original
        assert original is not None, "NaiveCache.install() first"
        state = self.model_state(model) if isinstance(base_ids, torch.Tensor) else None
        if state is None:
            self.uncached += len(patches)
            return original(model, base_ids, patches, source, progress, base)
        ids = (str(base_ids.dtype), tuple(base_ids.shape), _bytes_of(base_ids).tobytes())
        rows = []
        for patch in patches:
            try:
                key = self.patch_key(patch, source, base)
            except Exception:  # the real call below raises its own error
                key = None
            if key is None:
                self.uncached += 1
                rows.append(original(model, base_ids, [patch], source, progress, base)[0])
                continue
            full = (state[1], ids, key)
            row = self._rows.get(full)
            if row is None:
                row = original(model, base_ids, [patch], source, progress, base)[0].clone()
                self._rows[full] = row
                self._keys_of[state[0]].append(full)
                self.misses += 1
            else:
                self.hits += 1
                if progress is not None:
                    progress(1)
            rows.append(row)
        if not rows:
            return original(model, base_ids, patches, source, progress, base)
        return torch.stack(rows)  # a new tensor: callers never share the cache's rows


#: The session's cache (installed by :func:`naive_cache_session` unless turned off).
NAIVE_CACHE = NaiveCache()


def _naive_cache_on() -> bool:
    return os.environ.get(NAIVE_CACHE_ENV, "1") != "0"


@pytest.fixture(scope="session", autouse=True)
def naive_cache_session():
    """Every test's naive forwards go through :data:`NAIVE_CACHE` (off with
    ``CAUSALPATCH_TEST_NAIVE_CACHE=0``: then ``None``)."""
    if not _naive_cache_on():
        yield None
        return
    NAIVE_CACHE.install()
    try:
        yield NAIVE_CACHE
    finally:
        NAIVE_CACHE.uninstall()


@pytest.fixture
def naive_cache(naive_cache_session):
    """The installed :class:`NaiveCache`: the session's, or (cache turned off) one of the
    test's own, installed the same way for the test only."""
    if naive_cache_session is not None:
        yield naive_cache_session
        return
    own = NaiveCache()
    own.install()
    try:
        yield own
    finally:
        own.uninstall()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _naive_cache_on():
        terminalreporter.write_line(f"naive cache: off ({NAIVE_CACHE_ENV}=0)")
        return
    c = NAIVE_CACHE
    terminalreporter.write_line(f"naive cache: {c.hits} hits, {c.misses} misses "
                                f"({c.uncached} naive forwards uncached)")
