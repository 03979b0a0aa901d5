"""What the CLI knows about a model before its weights load: tokenizer, config and sizes.

:func:`inspect_model` feeds tier 1 of the argument checks (:mod:`causalpatch.cli.checks`).
For a local folder, and for a GGUF already in the weight cache, ``tokenizer.json`` and
``config.json`` are read with the ``tokenizers`` library and ``json`` only, without torch or
transformers (:class:`FastTokenizer`, :class:`ConfigDims`). Otherwise, and when the site kinds
are needed (they come from the adapters, which import torch), it goes through
:func:`causalpatch.loading.load_config` / :func:`~causalpatch.loading.load_tokenizer`. An
unknown hub name fails at once when the hub cannot be reached.

Commands call :func:`inspect_model` through this module (``model_info.inspect_model(...)``),
so tests can substitute it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .state import State, console


@dataclass
class ModelInfo:
    """What the pre-load checks know about a model: its tokenizer, config and sizes."""

    name: str
    tokenizer: Any
    config: Any
    architecture: str
    dims: Any
    kinds: list[str]
    family_kinds: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, model: Any) -> ModelInfo:
        """From a loaded model (tests, and commands that already hold one)."""
        from ..names import site_kinds

        return cls(model.name, model.tokenizer, model.config, model.architecture, model.dims,
                   site_kinds(model.adapter, model.config), site_kinds(model.adapter))

    def prompt_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])  # as causalpatch.tokens.encode

    def answer_ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]


class FastTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` library (no transformers import),
    answering the calls the checks make exactly as the transformers tokenizer does."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": self._tok.encode(text, add_special_tokens=True).ids}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


@dataclass(frozen=True)
class ConfigDims:
    """The sizes the checks need, read from ``config.json`` (``n_layers``, ``n_heads``)."""

    n_layers: int
    n_heads: int


def _config_int(config: dict[str, Any], *keys: str) -> int | None:
    for where in (config, config.get("text_config") or {}):
        for key in keys:
            if isinstance(where.get(key), int):
                return int(where[key])
    return None


def fast_inspect(model: str) -> ModelInfo | None:
    """Tier 1 without torch or transformers: a local folder (or the GGUF weight cache entry)
    with ``tokenizer.json`` and ``config.json``; None when there is none."""
    from ..loading import resolve_source, valid_cache_entry

    source = resolve_source(model)
    if source.gguf_file is not None:
        folder = valid_cache_entry(source)
    else:
        folder = Path(source.folder) if source.local else None
    if folder is None or not (folder / "tokenizer.json").is_file() \
            or not (folder / "config.json").is_file():
        return None
    config = json.loads((folder / "config.json").read_text("utf-8"))
    n_layers = _config_int(config, "num_hidden_layers", "n_layer", "num_layers")
    n_heads = _config_int(config, "num_attention_heads", "n_head")
    if not isinstance(config, dict) or n_layers is None or n_heads is None:
        return None
    return ModelInfo(source.display_name or str(model), FastTokenizer(folder / "tokenizer.json"),
                     config, str(config.get("model_type", "?")), ConfigDims(n_layers, n_heads),
                     [], [])


def fail_fast_if_unknown(model: str) -> None:
    """A hub name that is neither cached nor fetchable fails now, without transformers."""
    from ..loading import fail_fast_if_hub_unreachable, resolve_source

    source = resolve_source(model)
    if source.local:
        return
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return
    if not isinstance(try_to_load_from_cache(source.folder, "config.json"), str):
        fail_fast_if_hub_unreachable(source.folder)


def inspect_model(model: str, need_kinds: bool = False) -> ModelInfo | None:
    """The model's config and tokenizer (no weights), or None when they cannot be read this
    way (the full load then decides). Unknown models and unsupported architectures raise.

    Local folders and cached GGUFs are read with ``tokenizers`` and ``json`` only (well under a
    second); otherwise, or with ``need_kinds`` (the site kinds come from the adapters, which
    import torch), through :func:`causalpatch.loading.load_config` / ``load_tokenizer``.
    """
    from ..errors import CausalPatchError

    if not need_kinds:
        try:
            fast = fast_inspect(model)
        except CausalPatchError:
            raise
        except Exception as exc:  # fall back to the transformers path
            fast = None
            if State.verbose:
                console.print(f"fast pre-load checks skipped ({type(exc).__name__}: {exc})")
        if fast is not None:
            return fast
    fail_fast_if_unknown(model)
    from ..loading import load_config, load_tokenizer

    quiet = not State.verbose
    try:
        config = load_config(model, quiet=quiet)
        tokenizer = load_tokenizer(model, quiet=quiet)
    except CausalPatchError:
        raise
    except Exception as exc:  # a quirk of this path must not block a valid run
        if State.verbose:
            console.print(f"pre-load checks skipped ({type(exc).__name__}: {exc})")
        return None
    from ..adapters import adapter_for
    from ..loading import resolve_source
    from ..names import site_kinds

    adapter = adapter_for(config)
    name = resolve_source(model).display_name or str(model)
    return ModelInfo(name, tokenizer, config, adapter.name, adapter.dims(config),
                     site_kinds(adapter, config), site_kinds(adapter))
