"""The sparse autoencoder itself, and an SAE attached to one site of one model.

An SAE reads a site's activation ``x`` ``[..., d_in]`` (``d_in`` is the site's width:
``d_model`` for residual sites, ``n_heads * d_head`` for ``attn.z``), encodes it into feature
activations ``f`` ``[..., d_sae]`` and decodes them back into ``x_hat`` ``[..., d_in]``.
:class:`SparseAutoencoder` is the SAELens maths exactly (``standard``, ``topk``,
``jumprelu``)::

    sae_in = x - b_dec * apply_b_dec_to_input
    pre    = sae_in @ W_enc + b_enc                      # W_enc [d_in, d_sae], b_enc [d_sae]
    f      = relu(pre)                                   # standard
           = relu(pre) * (pre > relu(threshold))        # jumprelu, threshold [d_sae]
           = topk(pre * |W_dec| if rescale else pre, k) (relu of the k largest, 0 elsewhere)
    x_hat  = (f / |W_dec| if topk and rescale else f) @ W_dec + b_dec   # W_dec [d_sae, d_in]

**Any SAE object works.** Besides :class:`SparseAutoencoder`, anything with ``encode(x)`` and
``decode(f)`` and a declared site can be attached: a ``sae_lens.SAE`` (its
``cfg.metadata.hook_name`` is read), or any object wrapped with :func:`wrap_sae` (for example a
``dictionary_learning`` autoencoder). SAELens itself is not a dependency.

**Binding.** :func:`bind_sae` attaches an SAE to a model before any forward pass: it resolves
the declared site (a TransformerLens hook name such as ``blocks.8.hook_resid_post``, or a
canonical name), checks the width and warns when the SAE was trained on another model. The
result, a :class:`BoundSAE`, encodes and decodes in the site's own activation shape
(``[..., *feature_shape] <-> [..., d_sae]``) and checks feature indices.

The SAELens ``cfg.json`` layout of a :class:`SparseAutoencoder` is :meth:`~SparseAutoencoder.config`
(reading and writing folders is :mod:`causalpatch.sae.format`).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..errors import (CausalPatchError, InvalidArgumentError, InvalidTypeError, OutOfRangeError,
                      ShapeMismatchError, UnknownComponentError)
from ..names import TL_GLOBAL_HOOKS, TL_LAYER_HOOKS, TL_SITE_KINDS, Site, site_name_for_hook_name

if TYPE_CHECKING:
    from ..model import HookedModel

#: Architectures :func:`load_sae` understands.
ARCHITECTURES = ("standard", "topk", "jumprelu")
#: The SAELens config format written by :func:`save_sae` (SAELens reads
#: ``metadata.sae_lens_version`` to tell 6.x configs from older flat ones).
SAELENS_FORMAT_VERSION = "6.0.0"


class SAEFormatError(CausalPatchError, ValueError):
    """An SAE folder's ``cfg.json`` or weights are not a valid SAELens SAE (the message names
    the file, the field or tensor, what was found and what was expected)."""

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


# -- the SAE ------------------------------------------------------------------------------------
def positive_int(value: Any, what: str, where: str) -> int:
    """``value`` when it is a positive ``int`` (not a ``bool``); else :class:`SAEFormatError`
    naming ``what`` and ``where`` (a file or class)."""
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

    # registered as parameters by ``setattr`` in ``__init__`` (``threshold``: jumprelu only)
    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter
    threshold: nn.Parameter
    k: int | None

    def __init__(self, d_in: int, d_sae: int, architecture: str = "standard", *,
                 hook_name: str, model_name: str | None = None, k: int | None = None,
                 apply_b_dec_to_input: bool = True, rescale_acts_by_decoder_norm: bool = False,
                 reshape_activations: str = "none", dtype: torch.dtype = torch.float32,
                 metadata: Mapping[str, Any] | None = None,
                 weights: Mapping[str, torch.Tensor] | None = None, seed: int = 0) -> None:
        super().__init__()
        where = "SparseAutoencoder"
        self.d_in = positive_int(d_in, "d_in", where)
        self.d_sae = positive_int(d_sae, "d_sae", where)
        if architecture not in ARCHITECTURES:
            raise SAEFormatError(f"unknown SAE architecture {architecture!r}; supported: "
                                 f"{', '.join(ARCHITECTURES)}")
        self.architecture = architecture
        if architecture == "topk":
            self.k = positive_int(k, "k", where)
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
        assert self.k is not None  # topk (the remaining architecture) always has k
        values, indices = torch.topk(pre, k=self.k, dim=-1, sorted=False)
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
