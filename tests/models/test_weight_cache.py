"""The de-quantised GGUF weight cache, config/tokenizer-only loading, fail-fast hub names and
quiet loading.

Most tests use tiny models and a fake GGUF file (a few random bytes: the cache key only hashes
the file) with ``from_pretrained`` of the GGUF replaced by a counter, so the cache's control
flow is tested in milliseconds. One ``real`` test loads the embedded SmolLM2 GGUF twice (once
uncached, once filling the cache) and then from the cache, in this process and in a fresh one.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import causalpatch.loading as loading
from causalpatch.errors import InvalidArgumentError, ModelNotFoundError
from causalpatch.loading import (Source, cache_entry_problem, load_config, load_hf,
                                 load_tokenizer, publish_cache_entry, quiet_loading,
                                 resolve_source, valid_cache_entry, weight_cache_entry,
                                 write_cache_entry)
from conftest import tiny_hf_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty ``$CAUSALPATCH_CACHE`` for every test, with the cache switched on."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("CAUSALPATCH_CACHE", str(folder))
    monkeypatch.delenv("CAUSALPATCH_NO_CACHE", raising=False)
    return folder


@pytest.fixture
def fake_gguf(tmp_path: Path) -> Source:
    """A small file posing as a GGUF: what the cache keys on is its content hash."""
    path = tmp_path / "models" / "tiny.gguf"
    path.parent.mkdir()
    path.write_bytes(os.urandom(4096))
    return Source(str(path.parent), path.name, "tiny")


class FakeGguf:
    """Routes ``from_pretrained(..., gguf_file=...)`` to a tiny LLaMA and counts the calls;
    loads of a cache folder go to the real ``from_pretrained``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gguf_loads = 0
        self.cached_loads = 0
        real = transformers.AutoModelForCausalLM.from_pretrained

        def from_pretrained(name: str, **kwargs: Any) -> Any:
            if kwargs.get("gguf_file"):
                self.gguf_loads += 1
                model = tiny_hf_model("llama")
                return model.to(kwargs["dtype"]) if "dtype" in kwargs else model
            self.cached_loads += 1
            return real(name, **kwargs)

        def meta(kind: str, source: Source, trust_remote_code: bool) -> Any:
            return tiny_hf_model("llama").config if kind == "config" else tiny_tokenizer()

        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                            from_pretrained)
        monkeypatch.setattr(loading, "_gguf_meta", meta)


def _same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(
        pa[k].dtype == pb[k].dtype and torch.equal(pa[k], pb[k]) for k in pa)


def _logits(model: torch.nn.Module, tokenizer: Any) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


# -- where and whether ---------------------------------------------------------------------------
def test_cache_dir_is_causalpatch_cache_then_xdg_cache_home_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("CAUSALPATCH_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loading.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("CAUSALPATCH_CACHE")
    assert loading.cache_dir() == tmp_path / "xdg" / "causalpatch"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert loading.cache_dir() == Path.home() / ".cache" / "causalpatch"


def test_the_cache_is_on_by_default_and_off_by_argument_or_environment(monkeypatch):
    assert loading.weight_cache_enabled() and not loading.weight_cache_enabled(False)
    monkeypatch.setenv("CAUSALPATCH_NO_CACHE", "1")
    assert not loading.weight_cache_enabled() and loading.weight_cache_enabled(True)


def test_the_key_is_the_content_sha256_memoised_by_path_size_and_mtime(fake_gguf, cache):
    path = Path(fake_gguf.folder) / fake_gguf.gguf_file
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert loading.gguf_sha256(path) == sha
    index_file = cache / "gguf-sha256.json"
    index = json.loads(index_file.read_text())
    assert index[str(path.resolve())]["sha256"] == sha
    index[str(path.resolve())]["sha256"] = "f" * 64  # the memo is trusted while size/mtime hold
    index_file.write_text(json.dumps(index))
    assert loading.gguf_sha256(path) == "f" * 64
    assert weight_cache_entry(fake_gguf).name.startswith("tiny-" + "f" * 16)
    path.write_bytes(os.urandom(4097))  # a new file: hashed again, a new entry
    assert loading.gguf_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


# -- the cache's control flow (tiny model, fake GGUF) ---------------------------------------------
def test_the_first_load_fills_the_cache_and_the_second_never_reads_the_gguf(
        fake_gguf, monkeypatch):
    fake = FakeGguf(monkeypatch)
    first, tok1 = load_hf(fake_gguf)
    assert fake.gguf_loads == 1 and valid_cache_entry(fake_gguf) is not None
    entry = weight_cache_entry(fake_gguf)
    assert {"config.json", "model.safetensors", "causalpatch-cache.json"} <= {
        p.name for p in entry.iterdir()}
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in entry.rglob("*"))  # no pickle
    second, tok2 = load_hf(fake_gguf)
    assert fake.gguf_loads == 1 and fake.cached_loads == 1
    assert _same_parameters(first, second)
    assert torch.equal(_logits(first, tok1), _logits(second, tok2))
    assert tok2(PROMPT)["input_ids"] == tok1(PROMPT)["input_ids"]
    assert not hasattr(second.config, "quantization_config")


def test_dtype_and_device_map_are_honoured_on_cold_and_warm_loads(fake_gguf, monkeypatch):
    fake = FakeGguf(monkeypatch)
    cold, _ = load_hf(fake_gguf, dtype=torch.float16, device_map="cpu")
    assert fake.gguf_loads == 1 and fake.cached_loads == 1  # filled, then placed from the entry
    warm, _ = load_hf(fake_gguf, dtype=torch.float16, device_map="cpu")
    assert fake.gguf_loads == 1 and fake.cached_loads == 2
    reference = tiny_hf_model("llama").to(torch.float16)
    for model in (cold, warm):
        assert model.dtype == torch.float16 and model.device.type == "cpu"
        assert _same_parameters(model, reference)


def test_cache_false_or_no_cache_env_uses_the_gguf_every_time(fake_gguf, monkeypatch):
    fake = FakeGguf(monkeypatch)
    load_hf(fake_gguf, cache=False)
    monkeypatch.setenv("CAUSALPATCH_NO_CACHE", "1")
    load_hf(fake_gguf)
    assert fake.gguf_loads == 2 and fake.cached_loads == 0
    assert not weight_cache_entry(fake_gguf).exists()


@pytest.mark.parametrize("damage", ["delete weights", "truncate weights", "delete tokenizer",
                                    "delete manifest", "garble manifest"])
def test_a_partial_or_corrupt_entry_is_detected_and_rebuilt(fake_gguf, monkeypatch, damage):
    fake = FakeGguf(monkeypatch)
    load_hf(fake_gguf)
    entry = weight_cache_entry(fake_gguf)
    weights, manifest = entry / "model.safetensors", entry / "causalpatch-cache.json"
    if damage == "delete weights":
        weights.unlink()
    elif damage == "truncate weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "delete tokenizer":
        next(entry.glob("tokenizer*.json")).unlink()
    elif damage == "delete manifest":
        manifest.unlink()
    else:
        manifest.write_text("{not json")
    assert cache_entry_problem(entry) is not None
    model, _ = load_hf(fake_gguf)
    assert fake.gguf_loads == 2  # rebuilt from the GGUF
    assert cache_entry_problem(entry) is None
    assert _same_parameters(model, tiny_hf_model("llama"))


def test_an_entry_that_fails_to_load_is_rebuilt(fake_gguf, monkeypatch):
    fake = FakeGguf(monkeypatch)
    load_hf(fake_gguf)
    entry = weight_cache_entry(fake_gguf)
    weights = entry / "model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)  # right size, garbage content
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        model, _ = load_hf(fake_gguf)
    assert fake.gguf_loads == 2 and cache_entry_problem(entry) is None
    assert _same_parameters(model, tiny_hf_model("llama"))


def _fill_at_once(gguf: str, barrier: Any, queue: Any) -> None:
    """One of several processes writing the same entry at the same moment."""
    torch.set_num_threads(1)
    source = Source(str(Path(gguf).parent), Path(gguf).name, "tiny")
    model, tokenizer = tiny_hf_model("llama"), tiny_tokenizer()
    barrier.wait()
    queue.put(str(write_cache_entry(source, model, tokenizer)))


def test_processes_filling_the_cache_at_once_all_end_with_one_complete_entry(fake_gguf):
    gguf = str(Path(fake_gguf.folder) / fake_gguf.gguf_file)
    weight_cache_entry(fake_gguf)  # memoise the hash first, so the writers race on the entry
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(3), ctx.Queue()
    workers = [ctx.Process(target=_fill_at_once, args=(gguf, barrier, queue)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    entries = {queue.get(timeout=5) for _ in workers}
    entry = weight_cache_entry(fake_gguf)
    assert entries == {str(entry)} and cache_entry_problem(entry) is None
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temp folders left
    model, _ = loading.load_from_cache_entry(entry, {}, {})
    assert _same_parameters(model, tiny_hf_model("llama"))


def test_a_loser_of_the_publish_race_uses_the_winners_entry(tmp_path):
    entry = tmp_path / "weights" / "m-1"
    for tag in ("winner", "loser"):
        tmp = loading.temp_dir_beside(entry)
        (tmp / "config.json").write_text(tag)
        (tmp / "model.safetensors").write_text(tag)
        files = {"config.json": len(tag), "model.safetensors": len(tag)}
        (tmp / "causalpatch-cache.json").write_text(
            json.dumps({"format": loading.CACHE_FORMAT, "files": files}))
        assert publish_cache_entry(tmp, entry) == entry
        assert not tmp.exists()
    assert (entry / "config.json").read_text() == "winner"
    assert list(entry.parent.iterdir()) == [entry]


# -- config and tokenizer only ---------------------------------------------------------------------
def test_config_and_tokenizer_come_from_a_folder_without_loading_weights(tmp_path, monkeypatch):
    folder = tmp_path / "tiny"
    tiny_hf_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)

    def no_weights(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("weights loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    config = load_config(str(folder), dtype=torch.float16, device_map="auto")
    assert isinstance(config, transformers.PretrainedConfig) and config.num_hidden_layers == 3
    assert load_tokenizer(str(folder))(" Paris")["input_ids"] == tiny_tokenizer()(
        " Paris")["input_ids"]
    with pytest.raises(InvalidArgumentError, match="unknown loading option"):
        load_config(str(folder), revision="main")


def test_config_and_tokenizer_of_a_gguf_come_from_the_cache_when_present(fake_gguf, monkeypatch):
    FakeGguf(monkeypatch)
    load_hf(fake_gguf)
    monkeypatch.setattr(loading, "_gguf_meta", lambda *a: pytest.fail("GGUF parsed"))
    monkeypatch.setattr(loading, "resolve_source", lambda name: fake_gguf)
    assert load_config("tiny").num_hidden_layers == 3
    assert load_tokenizer("tiny")(" Paris")["input_ids"] == tiny_tokenizer()(
        " Paris")["input_ids"]


# -- unknown names ---------------------------------------------------------------------------------
@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "unreachable endpoint"])
@pytest.mark.parametrize("loader", [load_config, load_tokenizer,
                                    lambda name: load_hf(resolve_source(name))])
def test_an_unknown_name_offline_fails_at_once_with_a_suggestion(monkeypatch, offline, loader):
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused
    with pytest.raises(ModelNotFoundError) as err:
        loader("smollm3")
    message = str(err.value)
    assert "did you mean 'smollm2'?" in message and "local path" in message
    assert ("HF_HUB_OFFLINE is set" in message) == (offline == "HF_HUB_OFFLINE")
    assert "\n" not in message


def test_the_hub_check_says_why_and_suggests_only_close_aliases(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert "cannot reach 127.0.0.1" in (loading.hub_unreachable_reason() or "")
    assert loading.suggest_alias("gemma3") == "gemma3-270m"
    assert loading.suggest_alias("gpt-foo") is None


# -- quiet -----------------------------------------------------------------------------------------
def test_quiet_loading_hides_the_dequantisation_bar_and_restores_everything():
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bar, verbosity = gguf_utils.tqdm, hf_logging.get_verbosity()
    enabled = hf_logging.is_progress_bar_enabled()
    with quiet_loading():
        assert gguf_utils.tqdm(range(2)).disable
        assert not hf_logging.is_progress_bar_enabled()
    assert gguf_utils.tqdm is bar and hf_logging.get_verbosity() == verbosity
    assert hf_logging.is_progress_bar_enabled() == enabled
    with quiet_loading(False):
        assert gguf_utils.tqdm is bar


# -- the real GGUF ---------------------------------------------------------------------------------
CHECK_WARM = r"""
import hashlib, json, sys, time
import gguf, torch, transformers.modeling_gguf_pytorch_utils as g
torch.set_num_threads(1)  # as the test process (one_thread): the same reductions, the same bits
def refuse(*a, **k):
    raise AssertionError("the GGUF was parsed")
g.load_gguf_checkpoint = refuse
gguf.GGUFReader = refuse
from causalpatch.loading import load_config, load_hf, load_tokenizer, resolve_source
t0 = time.perf_counter()
config, tok = load_config("smollm2"), load_tokenizer("smollm2")
t1 = time.perf_counter()
model, tokenizer = load_hf(resolve_source("smollm2"), quiet=True)
t2 = time.perf_counter()
digest = hashlib.sha256()
for name, p in model.named_parameters():
    digest.update(name.encode()); digest.update(p.detach().numpy().tobytes())
ids = tokenizer(sys.argv[1], return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = model(ids).logits
print(json.dumps({"meta_s": t1 - t0, "load_s": t2 - t1, "params": digest.hexdigest(),
                  "logits": hashlib.sha256(logits.numpy().tobytes()).hexdigest(),
                  "layers": config.num_hidden_layers, "paris": tok(" Paris")["input_ids"]}))
"""


@pytest.mark.real
def test_smollm2_from_the_cache_is_identical(capfd):
    source = resolve_source("smollm2")
    uncached, tokenizer = load_hf(source, cache=False, quiet=True)
    assert "de-quantizing" not in capfd.readouterr().err  # quiet=True hides the bar
    assert valid_cache_entry(source) is None
    filled, _ = load_hf(source, quiet=True)  # parses the weights again and fills the cache
    entry = valid_cache_entry(source)
    assert entry is not None
    cached, cached_tokenizer = load_hf(source, quiet=True)
    for model in (filled, cached):
        assert _same_parameters(uncached, model)
        assert torch.equal(_logits(uncached, tokenizer), _logits(model, cached_tokenizer))
    assert cached_tokenizer(PROMPT)["input_ids"] == tokenizer(PROMPT)["input_ids"]
    half, _ = load_hf(source, dtype=torch.bfloat16, device_map="cpu", quiet=True)
    expected = {k: p.to(torch.bfloat16) for k, p in uncached.named_parameters()}
    assert half.dtype == torch.bfloat16 and half.device.type == "cpu"
    assert all(torch.equal(p, expected[k]) for k, p in half.named_parameters())

    # a fresh process: config, tokenizer and weights from the cache, no GGUF parsing at all
    digest = hashlib.sha256()
    for name, p in uncached.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().numpy().tobytes())
    src = str(Path(loading.__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", CHECK_WARM, PROMPT], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": src}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    warm = json.loads(out.stdout.strip().splitlines()[-1])
    assert warm["params"] == digest.hexdigest()
    reference = _logits(uncached, tokenizer)
    assert warm["logits"] == hashlib.sha256(reference.numpy().tobytes()).hexdigest()
    assert warm["layers"] == 30 and warm["paris"] == tokenizer(" Paris")["input_ids"]

    next(entry.glob("tokenizer*.json")).unlink()  # a partial entry is noticed (and discarded)
    assert valid_cache_entry(source) is None and not entry.exists()
