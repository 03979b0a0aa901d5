"""The SAELens on-disk format: :func:`load_sae` reads, and :func:`save_sae` writes, an SAE folder.

The folder is what SAELens 6.x writes with ``SAE.save_model`` (``sae_lens/saes/sae.py``):
``cfg.json`` plus ``sae_weights.safetensors`` (and optionally ``sparsity.safetensors``, the
log10 feature density ``sparsity [d_sae]``). Only ``json`` and ``safetensors`` are used;
**nothing is unpickled** (a folder holding only pickle weights is refused with a hint).

``cfg.json`` holds ``d_in``, ``d_sae``, ``dtype``, ``apply_b_dec_to_input``,
``normalize_activations``, ``reshape_activations``, ``architecture`` (``"standard"``,
``"topk"``, ``"jumprelu"``; ``topk`` adds ``k`` and ``rescale_acts_by_decoder_norm``) and
``metadata`` with ``model_name`` and ``hook_name`` (the TransformerLens name such as
``blocks.8.hook_resid_post``). Configs written before SAELens 6 (``hook_name``/``hook_point``/
``model_name`` at the top level) are read as well. The weights are ``W_enc [d_in, d_sae]``,
``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and, for JumpReLU,
``threshold [d_sae]`` (or the older ``log_threshold``). Every field, tensor name, shape and
value is checked on load, and errors name the file, the field and what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_bytes, atomic_write_text
from ..errors import CausalPatchError, InvalidTypeError, NonFiniteError
from .model import (ARCHITECTURES, SAEFormatError, SparseAutoencoder, positive_int,
                    site_for_hook_name)

#: File names of the SAELens format (``sae_lens/constants.py``).
SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
#: ``cfg.json`` dtype names -> torch dtypes.
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}
#: Tensor names an SAELens weights file may hold.
_WEIGHT_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "log_threshold",
                "scaling_factor")
#: Suffixes of pickle files, which :func:`load_sae` never opens (they can run arbitrary code).
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


class SAENotFoundError(CausalPatchError, FileNotFoundError):
    """An SAE folder, or its ``cfg.json`` / ``sae_weights.safetensors``, does not exist."""


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
    d_in = positive_int(cfg.get("d_in"), "d_in", where)
    d_sae = positive_int(cfg.get("d_sae"), "d_sae", where)
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
        positive_int(out["k"], "k", where)
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
            return {key: fh.get_tensor(key) for key in fh.keys()}  # safe_open: keys(), no __iter__
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
