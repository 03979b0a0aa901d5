"""Component names: parse ``blocks.5.attn.z``, ``layers.5.mlp`` or ``model.layers.5.mlp``.

A name resolves to a :class:`Site`: the module to hook, the hook kind, the view that turns the
hooked tensor into the canonical activation, and the layer. Canonical names are

* ``blocks.{L}.resid_pre`` – input of decoder layer ``L`` ``[batch, pos, d_model]``
* ``blocks.{L}.resid_mid`` – residual stream between attention and MLP
* ``blocks.{L}.resid_post`` – output of decoder layer ``L``
* ``blocks.{L}.attn`` / ``blocks.{L}.mlp`` – block outputs before the residual add
* ``blocks.{L}.attn.z`` – per-head output before the output projection
  ``[batch, pos, n_heads, d_head]``
* ``blocks.{L}.attn.q|k|v`` – per-head queries/keys/values (k/v have ``n_kv_heads`` heads)
* ``blocks.{L}.attn.pattern`` – attention weights ``[batch, head, query, key]`` (read-only;
  TransformerLens ``hook_pattern``)
* ``blocks.{L}.mlp.post`` – MLP hidden activations ``[batch, pos, d_mlp]``
* ``embed`` – token embedding output; ``ln_final`` – final norm output.

Raw module paths of the Hugging Face model and the short forms ``layers.{L}.mlp`` /
``layers.{L}.self_attn`` are accepted as well. A raw path always means that module's
**output** (as in the seeds): ``layers.{L}.self_attn.o_proj`` is the projected attention
output, while the per-head input of ``o_proj`` is the canonical ``blocks.{L}.attn.z`` (and the
input of the MLP's down projection is ``blocks.{L}.mlp.post``).

A module path followed by ``.input`` means that module's **input** (its first argument):
``layers.{L}.input`` is ``blocks.{L}.resid_pre``, ``layers.{L}.mlp.down_proj.input`` is
``blocks.{L}.mlp.post``, and an input without a canonical name
(``layers.{L}.self_attn.o_proj.input``, flat ``[batch, pos, n_heads * d_head]``) keeps the
module path. ``model.layers[L].mlp.input`` inside a trace reads these names.

**TransformerLens hook names** (``blocks.{L}.hook_resid_post``, ``blocks.{L}.attn.hook_z``,
``hook_embed``, ...) are a second vocabulary for the same sites, used by SAELens configs:
:data:`TL_LAYER_HOOKS` and :data:`TL_GLOBAL_HOOKS` map them to canonical names, and
:func:`site_name_for_hook_name` / :func:`hook_name_for_site` translate in both directions
without a model (plain string functions).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .adapters.base import IDENTITY, SEED_MODULE_NAMES, Adapter, HookKind, ModelDims, View
from .errors import OutOfRangeError, UnknownComponentError

#: Other words for per-layer site kinds: TransformerLens hook names users type from habit, and
#: the sweep words of :func:`causalpatch.activation_patching` (``attn_head`` = every head's
#: ``attn.z``). The one vocabulary besides the canonical kinds themselves.
ALIASES: dict[str, str] = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn",
    "hook_mlp_out": "mlp",
    "attn.hook_z": "attn.z",
    "attn.hook_q": "attn.q",
    "attn.hook_k": "attn.k",
    "attn.hook_v": "attn.v",
    "attn.hook_pattern": "attn.pattern",
    "hook_pattern": "attn.pattern",
    "mlp.hook_post": "mlp.post",
    "attn_head": "attn.z",
    "attn_head_q": "attn.q",
    "attn_head_k": "attn.k",
    "attn_head_v": "attn.v",
    "mlp_neuron": "mlp.post",
    **SEED_MODULE_NAMES,
}

#: TransformerLens hook names inside a block (``blocks.{L}.<name>``) -> canonical site kinds:
#: the ``hook_`` spellings of :data:`ALIASES` plus the normalised inputs and the MLP's
#: pre-activation (SAELens configs name an SAE's site this way, e.g. ``blocks.8.hook_resid_post``).
TL_LAYER_HOOKS: dict[str, str] = {
    **{name: kind for name, kind in ALIASES.items() if "hook_" in name},
    "ln1.hook_normalized": "attn.in",
    "ln2.hook_normalized": "mlp.in",
    "mlp.hook_pre": "mlp.pre",
}
#: TransformerLens hook names outside the blocks -> canonical site names.
TL_GLOBAL_HOOKS: dict[str, str] = {"hook_embed": "embed", "ln_final.hook_normalized": "ln_final"}
#: Canonical per-layer site kinds a TransformerLens-style name may address (whether a given
#: model has the kind is checked when the name is resolved against that model).
TL_SITE_KINDS: tuple[str, ...] = (
    "resid_pre", "resid_mid", "resid_post", "attn", "mlp", "attn.z", "attn.q", "attn.k",
    "attn.v", "attn.pattern", "attn.in", "mlp.in", "mlp.post", "mlp.gate", "mlp.up", "mlp.pre",
    "attn.raw", "mlp.raw")
#: The hook name :func:`hook_name_for_site` prefers for kinds that several hook names reach.
_TL_PREFERRED = {"attn.in": "ln1.hook_normalized", "mlp.in": "ln2.hook_normalized"}

_D_MODEL_SITES = {"resid_pre", "resid_mid", "resid_post", "attn", "mlp", "attn.in", "mlp.in",
                  "attn.raw", "mlp.raw"}
_D_MLP_SITES = {"mlp.post", "mlp.gate", "mlp.up", "mlp.pre"}


@dataclass(frozen=True)
class Site:
    """A resolved hook site.

    Attributes:
        name: canonical name (``blocks.3.attn.z``) or, for raw modules, the module path.
        kind: site kind within a layer (``attn.z``), or ``"module"`` for raw modules.
        layer: decoder layer index, ``None`` outside the layer stack.
        module_path: module path from the model root.
        hook: ``"input"`` or ``"output"``.
        view: maps the hooked tensor to the activation and back.
        residual_from: for ``resid_mid`` only: the decoder layer whose input (the residual) is
            added to the hooked attention output. The site is read as ``residual + attn`` and
            written by setting ``attn = new - residual``, so a patch changes the residual
            stream itself and not just what the MLP's norm sees.
    """

    name: str
    kind: str
    layer: int | None
    module_path: str
    hook: HookKind
    view: View = IDENTITY
    residual_from: str | None = None

    def feature_shape(self, dims: ModelDims) -> tuple[int, ...] | None:
        """Trailing shape of the activation after ``[batch, pos]``, when known."""
        if self.view.per_head:
            return (self.view.n_heads(dims), dims.d_head)
        if self.kind in _D_MODEL_SITES or self.kind in {"embed", "ln_final"}:
            return (dims.d_model,)
        if self.kind in _D_MLP_SITES:
            return (dims.d_mlp,)
        return None

    @property
    def per_head(self) -> bool:
        return self.view.per_head


def site_kinds(adapter: Adapter, config: Any = None) -> list[str]:
    """Every per-layer site kind this adapter defines (for this config)."""
    unsupported = adapter.unsupported(config) if config is not None else {}
    kinds = ["resid_pre", *adapter.sites.keys(), "resid_post"]
    return [k for k in kinds if k not in unsupported]


def canonical_names(adapter: Adapter, dims: ModelDims, config: Any = None) -> list[str]:
    """All canonical names of a model, layer by layer."""
    names = ["embed"]
    for layer in range(dims.n_layers):
        names += [f"blocks.{layer}.{k}" for k in site_kinds(adapter, config)]
    return names + ["ln_final"]


def _strip_root(name: str, adapter: Adapter) -> str:
    """``model.model.layers.3.mlp`` (mlxterp) and ``model.layers.3.mlp`` -> ``layers.3.mlp``."""
    layers_leaf = adapter.layers.split(".")[-1]
    prefix = adapter.layers[: -len(layers_leaf)]
    while name.startswith("model.") and not name.startswith(prefix + layers_leaf + "."):
        name = name[len("model.") :]
    if prefix and name.startswith(prefix + layers_leaf + "."):
        name = name[len(prefix) :]
    return name


def resolve(name: str, adapter: Adapter, dims: ModelDims, root: nn.Module,
            config: Any = None) -> Site:
    """Resolve a component name into a :class:`Site`.

    Raises:
        UnknownComponentError: the name names nothing; the message lists close matches.
        OutOfRangeError: the layer index is outside ``[0, n_layers)``.
    """
    if not isinstance(name, str) or not name:
        raise UnknownComponentError(f"component name must be a non-empty string, got {name!r}")
    n_layers = dims.n_layers
    if name == "embed":
        return Site("embed", "embed", None, adapter.embed, "output")
    if name in ("ln_final", "final_norm"):
        return Site("ln_final", "ln_final", None, adapter.final_norm, "output")

    match = re.fullmatch(r"blocks\.(-?\d+)\.(.+)", name)
    layer_leaf = adapter.layers.split(".")[-1]
    if match is None:
        stripped = _strip_root(name, adapter)
        match = re.fullmatch(rf"{re.escape(layer_leaf)}\.(-?\d+)\.?(.*)", stripped) or \
            re.fullmatch(r"(?:model\.)*layers\.(-?\d+)\.?(.*)", name)  # seed-style short form
        if match is not None and match.group(2) == "":
            match = None
            raw_layer = int(stripped.split(".")[1])
            _check_layer(raw_layer, n_layers, name)
            return Site(f"blocks.{raw_layer}.resid_post", "resid_post", raw_layer,
                        f"{adapter.layers}.{raw_layer}", "output")
    if match is not None:
        layer = int(match.group(1))
        _check_layer(layer, n_layers, name)
        site = _layer_site(match.group(2), layer, adapter, root, config, name)
        if site is not None:
            return site
    elif _has_module(root, name) and name != "":
        return Site(name, "module", None, name, "output")

    if name.endswith(".input") and len(name) > len(".input"):
        site = _input_site(name[: -len(".input")], adapter, dims, root, config)
        if site is not None:
            return site

    candidates = canonical_names(adapter, dims, config)
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownComponentError(
        f"unknown component {name!r} for this {adapter.name} model.{hint} Canonical names look "
        f"like 'blocks.0.resid_pre'; per-layer sites: {', '.join(site_kinds(adapter, config))}; "
        "raw module paths (e.g. from model.hf_model.named_modules()) work too."
    )


def _input_site(base: str, adapter: Adapter, dims: ModelDims, root: nn.Module,
                config: Any) -> Site | None:
    """The input of the module ``base`` names (``None`` when ``base`` is not one module's
    output): its canonical site when one reads exactly that input, else a raw input site."""
    try:
        out = resolve(base, adapter, dims, root, config)
    except UnknownComponentError:
        return None
    if out.hook != "output" or out.residual_from is not None or out.view.per_head:
        return None
    if out.kind == "resid_post" and out.layer is not None:
        return _layer_site("resid_pre", out.layer, adapter, root, config, base + ".input")
    if out.layer is not None:
        layer_path = f"{adapter.layers}.{out.layer}"
        unsupported = adapter.unsupported(config) if config is not None else {}
        for kind, spec in adapter.sites.items():
            if (f"{layer_path}.{spec.module}" == out.module_path and spec.hook == "input"
                    and not spec.view.per_head and kind not in unsupported):
                site = _layer_site(kind, out.layer, adapter, root, config, base + ".input")
                if site is not None:
                    return site
    return Site(f"{out.module_path}.input", "module", out.layer, out.module_path, "input")


def canonical_kind(word: str) -> str:
    """The canonical site kind of ``word`` (a kind, a TransformerLens name or a sweep word)."""
    return ALIASES.get(word, word)


def layer_site(kind: str, layer: int, adapter: Adapter, dims: ModelDims, root: nn.Module,
               config: Any = None) -> Site:
    """The :class:`Site` of a per-layer ``kind`` at ``layer``, built directly (no name parsing).

    Raises:
        UnknownComponentError: the kind does not exist for this architecture.
        OutOfRangeError: ``layer`` is outside ``[0, n_layers)``.
    """
    name = f"blocks.{layer}.{kind}"
    _check_layer(layer, dims.n_layers, name)
    site = _layer_site(kind, layer, adapter, root, config, name)
    if site is None:
        return resolve(name, adapter, dims, root, config)  # raises with suggestions
    return site


def _layer_site(rest: str, layer: int, adapter: Adapter, root: nn.Module, config: Any,
                name: str) -> Site | None:
    """The site ``rest`` of decoder layer ``layer``: a canonical kind, else a raw sub-module
    path (its output, under its canonical name when it has one), else an alias."""
    layer_path = f"{adapter.layers}.{layer}"
    unsupported = adapter.unsupported(config) if config is not None else {}
    if rest in unsupported:
        raise UnknownComponentError(f"component {name!r} is not defined: {unsupported[rest]}")
    if rest == "resid_pre":
        return Site(f"blocks.{layer}.resid_pre", rest, layer, layer_path, "input")
    if rest == "resid_mid":
        attn = adapter.sites["attn"]
        return Site(f"blocks.{layer}.resid_mid", rest, layer, f"{layer_path}.{attn.module}",
                    "output", residual_from=layer_path)
    if rest == "resid_post":
        return Site(f"blocks.{layer}.resid_post", rest, layer, layer_path, "output")
    if rest in adapter.sites:
        spec = adapter.sites[rest]
        return Site(f"blocks.{layer}.{rest}", rest, layer, f"{layer_path}.{spec.module}",
                    spec.hook, spec.view)
    if rest and _has_module(root, f"{layer_path}.{rest}"):
        for kind, spec in adapter.sites.items():
            if spec.module == rest and spec.hook == "output" and not spec.view.per_head:
                return Site(f"blocks.{layer}.{kind}", kind, layer, f"{layer_path}.{rest}",
                            "output")
        return Site(f"{layer_path}.{rest}", "module", layer, f"{layer_path}.{rest}", "output")
    if rest in ALIASES:
        return _layer_site(ALIASES[rest], layer, adapter, root, config, name)
    return None


def _check_layer(layer: int, n_layers: int, name: str) -> None:
    if not 0 <= layer < n_layers:
        raise OutOfRangeError(
            f"layer {layer} in component {name!r} is out of range: this model has {n_layers} "
            f"layers, so layer must be in [0, {n_layers - 1}]"
        )


def _has_module(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True




def site_name_for_hook_name(hook_name: str) -> str | None:
    """The canonical site name a TransformerLens hook name (or a canonical name) spells, or
    ``None`` when it spells none; model-independent (the layer is not range-checked).

    ``"blocks.8.hook_resid_post"`` -> ``"blocks.8.resid_post"``, ``"blocks.3.attn.hook_z"`` ->
    ``"blocks.3.attn.z"``, ``"hook_embed"`` -> ``"embed"``, ``"blocks.8.resid_post"`` -> itself.
    Surrounding whitespace is ignored.
    """
    name = hook_name.strip()
    if name in TL_GLOBAL_HOOKS:
        return TL_GLOBAL_HOOKS[name]
    if name in ("embed", "ln_final"):
        return name
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match is not None:
        kind = TL_LAYER_HOOKS.get(match.group(2), match.group(2))
        if kind in TL_SITE_KINDS:
            return f"blocks.{int(match.group(1))}.{kind}"
    return None


def hook_name_for_site(site_name: str) -> str:
    """The TransformerLens hook name of a canonical site name (the name itself if it has none):
    ``"blocks.8.resid_post"`` -> ``"blocks.8.hook_resid_post"``, ``"embed"`` -> ``"hook_embed"``.
    """
    for hook, name in TL_GLOBAL_HOOKS.items():
        if site_name == name:
            return hook
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", site_name)
    if match is not None:
        for hook, kind in TL_LAYER_HOOKS.items():
            if kind == match.group(2) and (kind not in _TL_PREFERRED
                                           or hook == _TL_PREFERRED[kind]):
                return f"blocks.{match.group(1)}.{hook}"
    return site_name
