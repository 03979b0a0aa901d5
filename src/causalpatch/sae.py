"""Sparse autoencoders (SAEs): the SAELens on-disk format, and their splice into a forward pass.

**Format.** :func:`load_sae` reads, and :func:`save_sae` writes, the folder SAELens 6.x writes
with ``SAE.save_model`` (``sae_lens/saes/sae.py``): ``cfg.json`` plus
``sae_weights.safetensors`` (and optionally ``sparsity.safetensors``). Only ``json`` and
``safetensors`` are used; nothing is unpickled. ``cfg.json`` holds ``d_in``, ``d_sae``,
``dtype``, ``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``,
``architecture`` (``"standard"``, ``"topk"``, ``"jumprelu"``; ``topk`` adds ``k`` and
``rescale_acts_by_decoder_norm``) and ``metadata`` with ``model_name`` and ``hook_name`` (the
TransformerLens name such as ``blocks.8.hook_resid_post``). Configs written before SAELens 6
(``hook_name``/``hook_point``/``model_name`` at the top level) are read as well. The weights are
``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and, for
JumpReLU, ``threshold [d_sae]`` (or the older ``log_threshold``).

The maths follows SAELens exactly::

    sae_in = x - b_dec * apply_b_dec_to_input
    pre    = sae_in @ W_enc + b_enc
    f      = relu(pre)                                   # standard
           = relu(pre) * (pre > relu(threshold))        # jumprelu
           = topk(pre * |W_dec| if rescale else pre, k) (relu of the k largest, 0 elsewhere)
    x_hat  = (f / |W_dec| if topk and rescale else f) @ W_dec + b_dec

**Any SAE object works.** Besides :class:`SparseAutoencoder`, anything with ``encode(x)`` and
``decode(f)`` and a declared site can be attached: a ``sae_lens.SAE`` (its
``cfg.metadata.hook_name`` is read), or any object wrapped with :func:`wrap_sae` (for example a
``dictionary_learning`` autoencoder). SAELens itself is not a dependency.

**Splicing keeps the model exact.** At the SAE's site the activation ``x`` becomes::

    x'  = decode(f') + error,   error = x - decode(encode(x))     (keep_error=True)
        = x + (decode(f') - decode(f))   at positions where f' != f, x itself elsewhere

so an edit that changes nothing leaves the run bit-for-bit unchanged; ``keep_error=False``
replaces ``x`` by ``decode(f')`` (the SAE "spliced in" without its error term). Feature
activations are exposed as ``{site}.sae.features`` (also ``.sae.error``, ``.sae.recons``,
``.sae.input``, ``.sae.output``; the SAELens spellings ``{hook_name}.hook_sae_acts_post``,
``.hook_sae_error``, ``.hook_sae_recons``, ``.hook_sae_input``, ``.hook_sae_output`` work too).

**Training.** :func:`train_sae` trains a TopK (or ReLU + L1) SAE on the activations of real text
that ships with Python and with causalpatch (:func:`training_texts`), and reports explained
variance, L0, dead features and the model's loss with the SAE spliced in.

Example::

    from causalpatch import InterpretableModel
    from causalpatch.sae import load_sae
    model = InterpretableModel("smollm2")
    sae = load_sae("tests/data/saes/smollm2-blocks.20.resid_post-topk-2048")
    with model.trace("When Mary and John went to the store, John gave a drink to", saes=[sae],
                     cache=["blocks.20.resid_post.sae.features"]) as tr:
        f = tr.cache["blocks.20.resid_post.sae.features"]   # [1, 14, 2048]
"""

from __future__ import annotations

import ast
import json
import math
import re
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ._io import atomic_write_bytes, atomic_write_text
from .errors import (CausalPatchError, InvalidArgumentError, InvalidTypeError, NonFiniteError,
                     OutOfRangeError, ShapeMismatchError, UnknownComponentError)
from .hooks import Hook, StopForward, hooked
from .interventions import Index, Intervention
from .names import (TL_GLOBAL_HOOKS, TL_LAYER_HOOKS, TL_SITE_KINDS, Site,
                    hook_name_for_site, site_name_for_hook_name)

if TYPE_CHECKING:
    from .model import HookedModel

#: File names of the SAELens format (``sae_lens/constants.py``).
SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
#: Architectures :func:`load_sae` understands.
ARCHITECTURES = ("standard", "topk", "jumprelu")
#: The SAELens config format written by :func:`save_sae` (SAELens reads
#: ``metadata.sae_lens_version`` to tell 6.x configs from older flat ones).
SAELENS_FORMAT_VERSION = "6.0.0"
#: Names of an attached SAE's values, as in ``blocks.20.resid_post.sae.features``.
SAE_LEAVES = ("features", "error", "recons", "input", "output")
#: SAELens hook names (``{hook_name}.hook_sae_acts_post``) -> :data:`SAE_LEAVES`.
SAELENS_LEAVES = {"hook_sae_acts_post": "features", "hook_sae_error": "error",
                  "hook_sae_recons": "recons", "hook_sae_input": "input",
                  "hook_sae_output": "output"}
#: Leaves an intervention may edit (the others are read-only).
EDITABLE_LEAVES = ("features", "error")

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}
_WEIGHT_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "log_threshold",
                "scaling_factor")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


class SAEFormatError(CausalPatchError, ValueError):
    """An SAE folder's ``cfg.json`` or weights are not a valid SAELens SAE (the message names
    the file, the field or tensor, what was found and what was expected)."""


class SAENotFoundError(CausalPatchError, FileNotFoundError):
    """An SAE folder, or its ``cfg.json`` / ``sae_weights.safetensors``, does not exist."""


class SAEModelMismatchWarning(UserWarning):
    """The SAE's config names a different model than the one it is applied to."""


# -- TransformerLens hook names <-> canonical sites (the vocabulary lives in names) -------------
#: Canonical per-layer site kinds an SAE may sit on (whether a model has one is checked when
#: the SAE is attached).
SAE_SITE_KINDS = TL_SITE_KINDS


def site_for_hook_name(hook_name: Any) -> str:
    """The canonical site name of a TransformerLens ``hook_name`` (canonical names pass).

    ``"blocks.8.hook_resid_post"`` -> ``"blocks.8.resid_post"``, ``"blocks.3.attn.hook_z"`` ->
    ``"blocks.3.attn.z"``, ``"hook_embed"`` -> ``"embed"``.

    Raises:
        SAEFormatError: ``hook_name`` is not a non-empty string.
        UnknownComponentError: it names no site causalpatch knows.
    """
    if not isinstance(hook_name, str) or not hook_name.strip():
        raise SAEFormatError(f"hook_name must be a non-empty string like "
                             f"'blocks.8.hook_resid_post', got {hook_name!r}")
    site = site_name_for_hook_name(hook_name)
    if site is not None:
        return site
    raise UnknownComponentError(
        f"unknown SAE hook_name {hook_name!r}: expected a TransformerLens hook name "
        f"(blocks.L.{', blocks.L.'.join(sorted(TL_LAYER_HOOKS))}, "
        f"{', '.join(TL_GLOBAL_HOOKS)}) or a canonical causalpatch site such as "
        "'blocks.8.resid_post'")


def split_sae_name(name: str) -> tuple[str, str] | None:
    """``"blocks.20.resid_post.sae.features"`` -> ``("blocks.20.resid_post", "features")``;
    also the SAELens spelling ``"blocks.20.hook_resid_post.hook_sae_acts_post"``. ``None`` if
    ``name`` names no SAE value."""
    if not isinstance(name, str):
        return None
    match = re.fullmatch(r"(.+)\.sae\.([a-z_]+)", name)
    if match is not None:
        return match.group(1), match.group(2)
    match = re.fullmatch(r"(.+)\.(hook_sae_[a-z_]+)", name)
    if match is not None and match.group(2) in SAELENS_LEAVES:
        return match.group(1), SAELENS_LEAVES[match.group(2)]
    return None


# -- the SAE ------------------------------------------------------------------------------------
def _positive_int(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SAEFormatError(f"{where}: {what} must be a positive integer, got {value!r}")
    return value


class SparseAutoencoder(nn.Module):
    """An SAE of the SAELens format: ``standard`` (ReLU), ``topk`` or ``jumprelu``.

    Args:
        d_in: width of the activation it reads (``d_model`` for residual sites).
        d_sae: number of features.
        architecture: ``"standard"``, ``"topk"`` or ``"jumprelu"``.
        hook_name: where it sits, as a TransformerLens hook name (``blocks.8.hook_resid_post``)
            or a canonical site name (``blocks.8.resid_post``).
        model_name: the model it was trained on (a warning is given when it is applied to
            another one).
        k: active features per token (``topk`` only).
        apply_b_dec_to_input: subtract ``b_dec`` before encoding (SAELens default True).
        rescale_acts_by_decoder_norm: ``topk`` only, as in SAELens.
        reshape_activations: ``"none"`` or ``"hook_z"`` (per-head sites, flattened to
            ``n_heads * d_head``).
        dtype: compute dtype.
        metadata: free-form metadata stored in ``cfg.json``.
        weights: ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` (and ``threshold``); default: the
            SAELens initialisation (``W_dec`` Kaiming-uniform, ``W_enc = W_dec.T``, zero
            biases), seeded by ``seed``.

    Attributes:
        site: the canonical site name (``blocks.8.resid_post``).
        log_sparsity: ``[d_sae]`` log10 feature density, when known (``sparsity.safetensors``).
    """

    def __init__(self, d_in: int, d_sae: int, architecture: str = "standard", *,
                 hook_name: str, model_name: str | None = None, k: int | None = None,
                 apply_b_dec_to_input: bool = True, rescale_acts_by_decoder_norm: bool = False,
                 reshape_activations: str = "none", dtype: torch.dtype = torch.float32,
                 metadata: Mapping[str, Any] | None = None,
                 weights: Mapping[str, torch.Tensor] | None = None, seed: int = 0) -> None:
        super().__init__()
        where = "SparseAutoencoder"
        self.d_in = _positive_int(d_in, "d_in", where)
        self.d_sae = _positive_int(d_sae, "d_sae", where)
        if architecture not in ARCHITECTURES:
            raise SAEFormatError(f"unknown SAE architecture {architecture!r}; supported: "
                                 f"{', '.join(ARCHITECTURES)}")
        self.architecture = architecture
        if architecture == "topk":
            self.k = _positive_int(k, "k", where)
            if self.k > self.d_sae:
                raise SAEFormatError(f"k={k} exceeds d_sae={d_sae}")
        elif k is not None:
            raise SAEFormatError(f"k is only used by topk SAEs, not by {architecture!r}")
        else:
            self.k = None
        if reshape_activations not in ("none", "hook_z"):
            raise SAEFormatError(f"reshape_activations must be 'none' or 'hook_z', got "
                                 f"{reshape_activations!r}")
        self.hook_name = hook_name
        self.site = site_for_hook_name(hook_name)
        self.model_name = model_name or None
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        self.reshape_activations = reshape_activations
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.log_sparsity: torch.Tensor | None = None
        if weights is None:
            gen = torch.Generator().manual_seed(seed)
            w_dec = torch.empty(d_sae, d_in)
            bound = math.sqrt(6.0 / d_in)  # kaiming_uniform_ on a [d_sae, d_in] matrix
            w_dec.uniform_(-bound, bound, generator=gen)
            weights = {"W_enc": w_dec.T.clone(), "b_enc": torch.zeros(d_sae), "W_dec": w_dec,
                       "b_dec": torch.zeros(d_in)}
            if architecture == "jumprelu":
                weights["threshold"] = torch.zeros(d_sae)
        for key in ("W_enc", "b_enc", "W_dec", "b_dec") + (
                ("threshold",) if architecture == "jumprelu" else ()):
            if key not in weights:
                raise SAEFormatError(f"{where}: missing weight {key!r}")
            # contiguous: a transposed layout would take another matmul kernel, so a saved
            # and reloaded SAE would differ from the original in the last bit
            setattr(self, key, nn.Parameter(
                weights[key].detach().to(dtype).clone(memory_format=torch.contiguous_format),
                requires_grad=False))

    # -- properties ----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return (f"{self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}{k}, "
                f"site={self.site!r}, model={self.model_name!r}")

    # -- maths (SAELens' StandardSAE / TopKSAE / JumpReLUSAE) -----------------------------------
    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if self.reshape_activations == "hook_z" and x.shape[-1] != self.d_in and x.dim() >= 2 \
                and x.shape[-1] * x.shape[-2] == self.d_in:
            return x.flatten(-2)
        return x

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec) @ W_enc + b_enc``: ``[..., d_in] -> [..., d_sae]``."""
        sae_in = self._flat(x).to(self.dtype)
        if self.apply_b_dec_to_input:
            sae_in = sae_in - self.b_dec
        return sae_in @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The architecture's activation function on pre-activations."""
        if self.architecture == "standard":
            return torch.relu(pre)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > torch.relu(self.threshold)).to(pre.dtype)
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        values, indices = torch.topk(pre, k=self.k, dim=-1, sorted=False)  # type: ignore[arg-type]
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., d_sae]`` of activations ``x`` ``[..., d_in]``."""
        return self.activate(self.pre_activations(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., d_in]`` of feature activations ``f`` ``[..., d_sae]``."""
        f = f.to(self.dtype)
        if self.architecture == "topk" and self.rescale_acts_by_decoder_norm:
            f = f * (1 / self.W_dec.norm(dim=-1))  # as SAELens writes it (bit for bit)
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))``."""
        return self.decode(self.encode(x))

    # -- the SAELens config ----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The ``cfg.json`` dict (SAELens 6 layout)."""
        metadata = {"sae_lens_version": SAELENS_FORMAT_VERSION,
                    "sae_lens_training_version": None, **self.metadata,
                    "model_name": self.model_name, "hook_name": self.hook_name,
                    "hook_head_index": None}
        cfg: dict[str, Any] = {
            "d_in": self.d_in, "d_sae": self.d_sae,
            "dtype": str(self.dtype).removeprefix("torch."), "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none", "reshape_activations": self.reshape_activations,
            "metadata": metadata, "architecture": self.architecture,
        }
        if self.architecture == "topk":
            cfg["k"] = self.k
            cfg["rescale_acts_by_decoder_norm"] = self.rescale_acts_by_decoder_norm
        return cfg

    def weights(self) -> dict[str, torch.Tensor]:
        """The safetensors tensors (SAELens names)."""
        names = ("W_enc", "b_enc", "W_dec", "b_dec") + (
            ("threshold",) if self.architecture == "jumprelu" else ())
        return {n: getattr(self, n).detach() for n in names}


# -- loading and saving -------------------------------------------------------------------------
def _parse_config(cfg: Any, where: str) -> dict[str, Any]:
    """Validate a ``cfg.json`` dict (SAELens 6, or the older flat layout) into constructor
    arguments of :class:`SparseAutoencoder` (weights not included)."""
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{where}: cfg.json must hold a JSON object, got "
                             f"{type(cfg).__name__}")
    meta = cfg.get("metadata")
    meta = dict(meta) if isinstance(meta, dict) else {}
    flat = "architecture" not in cfg  # configs from before SAELens 6
    architecture = cfg.get("architecture", "standard")
    kwargs = dict(cfg.get("activation_fn_kwargs") or {})
    if flat and (cfg.get("activation_fn") or cfg.get("activation_fn_str")) == "topk":
        architecture = "topk"
    if not isinstance(architecture, str) or architecture not in ARCHITECTURES:
        raise SAEFormatError(
            f"{where}: unknown SAE architecture {architecture!r}; causalpatch reads "
            f"{', '.join(ARCHITECTURES)} (SAELens' gated, transcoder and other variants are not "
            "supported)")
    d_in = _positive_int(cfg.get("d_in"), "d_in", where)
    d_sae = _positive_int(cfg.get("d_sae"), "d_sae", where)
    hook_name = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    if hook_name is None:
        raise SAEFormatError(
            f"{where}: cfg.json names no hook_name (SAELens 6 keeps it in "
            "metadata.hook_name, older configs at the top level): causalpatch cannot tell "
            "which activation the SAE reads. Add e.g. \"hook_name\": "
            "\"blocks.8.hook_resid_post\" to metadata")
    site_for_hook_name(hook_name)  # raises for unknown names
    head = meta.get("hook_head_index", cfg.get("hook_head_index", cfg.get("hook_point_head_index")))
    if head is not None:
        raise SAEFormatError(f"{where}: SAEs on a single head (hook_head_index={head}) are not "
                             "supported")
    norm = cfg.get("normalize_activations", "none")
    if norm in (None, False):
        norm = "none"
    if norm is True:
        norm = "expected_average_only_in"
    if norm not in ("none", "expected_average_only_in"):
        raise SAEFormatError(
            f"{where}: normalize_activations={norm!r} is not supported (it makes decode depend "
            "on the input); supported: 'none' and 'expected_average_only_in' (which, as in "
            "SAELens' load_from_disk, applies no scaling: fold the scaling factor into the "
            "weights first)")
    dtype_name = str(cfg.get("dtype", "float32")).removeprefix("torch.")
    if dtype_name not in _DTYPES:
        raise SAEFormatError(f"{where}: unknown dtype {cfg.get('dtype')!r}; expected one of "
                             f"{', '.join(_DTYPES)}")
    reshape = cfg.get("reshape_activations", "none") or "none"
    if flat and "hook_z" in str(hook_name):
        reshape = "hook_z"
    out: dict[str, Any] = dict(
        d_in=d_in, d_sae=d_sae, architecture=architecture, hook_name=str(hook_name),
        model_name=meta.get("model_name") or cfg.get("model_name"),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        reshape_activations=reshape, dtype=_DTYPES[dtype_name],
        metadata={k: v for k, v in meta.items() if k not in ("model_name", "hook_name",
                                                             "hook_head_index")})
    if architecture == "topk":
        out["k"] = cfg.get("k", kwargs.get("k"))
        _positive_int(out["k"], "k", where)
        out["rescale_acts_by_decoder_norm"] = bool(cfg.get("rescale_acts_by_decoder_norm",
                                                           False))
    return out


def _read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    size = path.stat().st_size
    if size < 8:
        raise SAEFormatError(f"{path}: {what} is truncated ({size} bytes): not a safetensors "
                             "file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError)
        raise SAEFormatError(f"{path}: {what} is truncated or not a valid safetensors file "
                             f"({type(exc).__name__}: {exc})") from None


def _check_weights(tensors: dict[str, torch.Tensor], args: dict[str, Any], path: Path
                   ) -> dict[str, torch.Tensor]:
    """Names, shapes and finiteness of the weights; ``log_threshold`` -> ``threshold``."""
    unknown = sorted(set(tensors) - set(_WEIGHT_KEYS))
    if unknown:
        raise SAEFormatError(f"{path}: unexpected tensors {unknown} for a {args['architecture']} "
                             f"SAE (expected {', '.join(_WEIGHT_KEYS[:5])})")
    tensors = dict(tensors)
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = torch.exp(tensors.pop("log_threshold").double()).float()
    if "scaling_factor" in tensors:
        factor = tensors.pop("scaling_factor")
        if not torch.allclose(factor.float(), torch.ones_like(factor.float())):
            raise SAEFormatError(f"{path}: a finetuning scaling_factor other than 1 is not "
                                 "supported")
    d_in, d_sae = args["d_in"], args["d_sae"]
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in),
                "b_dec": (d_in,)}
    if args["architecture"] == "jumprelu":
        expected["threshold"] = (d_sae,)
    for key, shape in expected.items():
        if key not in tensors:
            raise SAEFormatError(f"{path}: missing tensor {key!r} (a {args['architecture']} SAE "
                                 f"needs {', '.join(expected)})")
        got = tuple(tensors[key].shape)
        if got != shape:
            raise SAEFormatError(f"{path}: tensor {key!r} has shape {got}, but cfg.json says "
                                 f"d_in={d_in}, d_sae={d_sae}, so it must be {shape}")
        if not tensors[key].is_floating_point():
            raise SAEFormatError(f"{path}: tensor {key!r} has dtype {tensors[key].dtype}, "
                                 "expected a floating point dtype")
    for key in expected:
        bad = int((~torch.isfinite(tensors[key])).sum())
        if bad:
            raise NonFiniteError(f"{path}: tensor {key!r} has {bad} NaN or infinite values; "
                                 "the SAE cannot be used")
    return {k: tensors[k] for k in expected}


def load_sae(path: str | Path, *, dtype: torch.dtype | None = None) -> SparseAutoencoder:
    """Read an SAE folder in the SAELens format (``cfg.json`` + ``sae_weights.safetensors``).

    Args:
        path: the folder (or its ``cfg.json``).
        dtype: compute dtype (default: ``cfg.json``'s ``dtype``). Weights stored in another
            dtype are cast, as SAELens does.

    Raises:
        SAENotFoundError: the folder, ``cfg.json`` or the weights file does not exist (a folder
            with only pickle weights is refused: they are never loaded).
        SAEFormatError: invalid JSON, missing ``hook_name``, unknown architecture, truncated
            weights, missing tensors or wrong shapes.
        UnknownComponentError: ``hook_name`` names no site.
        NonFiniteError: a weight is NaN or infinite.
    """
    folder = Path(path).expanduser()
    if folder.is_file() and folder.name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME):
        folder = folder.parent
    if not folder.exists():
        raise SAENotFoundError(f"SAE folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise SAENotFoundError(f"{str(folder)!r} is a file; an SAE is a folder with "
                               f"{SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME} (SAELens format)")
    cfg_path = folder / SAE_CFG_FILENAME
    weights_path = folder / SAE_WEIGHTS_FILENAME
    if not cfg_path.is_file():
        raise SAENotFoundError(f"{str(folder)!r} has no {SAE_CFG_FILENAME}: an SAE folder in the "
                               f"SAELens format holds {SAE_CFG_FILENAME} and "
                               f"{SAE_WEIGHTS_FILENAME}")
    if not weights_path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        hint = (f"; it holds pickle files ({', '.join(pickles)}), which causalpatch never loads "
                "(they can run arbitrary code): convert them to safetensors") if pickles else ""
        raise SAENotFoundError(f"{str(folder)!r} has no {SAE_WEIGHTS_FILENAME}{hint}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SAEFormatError(f"{cfg_path}: not valid JSON ({exc})") from None
    args = _parse_config(cfg, str(cfg_path))
    weights = _check_weights(_read_safetensors(weights_path, SAE_WEIGHTS_FILENAME), args,
                             weights_path)
    if dtype is not None:
        args["dtype"] = dtype
    sae = SparseAutoencoder(**args, weights=weights)
    sparsity_path = folder / SPARSITY_FILENAME
    if sparsity_path.is_file():
        sparsity = _read_safetensors(sparsity_path, SPARSITY_FILENAME).get("sparsity")
        if sparsity is not None and tuple(sparsity.shape) == (sae.d_sae,):
            sae.log_sparsity = sparsity.float()
    return sae


def save_sae(sae: SparseAutoencoder, path: str | Path, *,
             storage_dtype: torch.dtype | None = None) -> Path:
    """Write ``sae`` as an SAELens folder (``cfg.json`` + ``sae_weights.safetensors``, plus
    ``sparsity.safetensors`` when ``sae.log_sparsity`` is known). Files are written atomically.

    Args:
        storage_dtype: dtype of the stored tensors (e.g. ``torch.float16`` to halve the size);
            ``cfg.json`` keeps the compute dtype, and SAELens (like :func:`load_sae`) casts on
            load.

    Returns:
        The folder.
    """
    if not isinstance(sae, SparseAutoencoder):
        raise InvalidTypeError(f"save_sae writes a causalpatch SparseAutoencoder, got "
                               f"{type(sae).__name__} (a sae_lens.SAE has its own save_model)")
    from safetensors.torch import save

    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu", storage_dtype or v.dtype).contiguous()
               for k, v in sae.weights().items()}
    atomic_write_bytes(folder / SAE_WEIGHTS_FILENAME, save(tensors))
    if sae.log_sparsity is not None:
        atomic_write_bytes(folder / SPARSITY_FILENAME,
                           save({"sparsity": sae.log_sparsity.float().contiguous()}))
    atomic_write_text(folder / SAE_CFG_FILENAME, json.dumps(sae.config(), indent=2) + "\n")
    return folder


# -- SAE objects from elsewhere ---------------------------------------------------------------
class WrappedSAE:
    """Any ``encode``/``decode`` object with a declared site (see :func:`wrap_sae`)."""

    def __init__(self, sae: Any, site: str, d_in: int | None = None, d_sae: int | None = None,
                 model_name: str | None = None) -> None:
        if not (callable(getattr(sae, "encode", None)) and callable(getattr(sae, "decode", None))):
            raise InvalidTypeError(f"an SAE needs encode(x) and decode(f) methods; "
                                   f"{type(sae).__name__} has not both")
        self.sae = sae
        self.hook_name = site
        self.site = site_for_hook_name(site)
        self.d_in = d_in
        self.d_sae = d_sae
        self.model_name = model_name

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(f)

    def __repr__(self) -> str:
        return f"WrappedSAE({type(self.sae).__name__}, site={self.site!r})"


def wrap_sae(sae: Any, site: str, *, d_in: int | None = None, d_sae: int | None = None,
             model_name: str | None = None) -> WrappedSAE:
    """Declare the site of any object with ``encode(x)`` and ``decode(f)`` (e.g. a
    ``dictionary_learning`` ``AutoEncoder``), so it can be attached with ``saes=[...]``.

    Args:
        site: a canonical site (``blocks.8.resid_post``) or TransformerLens hook name.
        d_in, d_sae: sizes, when the object does not tell (``cfg.d_in``, ``activation_dim``,
            ``dict_size``, ``W_dec`` are looked for).
        model_name: the model it was trained on (enables the mismatch warning).
    """
    return WrappedSAE(sae, site, d_in, d_sae, model_name)


def _attr_path(obj: Any, *names: str) -> Any:
    for name in names:
        value = obj
        for part in name.split("."):
            value = getattr(value, part, None)
            if value is None:
                break
        if value is not None:
            return value
    return None


@dataclass(frozen=True, eq=False)
class BoundSAE:
    """An SAE attached to one site of one model: encode/decode on the site's activation shape.

    Attributes:
        sae: the SAE object.
        site: the resolved site.
        d_in, d_sae: widths.
        feature_shape: the site's trailing activation shape (``(d_model,)``, ``(n_heads,
            d_head)`` ...), whose product is ``d_in``.
        shaped_input: hand ``encode`` the activation in the site's own shape (SAELens
            ``hook_z`` SAEs) rather than flattened to ``[..., d_in]``.
    """

    sae: Any
    site: Site
    d_in: int
    d_sae: int
    feature_shape: tuple[int, ...]
    shaped_input: bool = False

    @property
    def name(self) -> str:
        return self.site.name

    def value_name(self, leaf: str) -> str:
        """``"blocks.20.resid_post.sae.features"`` for ``leaf="features"``."""
        return f"{self.site.name}.sae.{leaf}"

    def encode(self, act: torch.Tensor) -> torch.Tensor:
        """``[..., *feature_shape] -> [..., d_sae]``."""
        lead = act.shape[: act.dim() - len(self.feature_shape)]
        x = act if self.shaped_input else act.reshape(*lead, self.d_in)
        f = self.sae.encode(x)
        if not isinstance(f, torch.Tensor) or tuple(f.shape) != (*lead, self.d_sae):
            got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ShapeMismatchError(f"the SAE at {self.site.name} encoded {tuple(act.shape)} to "
                                     f"{got}; expected {(*lead, self.d_sae)}")
        return f

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """``[..., d_sae] -> [..., *feature_shape]`` (in the SAE's dtype)."""
        out = self.sae.decode(f)
        return out.reshape(*f.shape[:-1], *self.feature_shape)

    def check_features(self, features: Iterable[int], what: str = "features") -> list[int]:
        """Feature indices as a list, each in ``[0, d_sae)``."""
        out = []
        for j in features:
            if isinstance(j, bool) or not isinstance(j, int):
                raise InvalidTypeError(f"{what} must be ints, got {j!r}")
            if not 0 <= j < self.d_sae:
                raise OutOfRangeError(f"{what} contains {j}, out of range: the SAE at "
                                      f"{self.site.name} has {self.d_sae} features, so indices "
                                      f"must be in [0, {self.d_sae - 1}]")
            out.append(j)
        return out


def _norm_model_name(name: str) -> str:
    base = str(name).strip().rsplit("/", 1)[-1].lower().removesuffix(".gguf")
    return re.sub(r"[^a-z0-9]", "", base)


def same_model(a: str, b: str) -> bool:
    """Whether two model names plausibly name the same model (``HuggingFaceTB/SmolLM2-135M``
    and ``smollm2`` do; ``gpt2-small`` and ``SmolLM2-135M-Instruct`` do not)."""
    x, y = _norm_model_name(a), _norm_model_name(b)
    return bool(x) and bool(y) and (x.startswith(y) or y.startswith(x))


def bind_sae(model: HookedModel, sae: Any) -> BoundSAE:
    """Attach ``sae`` to ``model``: resolve its declared site and check its width, before any
    forward pass. Warns (:class:`SAEModelMismatchWarning`) when its config names another model.

    Raises:
        InvalidTypeError: ``sae`` has no ``encode``/``decode``.
        InvalidArgumentError: it declares no site (use :func:`wrap_sae`).
        UnknownComponentError / OutOfRangeError: the site does not exist in ``model``.
        ShapeMismatchError: its ``d_in`` differs from the site's width.
    """
    if isinstance(sae, BoundSAE):
        sae = sae.sae
    if not (callable(getattr(sae, "encode", None)) and callable(getattr(sae, "decode", None))):
        raise InvalidTypeError(f"an SAE needs encode(x) and decode(f) methods; got "
                               f"{type(sae).__name__}")
    declared = _attr_path(sae, "site", "hook_name", "cfg.metadata.hook_name", "cfg.hook_name")
    if not isinstance(declared, str) or not declared:
        raise InvalidArgumentError(
            f"the {type(sae).__name__} declares no site (no .site, .hook_name or "
            "cfg.metadata.hook_name): wrap it with causalpatch.sae.wrap_sae(sae, "
            "site='blocks.8.resid_post')")
    site = model.site(site_for_hook_name(declared))
    shape = site.feature_shape(model.dims)
    if shape is None:
        raise InvalidArgumentError(f"cannot attach an SAE to {site.name}: its activation width "
                                   "is unknown")
    width = math.prod(shape)
    d_in = _attr_path(sae, "d_in", "cfg.d_in", "activation_dim")
    if d_in is None:
        w_dec = getattr(sae, "W_dec", None)
        d_in = int(w_dec.shape[-1]) if isinstance(w_dec, torch.Tensor) else width
    d_in = int(d_in)
    if d_in != width:
        raise ShapeMismatchError(
            f"the SAE reads {d_in}-wide activations (d_in={d_in}) but {site.name} of this model "
            f"is {width} wide {tuple(shape)}: it was trained for another site or model")
    d_sae = _attr_path(sae, "d_sae", "cfg.d_sae", "dict_size")
    if d_sae is None:
        w_dec = getattr(sae, "W_dec", None)
        if isinstance(w_dec, torch.Tensor):
            d_sae = int(w_dec.shape[0])
        else:
            with torch.no_grad():
                d_sae = int(sae.encode(torch.zeros(1, d_in)).shape[-1])
    trained_on = _attr_path(sae, "model_name", "cfg.metadata.model_name", "cfg.model_name")
    if isinstance(trained_on, str) and trained_on and not same_model(trained_on, model.name):
        warnings.warn(
            f"the SAE at {site.name} was trained on model {trained_on!r} but is applied to "
            f"{model.name!r}", SAEModelMismatchWarning, stacklevel=3)
    reshape = _attr_path(sae, "reshape_activations", "cfg.reshape_activations")
    shaped = (reshape == "hook_z" and len(shape) > 1
              and not isinstance(sae, SparseAutoencoder))
    return BoundSAE(sae, site, d_in, int(d_sae), tuple(shape), shaped)


def bind_saes(model: HookedModel, saes: Sequence[Any] | Any | None) -> dict[str, BoundSAE]:
    """:func:`bind_sae` for each SAE: ``{site name: BoundSAE}``; one SAE per site."""
    if saes is None:
        return {}
    if not isinstance(saes, (list, tuple)):
        saes = [saes]
    out: dict[str, BoundSAE] = {}
    for sae in saes:
        bound = bind_sae(model, sae)
        if bound.name in out:
            raise InvalidArgumentError(f"two SAEs are attached to {bound.name}; attach one SAE "
                                       "per site")
        out[bound.name] = bound
    return out


def lookup_sae(model: HookedModel, bound: Mapping[str, BoundSAE], name: str
               ) -> tuple[BoundSAE, str] | None:
    """``(bound SAE, leaf)`` for an SAE value name, ``None`` for other names.

    Raises:
        UnknownComponentError: the name has an SAE suffix but no SAE sits at that site, or the
            leaf is unknown.
    """
    parsed = split_sae_name(name)
    if parsed is None:
        return None
    prefix, leaf = parsed
    if leaf not in SAE_LEAVES:
        raise UnknownComponentError(f"unknown SAE value {leaf!r} in {name!r}; expected one of "
                                    f"{', '.join(SAE_LEAVES)}")
    site = model.site(prefix)
    if site.name not in bound:
        attached = ", ".join(bound) or "none"
        raise UnknownComponentError(
            f"{name!r} names an SAE value at {site.name}, but no SAE is attached there "
            f"(attached: {attached}); pass saes=[sae] with an SAE for that site")
    return bound[site.name], leaf


def features_component(model: HookedModel, component: Any, saes: Sequence[Any] | None
                       ) -> BoundSAE | None:
    """The attached SAE when ``component`` names SAE features (``{site}.sae.features``), else
    ``None`` (then ``saes`` must not be given).

    Raises:
        InvalidArgumentError: SAE features named without ``saes``, another SAE value named, or
            ``saes`` given for a component that is not SAE features.
    """
    parsed = split_sae_name(component) if isinstance(component, str) else None
    if parsed is None:
        if saes:
            raise InvalidArgumentError(
                f"saes= is given but component {component!r} does not name SAE features; use "
                "component='<site>.sae.features' (e.g. 'blocks.20.resid_post.sae.features')")
        return None
    bound = bind_saes(model, saes)
    if not bound:
        raise InvalidArgumentError(f"component {component!r} names SAE features: pass the SAE "
                                   "with saes=[sae]")
    found = lookup_sae(model, bound, component)
    assert found is not None
    if found[1] != "features":
        raise InvalidArgumentError(f"component {component!r}: only SAE features can be swept; "
                                   f"use {found[0].value_name('features')!r}")
    return found[0]


# -- the splice ---------------------------------------------------------------------------------
def _position_mask(new: torch.Tensor, old: torch.Tensor, n_trailing: int) -> torch.Tensor:
    """``[..., 1 x n_trailing]`` True where ``new`` and ``old`` differ anywhere in the trailing
    ``n_trailing`` dims."""
    differ = new != old
    for _ in range(n_trailing):
        differ = differ.any(-1)
    return differ.reshape(*differ.shape, *([1] * n_trailing))


def splice(bound: BoundSAE, feature_edits: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (),
           error_edits: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (),
           keep_error: bool = True,
           record: Callable[[str, torch.Tensor], None] | None = None,
           wants: Iterable[str] = ()) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """A hook function splicing ``bound`` into the forward pass at its site.

    ``x -> x + (decode(f') - decode(f)) + (error' - error)`` at the positions where the edits
    changed something (``x`` itself elsewhere, bit for bit), or ``decode(f')`` everywhere with
    ``keep_error=False``. ``f = encode(x)``; ``f'`` / ``error'`` are ``f`` / ``error`` after
    ``feature_edits`` / ``error_edits`` (in order).

    Args:
        record: called with ``(leaf, tensor)`` for every leaf in ``wants``.
    """
    wants = set(wants)
    n_trailing = len(bound.feature_shape)

    def run(act: torch.Tensor) -> torch.Tensor | None:
        if "input" in wants and record is not None:
            record("input", act)
        f = bound.encode(act)
        edited = f
        for edit in feature_edits:
            edited = edit(edited)
        if "features" in wants and record is not None:
            record("features", edited)
        f_changed = edited is not f and not torch.equal(edited, f)
        need_error = bool(error_edits) or "error" in wants
        need_recon1 = f_changed or not keep_error or "recons" in wants
        recon0 = bound.decode(f) if (need_error or (keep_error and f_changed)
                                     or (need_recon1 and not f_changed)) else None
        recon1 = (recon0 if not f_changed else bound.decode(edited)) if need_recon1 else None
        error = new_error = None
        if need_error:
            assert recon0 is not None
            error = act.float() - recon0.float()
            new_error = error
            for edit in error_edits:
                new_error = edit(new_error)
            if "error" in wants and record is not None:
                record("error", new_error)
        if "recons" in wants and record is not None:
            record("recons", recon1)
        if not keep_error:
            new: torch.Tensor | None = recon1.to(act.dtype)
        else:
            out = act.float()
            changed = False
            if f_changed:
                assert recon0 is not None
                mask = _position_mask(edited, f, 1)[..., 0].reshape(
                    *f.shape[:-1], *([1] * n_trailing))
                out = torch.where(mask, out + (recon1.float() - recon0.float()), out)
                changed = True
            if error is not None and new_error is not error and not torch.equal(new_error, error):
                mask = _position_mask(new_error, error, n_trailing)
                out = torch.where(mask, out + (new_error - error), out)
                changed = True
            new = out.to(act.dtype) if changed else None
        if "output" in wants and record is not None:
            record("output", act if new is None else new)
        return new

    return run


class FeatureEdit(Intervention):
    """Set, scale or shift chosen SAE features (an intervention on ``{site}.sae.features``).

    Args:
        features: feature indices.
        value: replacement value(s), broadcasting to ``[batch, n_positions, n_features]``.
        scale: multiply the features by this.
        add: add this to the features.
        positions: token positions (negative count from the end); default all.
    """

    def __init__(self, features: Sequence[int] | int, *, value: Any = None,
                 scale: float | None = None, add: float | None = None,
                 positions: Index = None) -> None:
        super().__init__(positions, None)
        feats = [features] if isinstance(features, int) and not isinstance(features, bool) \
            else list(features)
        if not feats or any(isinstance(j, bool) or not isinstance(j, int) for j in feats):
            raise InvalidTypeError(f"features must be a non-empty list of ints, got {features!r}")
        if sum(x is not None for x in (value, scale, add)) != 1:
            raise InvalidArgumentError("give exactly one of value=, scale= or add=")
        self.features = feats
        self.value = None if value is None else torch.as_tensor(value).detach().clone()
        self.scale = scale
        self.add = add

    def validate(self, shape: tuple[int, ...], site: str = "") -> None:
        super().validate(shape, site)
        d_sae = shape[-1]
        for j in self.features:
            if not 0 <= j < d_sae:
                where = f" at {site!r}" if site else ""
                raise OutOfRangeError(f"feature {j} of FeatureEdit{where} is out of range: the "
                                      f"SAE has {d_sae} features, so indices must be in "
                                      f"[0, {d_sae - 1}]")
        if self.value is not None:
            target = (*self.selected_shape(shape)[:-1], len(self.features))
            try:
                fits = torch.broadcast_shapes(tuple(self.value.shape), target) == target
            except RuntimeError:
                fits = False
            if not fits:
                raise ShapeMismatchError(
                    f"FeatureEdit value has shape {tuple(self.value.shape)}, which does not "
                    f"broadcast to [batch, positions, features] = {target}")

    def transform(self, selected: torch.Tensor) -> torch.Tensor:
        out = selected.clone()
        idx = torch.tensor(self.features, device=selected.device)
        current = out[..., idx]
        if self.value is not None:
            new = self.value.to(selected.device, selected.dtype).expand_as(current)
        elif self.scale is not None:
            new = current * self.scale
        else:
            new = current + self.add
        out[..., idx] = new
        return out

    def __repr__(self) -> str:
        return (f"FeatureEdit(features={self.features}, value={self.value}, scale={self.scale}, "
                f"add={self.add}, positions={self.positions})")


def edit_features(features: Sequence[int] | int, *, value: Any = None,
                  scale: float | None = None, add: float | None = None,
                  positions: Index = None) -> FeatureEdit:
    """An intervention on ``{site}.sae.features``: set (``value=``), scale or shift features.

    Example::

        model.trace(prompt, saes=[sae], interventions={
            "blocks.20.resid_post.sae.features": edit_features([12, 40], value=0.0,
                                                               positions=[-1])})
    """
    return FeatureEdit(features, value=value, scale=scale, add=add, positions=positions)


def feature_edit_values(bound: BoundSAE, act: torch.Tensor, feature: int,
                        new: torch.Tensor) -> torch.Tensor:
    """The activation after setting one feature, error term kept: ``act + decode(f') -
    decode(f)`` where ``f = encode(act)`` and ``f'`` is ``f`` with ``f[..., feature] = new``;
    positions whose features do not change keep ``act`` exactly.

    Args:
        act: ``[pos, *feature_shape]`` the site's activation at the positions to edit.
        new: ``[pos]`` the feature's new value at each position.

    Returns:
        ``[pos, *feature_shape]`` in ``act``'s dtype.
    """
    f = bound.encode(act)  # [pos, d_sae]
    edited = f.clone()
    edited[:, feature] = new.to(f.device, f.dtype)
    changed = (edited != f).any(-1).reshape(-1, *([1] * len(bound.feature_shape)))
    delta = bound.decode(edited).float() - bound.decode(f).float()
    return torch.where(changed, act.float() + delta, act.float()).to(act.dtype)


# -- training data: real text that ships offline ---------------------------------------------
def training_texts(sources: Sequence[str] = ("known_facts", "python_reference",
                                             "stdlib_docstrings")) -> list[tuple[str, str]]:
    """Real English text available offline, as ``(source, text)`` documents.

    * ``"known_facts"``: causalpatch's ``data/known_1000.json`` (ROME's known facts: each
      prompt with the model continuation recorded there),
    * ``"python_reference"``: Python's own documentation topics (``pydoc_data.topics``, the
      language reference as shipped with the interpreter),
    * ``"stdlib_docstrings"``: the docstrings of the standard library's top-level modules, read
      from the source files with :mod:`ast` (nothing is imported).
    """
    docs: list[tuple[str, str]] = []
    for source in sources:
        if source == "known_facts":
            data = json.loads(resources.files("causalpatch").joinpath(
                "data/known_1000.json").read_text(encoding="utf-8"))
            for fact in data:
                docs.append((source, f"{fact['prompt']}{fact.get('prediction', '')}".strip()))
        elif source == "python_reference":
            import pydoc_data.topics as topics

            docs += [(source, topics.topics[key]) for key in sorted(topics.topics)]
        elif source == "stdlib_docstrings":
            stdlib = Path(sysconfig.get_paths()["stdlib"])
            for file in sorted(stdlib.glob("*.py")):
                try:
                    tree = ast.parse(file.read_text(encoding="utf-8"))
                except (SyntaxError, UnicodeDecodeError, ValueError):
                    continue
                for node in ast.walk(tree):
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                         ast.AsyncFunctionDef)):
                        doc = ast.get_docstring(node)
                        if doc and len(doc) > 40:
                            docs.append((source, doc))
        else:
            raise InvalidArgumentError(f"unknown text source {source!r}; expected known_facts, "
                                       "python_reference or stdlib_docstrings")
    return docs


def token_sequences(model: HookedModel, docs: Sequence[tuple[str, str]], context: int,
                    seed: int = 0) -> tuple[torch.Tensor, dict[str, int]]:
    """Tokenise documents per source, cut each source's token stream into ``context``-token
    sequences, and shuffle them (seeded): ``([n, context] ids, tokens per source)``."""
    by_source: dict[str, list[int]] = {}
    for source, text in docs:
        ids = model.tokenizer.encode(text, add_special_tokens=False)
        eos = getattr(model.tokenizer, "eos_token_id", None)
        by_source.setdefault(source, []).extend(list(ids) + ([int(eos)] if eos is not None
                                                              else []))
    rows = []
    for stream in by_source.values():
        n = len(stream) // context
        rows += [stream[i * context : (i + 1) * context] for i in range(n)]
    if not rows:
        raise InvalidArgumentError(f"the texts hold fewer than context={context} tokens")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    return torch.tensor(rows, dtype=torch.long)[order], {s: len(v) for s, v in by_source.items()}


def collect_activations(model: HookedModel, site: str | Site, ids: torch.Tensor, *,
                        batch_size: int = 16, skip_first: int = 1,
                        progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The activations of ``site`` on token sequences ``ids`` ``[n, T]``, flattened to
    ``[n * (T - skip_first), width]`` float32. Each forward stops right after the site.

    ``skip_first`` drops the first positions of every sequence (SmolLM2's first position is
    an attention sink whose residual norm is ~100x the others).
    """
    site_ = model.site(site) if isinstance(site, str) else site
    out: list[torch.Tensor] = []
    store: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor) -> None:
        store["act"] = act.detach()
        raise StopForward

    for lo in range(0, ids.shape[0], batch_size):
        chunk = ids[lo : lo + batch_size].to(model.device)
        with torch.no_grad(), hooked(model.hf_model, [Hook(site_, grab)], model.dims):
            try:
                model.runtime.forward(chunk, last_only=True)
            except StopForward:
                pass
        act = store.pop("act")[:, skip_first:]
        out.append(act.reshape(-1, math.prod(act.shape[2:])).float().cpu())
        if progress is not None:
            progress(min(lo + batch_size, ids.shape[0]), ids.shape[0])
    return torch.cat(out)


# -- training -------------------------------------------------------------------------------------
@dataclass
class TrainingReport:
    """What :func:`train_sae` did and how good the SAE is (on held-out text).

    Attributes:
        explained_variance: ``1 - sum |x - x_hat|^2 / sum |x - mean x|^2`` on held-out tokens.
        l0: mean number of active features per token.
        dead_fraction: share of features that never fired on the training and held-out tokens.
        ce_clean, ce_spliced, ce_zero: the model's next-token loss (nats) on held-out sequences:
            unchanged, with the SAE's reconstruction replacing the site (``keep_error=False``),
            and with the site zeroed; both edits at every position but the first and the
            attention sinks.
        ce_recovered: ``(ce_zero - ce_spliced) / (ce_zero - ce_clean)``.
        sink_tokens: attention-sink tokens left out (activation norm above ``sink_norm``,
            :data:`SINK_NORM_FACTOR` times the median).
    """

    model_name: str
    site: str
    hook_name: str
    architecture: str
    d_sae: int
    k: int | None
    l1_coefficient: float | None
    train_tokens: int
    eval_tokens: int
    context: int
    epochs: int
    steps: int
    lr: float
    seed: int
    text_tokens: dict[str, int]
    explained_variance: float = float("nan")
    l0: float = float("nan")
    dead_fraction: float = float("nan")
    ce_clean: float = float("nan")
    ce_spliced: float = float("nan")
    ce_zero: float = float("nan")
    ce_recovered: float = float("nan")
    sink_tokens: int = 0
    sink_norm: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return "\n".join([
            f"SAE {self.architecture}{k}, {self.d_sae} features at {self.site} "
            f"({self.hook_name}) of {self.model_name}",
            f"  trained on {self.train_tokens} tokens x {self.epochs} epochs ({self.steps} "
            f"steps), held out {self.eval_tokens}; text: "
            + ", ".join(f"{s} {n}" for s, n in self.text_tokens.items()),
            f"  explained variance {self.explained_variance:.3f}, L0 {self.l0:.1f}, dead "
            f"features {100 * self.dead_fraction:.1f}% ({self.sink_tokens} attention-sink "
            f"tokens with norm > {self.sink_norm or float('nan'):.0f} left out)",
            f"  next-token loss: clean {self.ce_clean:.3f}, SAE spliced {self.ce_spliced:.3f}, "
            f"site zeroed {self.ce_zero:.3f} -> {100 * self.ce_recovered:.1f}% recovered",
            "  seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in self.seconds.items()),
        ])


def _auxk_loss(pre: torch.Tensor, error: torch.Tensor, dead: torch.Tensor, w_dec: torch.Tensor,
               k_aux: int) -> torch.Tensor:
    """OpenAI's AuxK loss: dead latents learn to reconstruct the residual error."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    k = min(k_aux, n_dead)
    masked = torch.where(dead[None], torch.relu(pre), torch.zeros_like(pre))
    values, indices = masked.topk(k, dim=-1, sorted=False)
    recon = torch.zeros_like(pre).scatter(-1, indices, values) @ w_dec
    return ((recon - error) ** 2).sum(-1).mean() / error.pow(2).sum(-1).mean().clamp_min(1e-8)


def _next_token_loss(model: HookedModel, ids: torch.Tensor, hooks: Sequence[Hook],
                     batch_size: int = 4) -> float:
    total, count = 0.0, 0
    for lo in range(0, ids.shape[0], batch_size):
        chunk = ids[lo : lo + batch_size].to(model.device)
        with torch.no_grad(), hooked(model.hf_model, hooks, model.dims):
            logits = model.runtime.forward(chunk)[0].float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
            reduction="sum")
        total += float(loss)
        count += chunk[:, 1:].numel()
    return total / count


#: Tokens whose activation norm exceeds this multiple of the median are attention sinks
#: (SmolLM2's first position and a few tokens after separators have ~100x the usual residual
#: norm): left out of training and of the report, and never replaced when the SAE is spliced
#: in for the loss (the exact splice handles them through the error term).
SINK_NORM_FACTOR = 10.0


def _where_ordinary(fn: Callable[[torch.Tensor], torch.Tensor | None], max_norm: float | None
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Apply ``fn`` except at the first position and at attention sinks (norm > max_norm)."""

    def run(act: torch.Tensor) -> torch.Tensor:
        new = fn(act)
        if new is None:
            return act
        keep = torch.zeros(act.shape[:2], dtype=torch.bool, device=act.device)
        keep[:, 1:] = True
        if max_norm is not None:
            keep &= act.flatten(2).norm(dim=-1) <= max_norm
        keep = keep.reshape(*keep.shape, *([1] * (act.dim() - 2)))
        return torch.where(keep, new.to(act.dtype), act)

    return run


def ordinary_tokens(acts: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """The rows of ``acts`` ``[n, d]`` that are not attention sinks."""
    return acts if max_norm is None else acts[acts.norm(dim=-1) <= max_norm]


def evaluate_sae(model: HookedModel, sae: Any, acts: torch.Tensor,
                 ids: torch.Tensor | None = None, *, batch_tokens: int = 4096,
                 max_norm: float | None = None) -> dict[str, float]:
    """Explained variance, L0 and alive features on activations ``acts`` ``[n, d_in]``, and,
    with held-out sequences ``ids``, the model's next-token loss clean / SAE spliced (no error
    term) / site zeroed. Tokens with activation norm above ``max_norm`` (attention sinks) are
    left out of the statistics and left untouched by the splice and the zeroing, as is the
    first position of every sequence.
    """
    bound = bind_sae(model, sae)
    acts = ordinary_tokens(acts, max_norm)
    sse, l0, fired = 0.0, 0.0, torch.zeros(bound.d_sae, dtype=torch.bool)
    with torch.no_grad():
        for lo in range(0, acts.shape[0], batch_tokens):
            x = acts[lo : lo + batch_tokens]
            f = bound.sae.encode(x)
            sse += float(((bound.sae.decode(f).float() - x) ** 2).sum())
            l0 += float((f > 0).sum())
            fired |= (f > 0).any(0).cpu()
    sst = float(((acts - acts.mean(0)) ** 2).sum())
    out = {"explained_variance": 1 - sse / sst, "l0": l0 / acts.shape[0],
           "alive": float(fired.float().mean())}
    if ids is not None:
        out["ce_clean"] = _next_token_loss(model, ids, [])
        spliced = _where_ordinary(splice(bound, keep_error=False), max_norm)
        out["ce_spliced"] = _next_token_loss(model, ids, [Hook(bound.site, spliced)])
        zero = _where_ordinary(torch.zeros_like, max_norm)
        out["ce_zero"] = _next_token_loss(model, ids, [Hook(bound.site, zero)])
        gap = out["ce_zero"] - out["ce_clean"]
        out["ce_recovered"] = (out["ce_zero"] - out["ce_spliced"]) / gap if gap else float("nan")
    return out


def fit_sae(x_train: torch.Tensor, n_features: int, *, architecture: str = "topk",
            k: int = 32, l1_coefficient: float = 3.0, epochs: int = 8, batch_tokens: int = 512,
            lr: float = 4e-4, seed: int = 0, log: Callable[[str], None] | None = None
            ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, int, int]:
    """Train SAE weights on activations ``x_train`` ``[n, d_in]`` (see :func:`train_sae`).

    Returns:
        ``(weights, firing counts in the last epoch [d_sae], fired at all [d_sae], n, steps)``;
        the weights read raw (unscaled) activations.
    """
    say = log or (lambda _msg: None)
    d_in = x_train.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    scale = math.sqrt(d_in) / float(x_train.norm(dim=-1).mean())
    xs = x_train * scale
    w_dec = torch.randn(n_features, d_in, generator=gen)
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    params = {"W_enc": w_dec.T.clone(), "b_enc": torch.zeros(n_features), "W_dec": w_dec,
              "b_dec": xs.mean(0)}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr, betas=(0.9, 0.999))
    n = xs.shape[0]
    steps_per_epoch = max(1, n // batch_tokens)
    total = steps_per_epoch * epochs
    decay_from = int(0.8 * total)
    since_fired = torch.zeros(n_features)
    fired_ever = torch.zeros(n_features, dtype=torch.bool)
    counts = torch.zeros(n_features)
    dead_after = 20_000  # tokens without firing
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        running = 0.0
        for b in range(steps_per_epoch):
            x = xs[order[b * batch_tokens : (b + 1) * batch_tokens]]
            pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
            if architecture == "topk":
                values, indices = pre.topk(k, dim=-1, sorted=False)
                f = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
            else:
                f = torch.relu(pre)
            recon = f @ params["W_dec"] + params["b_dec"]
            mse = ((recon - x) ** 2).sum(-1).mean() / ((x - x.mean(0)) ** 2).sum(-1).mean()
            loss = mse
            active = (f > 0).detach()
            since_fired += x.shape[0]
            since_fired[active.any(0)] = 0
            fired_ever |= active.any(0)
            if epoch == epochs - 1:
                counts += active.float().sum(0)
            if architecture == "topk":
                dead = since_fired > dead_after
                loss = loss + _auxk_loss(pre, (x - recon).detach(), dead, params["W_dec"],
                                         d_in // 2) / 32
            else:
                sparsity = (f * params["W_dec"].norm(dim=-1)).sum(-1).mean()
                loss = loss + l1_coefficient * sparsity / d_in
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if step >= decay_from:
                for g in opt.param_groups:
                    g["lr"] = lr * (total - step) / max(1, total - decay_from)
            opt.step()
            with torch.no_grad():
                params["W_dec"] /= params["W_dec"].norm(dim=-1, keepdim=True).clamp_min(1e-8)
            running += float(mse.detach())
            step += 1
        say(f"epoch {epoch + 1}/{epochs}: normalised MSE {running / steps_per_epoch:.4f}, dead "
            f"{int((since_fired > dead_after).sum())}")
    weights = {name: p.detach().clone() for name, p in params.items()}
    weights["W_enc"] *= scale  # fold the input scaling: the SAE reads raw activations
    weights["W_dec"] /= scale
    weights["b_dec"] /= scale
    return weights, counts, fired_ever, n, total


def train_sae(model: HookedModel, site: str = "blocks.20.resid_post", n_features: int = 2048,
              *, architecture: str = "topk", k: int = 32, l1_coefficient: float = 3.0,
              train_tokens: int = 100_000, eval_tokens: int = 4096, context: int = 128,
              epochs: int = 8, batch_tokens: int = 512, lr: float = 4e-4, seed: int = 0,
              docs: Sequence[tuple[str, str]] | None = None,
              log: Callable[[str], None] | None = None) -> tuple[SparseAutoencoder,
                                                                 TrainingReport]:
    """Train an SAE on ``site`` activations of real text (:func:`training_texts`).

    Activations are collected once (positions after the first of each ``context``-token
    sequence; attention-sink tokens, whose norm exceeds :data:`SINK_NORM_FACTOR` times the
    median, are left out), scaled to mean norm ``sqrt(d_in)`` for training (the scale is folded into the
    saved weights, so the SAE reads raw activations), and trained with Adam for ``epochs``
    passes. ``topk``: MSE + OpenAI's AuxK loss (coefficient 1/32) for dead latents; ``standard``:
    MSE + ``l1_coefficient * sum(f * |W_dec|)`` (ReLU). Decoder rows are kept at unit norm.

    Returns:
        ``(sae, report)``; the report holds explained variance, L0, dead features and the
        next-token loss with the SAE spliced in, on held-out sequences.
    """
    if architecture not in ("topk", "standard"):
        raise InvalidArgumentError(f"train_sae trains 'topk' or 'standard' SAEs, got "
                                   f"{architecture!r}")
    say = log or (lambda _msg: None)
    site_ = model.site(site)
    shape = site_.feature_shape(model.dims)
    if shape is None or len(shape) != 1:
        raise InvalidArgumentError(f"train_sae trains SAEs on vector sites (e.g. resid_post), "
                                   f"not {site_.name}")
    d_in = shape[0]
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    ids, per_source = token_sequences(model, docs if docs is not None else training_texts(),
                                      context, seed)
    per_seq = context - 1
    n_eval = max(1, -(-eval_tokens // per_seq))
    n_train = max(1, -(-train_tokens // per_seq))
    if n_eval + n_train > ids.shape[0]:
        raise InvalidArgumentError(
            f"the texts hold {ids.shape[0] * per_seq} usable tokens, fewer than train_tokens + "
            f"eval_tokens = {train_tokens + eval_tokens}")
    eval_ids, train_ids = ids[:n_eval], ids[n_eval : n_eval + n_train]
    say(f"collecting {n_train * per_seq} training activations at {site_.name}")
    x_all = collect_activations(model, site_, train_ids)
    x_eval_all = collect_activations(model, site_, eval_ids)
    max_norm = SINK_NORM_FACTOR * float(x_all.norm(dim=-1).median())
    x_train = ordinary_tokens(x_all, max_norm)
    x_eval = ordinary_tokens(x_eval_all, max_norm)
    n_sinks = (x_all.shape[0] - x_train.shape[0]) + (x_eval_all.shape[0] - x_eval.shape[0])
    say(f"left out {n_sinks} attention-sink tokens (norm > {max_norm:.0f})")
    del x_all
    times["collect"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    weights, counts, fired_ever, n, total = fit_sae(
        x_train, n_features, architecture=architecture, k=k, l1_coefficient=l1_coefficient,
        epochs=epochs, batch_tokens=batch_tokens, lr=lr, seed=seed, log=say)
    times["train"] = time.perf_counter() - t1

    hook_name = hook_name_for_site(site_.name)
    sae = SparseAutoencoder(
        d_in, n_features, architecture, hook_name=hook_name, model_name=model.name,
        k=k if architecture == "topk" else None, weights=weights,
        metadata={"context_size": context, "prepend_bos": False,
                  "dataset_path": "causalpatch.sae.training_texts: " + ", ".join(per_source),
                  "exclude_first_positions": 1, "sink_norm_threshold": max_norm,
                  "trained_with": "causalpatch sae train", "train_tokens": int(n),
                  "epochs": epochs, "seed": seed})
    sae.log_sparsity = torch.log10(counts / max(1, n) + 1e-10)
    t2 = time.perf_counter()
    stats = evaluate_sae(model, sae, x_eval, eval_ids, max_norm=max_norm)
    times["eval"] = time.perf_counter() - t2
    with torch.no_grad():
        for lo in range(0, x_eval.shape[0], 4096):
            fired_ever |= (sae.encode(x_eval[lo : lo + 4096]) > 0).any(0)
    report = TrainingReport(
        model_name=model.name, site=site_.name, hook_name=hook_name, architecture=architecture,
        d_sae=n_features, k=k if architecture == "topk" else None,
        l1_coefficient=l1_coefficient if architecture == "standard" else None,
        train_tokens=int(n), eval_tokens=int(x_eval.shape[0]), context=context, epochs=epochs,
        steps=total, lr=lr, seed=seed, text_tokens=per_source,
        explained_variance=stats["explained_variance"], l0=stats["l0"],
        dead_fraction=1 - float(fired_ever.float().mean()), ce_clean=stats["ce_clean"],
        ce_spliced=stats["ce_spliced"], ce_zero=stats["ce_zero"],
        ce_recovered=stats["ce_recovered"], sink_tokens=int(n_sinks), sink_norm=max_norm,
        seconds=times)
    sae.metadata["training_report"] = {k: v for k, v in report.to_dict().items()
                                       if k not in ("seconds",)}
    return sae, report


def top_activations(model: HookedModel, sae: Any, features: Sequence[int], ids: torch.Tensor,
                    *, k: int = 5, window: int = 6, batch_size: int = 16
                    ) -> dict[int, list[dict[str, Any]]]:
    """The ``k`` strongest activations of each feature on sequences ``ids`` ``[n, T]`` (the
    first position of each sequence is skipped), each with its token and context.

    Returns:
        ``{feature: [{"activation", "token", "context", "sequence", "position"}, ...]}``.
    """
    bound = bind_sae(model, sae)
    feats = bound.check_features(features)
    idx = torch.tensor(feats)
    best_v = torch.full((len(feats), k), -1.0)
    best_at = torch.full((len(feats), k, 2), -1, dtype=torch.long)
    for lo in range(0, ids.shape[0], batch_size):
        acts = collect_activations(model, bound.site, ids[lo : lo + batch_size],
                                   batch_size=batch_size, skip_first=1)
        with torch.no_grad():
            f = bound.encode(acts)[:, idx].float()  # [tokens, n_feats]
        per_seq = ids.shape[1] - 1
        where = torch.arange(f.shape[0])
        seq = lo + where // per_seq
        pos = 1 + where % per_seq
        cand_v = torch.cat([best_v, f.T], dim=1)
        cand_at = torch.cat([best_at, torch.stack([seq, pos], -1)[None].expand(len(feats), -1,
                                                                                 -1)], dim=1)
        top = cand_v.topk(k, dim=1)
        best_v = top.values
        best_at = cand_at.gather(1, top.indices[..., None].expand(-1, -1, 2))
    decode = model.tokenizer.decode
    out: dict[int, list[dict[str, Any]]] = {}
    for i, j in enumerate(feats):
        rows = []
        for v, (s, p) in zip(best_v[i].tolist(), best_at[i].tolist()):
            if s < 0 or v <= 0:
                continue
            row = ids[s].tolist()
            rows.append({"activation": v, "token": decode([row[p]]),
                         "context": decode(row[max(0, p - window) : p]) + "[[" + decode(
                             [row[p]]) + "]]" + decode(row[p + 1 : p + 3]),
                         "sequence": s, "position": p})
        out[j] = rows
    return out


__all__ = [
    "ARCHITECTURES", "BoundSAE", "FeatureEdit", "SAEFormatError", "SAEModelMismatchWarning",
    "SAENotFoundError", "SparseAutoencoder", "TrainingReport", "WrappedSAE", "bind_sae",
    "bind_saes", "collect_activations", "edit_features", "evaluate_sae", "features_component",
    "feature_edit_values", "fit_sae", "hook_name_for_site", "lookup_sae", "splice",
    "load_sae", "save_sae", "site_for_hook_name", "split_sae_name", "top_activations",
    "token_sequences", "train_sae", "training_texts", "wrap_sae",
]
