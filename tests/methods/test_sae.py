"""Sparse autoencoders: the SAELens format, the exact splice, feature patching, attribution,
ablation, training, and every bad input (a specific error before any forward pass, no hooks left).

Tiny seeded models (``conftest``) check the maths against independent routes (hand-written
SAELens formulas, ``model.trace`` loops, ``replace_with`` interventions); the ``real`` tests use
SmolLM2 with the SAE shipped in ``tests/data/saes`` (trained by ``causalpatch sae train``).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TESTS_DIR, assert_matches_reference, assert_within, capture_modules
from typer.testing import CliRunner

import causalpatch.cli as cli
import causalpatch.interventions as iv
from causalpatch import (ablate, activation_patching, attribution_patching, sae_attribution,
                         sae_patching)
from causalpatch.errors import (CheckpointMismatchError, InvalidArgumentError, NonFiniteError,
                                OutOfRangeError, ShapeMismatchError, UnknownComponentError)
from causalpatch.plan import SitePatch
from causalpatch.sae import (SAEFormatError, SAEModelMismatchWarning, SAENotFoundError,
                             SparseAutoencoder, edit_features, hook_name_for_site, load_sae,
                             save_sae, site_for_hook_name, split_sae_name, top_activations,
                             train_sae, training_texts, wrap_sae)

DATA = TESTS_DIR / "data" / "saes"
SHIPPED = DATA / "smollm2-blocks.20.resid_post-topk-2048"
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
FEATS = "blocks.1.resid_post.sae.features"
ANSWERS = dict(correct=" Mary", incorrect=" John")


# -- helpers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm(make_tiny_lm):
    """A tiny LLaMA of its own (tests that count forwards monkeypatch it)."""
    torch.manual_seed(0)
    return make_tiny_lm("llama")


def tiny_sae(arch: str = "topk", d_sae: int = 96, seed: int = 1, site: str = "blocks.1.hook_resid_post",
             d_in: int = 64, **kw: Any) -> SparseAutoencoder:
    """A random SAE whose features fire on the tiny model's activations (biases shifted)."""
    sae = SparseAutoencoder(d_in, d_sae, arch, hook_name=site, seed=seed,
                            k=kw.pop("k", 8) if arch == "topk" else None, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=gen) * 0.3)
        sae.b_dec.copy_(torch.randn(d_in, generator=gen) * 0.1)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae, generator=gen) * 0.5)
    return sae


def logit_diff(logits: torch.Tensor, model: Any) -> float:
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    return float(logits[0, -1, mary] - logits[0, -1, john])


def saelens_encode(w: dict[str, torch.Tensor], cfg: dict[str, Any], x: torch.Tensor
                   ) -> torch.Tensor:
    """SAELens 6 encode, written out from sae_lens/saes/{standard,topk,jumprelu}_sae.py."""
    sae_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "standard":
        return torch.relu(pre)
    if cfg["architecture"] == "jumprelu":
        threshold = w["threshold"] if "threshold" in w else torch.exp(w["log_threshold"])
        return torch.relu(pre) * (pre > torch.relu(threshold))
    if cfg.get("rescale_acts_by_decoder_norm"):
        pre = pre * w["W_dec"].norm(dim=-1)
    values, idx = torch.topk(pre, cfg["k"], dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, values.relu())


def saelens_decode(w: dict[str, torch.Tensor], cfg: dict[str, Any], f: torch.Tensor
                   ) -> torch.Tensor:
    if cfg["architecture"] == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        f = f / w["W_dec"].norm(dim=-1)
    return f @ w["W_dec"] + w["b_dec"]


def write_saelens_folder(path: Path, cfg: dict[str, Any], weights: dict[str, torch.Tensor]
                         ) -> Path:
    """Write a folder the way SAELens' ``save_model`` does (json + safetensors.save_file)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def saelens6_cfg(arch: str, d_in: int = 64, d_sae: int = 96, **extra: Any) -> dict[str, Any]:
    """``SAEConfig.to_dict()`` of SAELens 6.x (sae_lens/saes/sae.py)."""
    cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.49.2", "sae_lens_training_version": "6.49.2",
                        "model_name": "LlamaForCausalLM", "hook_name": "blocks.1.hook_resid_post",
                        "hook_head_index": None, "prepend_bos": True, "context_size": 128},
           "architecture": arch}
    if arch == "topk":
        cfg.update(k=8, rescale_acts_by_decoder_norm=False)
    cfg.update(extra)
    return cfg


def random_weights(arch: str, d_in: int = 64, d_sae: int = 96, seed: int = 0
                   ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.2,
         "b_enc": torch.randn(d_sae, generator=g) * 0.2,
         "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.2,
         "b_dec": torch.randn(d_in, generator=g) * 0.1}
    if arch == "jumprelu":
        w["threshold"] = torch.rand(d_sae, generator=g) * 0.3
    return w


class Counting:
    """Counts forward passes of a Hugging Face model (monkeypatched ``forward``)."""

    def __init__(self, model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = model.hf_model.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(model.hf_model, "forward", forward)


# -- names ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("hook,site", [
    ("blocks.8.hook_resid_post", "blocks.8.resid_post"),
    ("blocks.0.hook_resid_pre", "blocks.0.resid_pre"),
    ("blocks.3.hook_resid_mid", "blocks.3.resid_mid"),
    ("blocks.3.hook_mlp_out", "blocks.3.mlp"),
    ("blocks.3.hook_attn_out", "blocks.3.attn"),
    ("blocks.3.attn.hook_z", "blocks.3.attn.z"),
    ("blocks.3.mlp.hook_post", "blocks.3.mlp.post"),
    ("blocks.3.ln2.hook_normalized", "blocks.3.mlp.in"),
    ("hook_embed", "embed"),
    ("blocks.8.resid_post", "blocks.8.resid_post"),
])

def test_transformerlens_hook_names_map_to_canonical_sites(hook, site):
    assert site_for_hook_name(hook) == site
    assert site_for_hook_name(hook_name_for_site(site)) == site


def test_sae_value_names_in_both_spellings():
    assert split_sae_name("blocks.20.resid_post.sae.features") == ("blocks.20.resid_post",
                                                                   "features")
    assert split_sae_name("blocks.20.hook_resid_post.hook_sae_error") == (
        "blocks.20.hook_resid_post", "error")
    assert split_sae_name("blocks.20.resid_post") is None


# -- format: SAELens folders in, SAELens folders out --------------------------------------------
#: An SAE's encode/decode against the hand-written SAELens formulas. Observed bitwise 0 (the
#: formulas happen to do the same float32 operations in the same order), so this is the smallest
#: meaningful bound instead: about two float32 ulps of the largest values (5.9-9.7), enough for a
#: correct formula whose sums run in another order, far below any wrong term.
SAELENS_ATOL = 1e-6
@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_loads_a_saelens6_folder_with_saelens_maths(arch, tmp_path):
    cfg = saelens6_cfg(arch)
    w = random_weights(arch)
    sae = load_sae(write_saelens_folder(tmp_path / arch, cfg, w))
    assert (sae.architecture, sae.d_in, sae.d_sae, sae.site) == (arch, 64, 96,
                                                                 "blocks.1.resid_post")
    assert sae.model_name == "LlamaForCausalLM" and sae.metadata["context_size"] == 128
    x = torch.randn(5, 7, 64)
    f = sae.encode(x)
    # the hand-written SAELens formulas: observed bitwise 0 for all three architectures (they
    # happen to do the same float32 operations in the same order); SAELENS_ATOL allows a
    # reordered but equal formula
    assert_within(f, saelens_encode(w, cfg, x), SAELENS_ATOL, f"{arch} encode")
    assert_within(sae.decode(f), saelens_decode(w, cfg, f), SAELENS_ATOL, f"{arch} decode")
    assert (f > 0).any() and (f == 0).any()
    if arch == "topk":
        assert int((f > 0).sum(-1).max()) <= 8


def test_topk_rescale_and_b_dec_options_follow_saelens(tmp_path):
    cfg = saelens6_cfg("topk", rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False)
    w = random_weights("topk", seed=3)
    sae = load_sae(write_saelens_folder(tmp_path / "t", cfg, w))
    x = torch.randn(4, 64)
    f = sae.encode(x)
    assert_within(f, saelens_encode(w, cfg, x), SAELENS_ATOL, "encode")  # observed bitwise 0
    # observed 4.8e-7 (one float32 ulp of decoded values up to 6.5): rescaling by the decoder
    # norms divides and multiplies in another order than the formula; 4e-6 is 8.4x that
    assert_within(sae.decode(f), saelens_decode(w, cfg, f), 4e-6, "decode")
    plain = load_sae(write_saelens_folder(tmp_path / "p", saelens6_cfg("topk"), w))
    assert not torch.allclose(plain.encode(x), f)  # the options change the result


def test_loads_pre_6_flat_configs_and_log_threshold(tmp_path):
    w = random_weights("topk", seed=4)
    old = {"d_in": 64, "d_sae": 96, "dtype": "torch.float32", "hook_point": "blocks.1.hook_resid_post",
           "model_name": "LlamaForCausalLM", "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 8}, "apply_b_dec_to_input": True}
    sae = load_sae(write_saelens_folder(tmp_path / "old", old, w))
    assert sae.architecture == "topk" and sae.k == 8 and sae.site == "blocks.1.resid_post"
    jw = random_weights("jumprelu", seed=5)
    threshold = jw.pop("threshold") + 0.01
    jw["log_threshold"] = torch.log(threshold)
    j = load_sae(write_saelens_folder(tmp_path / "j", saelens6_cfg("jumprelu"), jw))
    # observed 3.0e-8 on thresholds up to 0.31: exp(log(t)) rounds twice; 2.5e-7 is 8.4x that
    assert_within(j.threshold, threshold, 2.5e-7, "threshold from log_threshold")


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_save_and_load_round_trip(arch, tmp_path):
    sae = tiny_sae(arch, model_name="LlamaForCausalLM", metadata={"note": "x"})
    sae.log_sparsity = torch.linspace(-5, 0, 96)
    folder = save_sae(sae, tmp_path / "sae")
    assert {p.name for p in folder.iterdir()} == {"cfg.json", "sae_weights.safetensors",
                                                  "sparsity.safetensors"}
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["architecture"] == arch and cfg["d_sae"] == 96
    back = load_sae(folder)
    x = torch.randn(3, 5, 64)
    assert torch.equal(back.encode(x), sae.encode(x))
    assert torch.equal(back.decode(back.encode(x)), sae.decode(sae.encode(x)))
    assert back.config() == sae.config() and back.metadata["note"] == "x"
    assert torch.equal(back.log_sparsity, sae.log_sparsity)
    half = load_sae(save_sae(sae, tmp_path / "half", storage_dtype=torch.float16))
    assert half.dtype == torch.float32  # cfg.json keeps the compute dtype
    assert (tmp_path / "half" / "sae_weights.safetensors").stat().st_size < \
        0.6 * (folder / "sae_weights.safetensors").stat().st_size
    # observed 1.22e-4 = 2^-13, half a float16 ulp of weights in [0.25, 0.5) (the largest is
    # 0.31): float16 storage rounds to 11 bits. 2.5e-4 is 2x that, one ulp
    assert_within(half.W_dec, sae.W_dec, 2.5e-4, f"{arch} float16 storage")


# -- bad input: a specific error, before any forward, no hooks -----------------------------------
def _folder(tmp_path: Path, name: str = "sae", **cfg_extra: Any) -> Path:
    return write_saelens_folder(tmp_path / name, saelens6_cfg("topk", **cfg_extra),
                                random_weights("topk"))


def test_missing_folder_files_and_pickles(tmp_path, monkeypatch):
    with pytest.raises(SAENotFoundError, match="does not exist"):
        load_sae(tmp_path / "nope")
    folder = _folder(tmp_path)
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(SAENotFoundError, match="has no sae_weights.safetensors"):
        load_sae(folder)
    torch.save({"W_enc": torch.zeros(1)}, folder / "sae.pt")

    def no_unpickling(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(SAENotFoundError, match="pickle.*never loads"):
        load_sae(folder)
    (folder / "cfg.json").unlink()
    with pytest.raises(SAENotFoundError, match="has no cfg.json"):
        load_sae(folder)
    with pytest.raises(FileNotFoundError):  # also the built-in class
        load_sae(folder)


def test_truncated_weights(tmp_path):
    folder = _folder(tmp_path)
    weights = folder / "sae_weights.safetensors"
    data = weights.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        weights.write_bytes(data[:cut])
        with pytest.raises(SAEFormatError, match="truncated"):
            load_sae(folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path, bad):
    w = random_weights("standard")
    w["W_dec"][3, 5] = bad
    folder = write_saelens_folder(tmp_path / "nan", saelens6_cfg("standard"), w)
    with pytest.raises(NonFiniteError, match="'W_dec' has 1 NaN or infinite"):
        load_sae(folder)


@pytest.mark.parametrize("change,error,fragment", [
    (dict(architecture="gated"), SAEFormatError, "unknown SAE architecture 'gated'"),
    (dict(metadata={"model_name": "m"}), SAEFormatError, "names no hook_name"),
    (dict(metadata={"hook_name": "blocks.1.hook_nonsense"}), UnknownComponentError,
     "unknown SAE hook_name 'blocks.1.hook_nonsense'"),
    (dict(d_sae=95), SAEFormatError, "'W_enc' has shape \\(64, 96\\).*must be \\(64, 95\\)"),
    (dict(k=0), SAEFormatError, "k must be a positive integer"),
    (dict(normalize_activations="layer_norm"), SAEFormatError, "not supported"),
    (dict(dtype="int8"), SAEFormatError, "unknown dtype"),
])
def test_bad_configs(tmp_path, change, error, fragment):
    cfg = saelens6_cfg("topk")
    cfg.update(change)
    folder = write_saelens_folder(tmp_path / "bad", cfg, random_weights("topk"))
    with pytest.raises(error, match=fragment):
        load_sae(folder)


def test_invalid_json_and_unexpected_tensors(tmp_path):
    folder = _folder(tmp_path)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match="not valid JSON"):
        load_sae(folder)
    w = random_weights("topk")
    w["W_gate"] = torch.zeros(2)
    with pytest.raises(SAEFormatError, match="unexpected tensors \\['W_gate'\\]"):
        load_sae(write_saelens_folder(tmp_path / "x", saelens6_cfg("topk"), w))


def test_attach_errors_come_before_any_forward_and_leave_no_hooks(lm, monkeypatch):
    before = lm.hook_snapshot()
    counter = Counting(lm, monkeypatch)
    wide = SparseAutoencoder(48, 16, hook_name="blocks.1.hook_resid_post")
    with pytest.raises(ShapeMismatchError, match="d_in=48.*blocks.1.resid_post.*64 wide"):
        lm.trace(CLEAN, saes=[wide])
    far = SparseAutoencoder(64, 16, hook_name="blocks.7.hook_resid_post")
    with pytest.raises(OutOfRangeError, match="layer 7"):
        sae_patching(lm, far, CLEAN, CORRUPTED, **ANSWERS)
    with pytest.raises(OutOfRangeError, match="contains 96, out of range.*96 features"):
        sae_patching(lm, tiny_sae(), CLEAN, CORRUPTED, features=[3, 96], **ANSWERS)
    with pytest.raises(OutOfRangeError, match="feature 200 of FeatureEdit"):
        lm.trace(CLEAN, saes=[tiny_sae()], interventions={FEATS: edit_features([200], value=0)})
    with pytest.raises(OutOfRangeError, match="out of range"):
        ablate(lm, CLEAN, component=FEATS, saes=[tiny_sae()], features=[-1], **ANSWERS)
    with pytest.raises(OutOfRangeError, match="out of range"):
        sae_attribution(lm, tiny_sae(), CLEAN, CORRUPTED, features=[[1, 500]], **ANSWERS)
    with pytest.raises(UnknownComponentError, match="no SAE is attached"):
        lm.trace(CLEAN, cache=[FEATS])
    with pytest.raises(InvalidArgumentError, match="read-only"):
        lm.trace(CLEAN, saes=[tiny_sae()],
                 interventions={"blocks.1.resid_post.sae.recons": iv.zero()})
    with pytest.raises(InvalidArgumentError, match="needs the error term"):
        lm.trace(CLEAN, saes=[tiny_sae()], keep_error=False,
                 interventions={"blocks.1.resid_post.sae.error": iv.zero()})
    with pytest.raises(InvalidArgumentError, match="two SAEs"):
        lm.trace(CLEAN, saes=[tiny_sae(), tiny_sae(seed=2)])
    with pytest.raises(InvalidArgumentError, match="declares no site"):
        lm.trace(CLEAN, saes=[_NoSite()])
    with pytest.raises(InvalidArgumentError, match="pass the SAE with saes"):
        ablate(lm, CLEAN, component=FEATS, **ANSWERS)
    with pytest.raises(InvalidArgumentError, match="does not name SAE features"):
        ablate(lm, CLEAN, component="mlp", saes=[tiny_sae()], **ANSWERS)
    assert counter.calls == 0
    assert lm.hook_snapshot() == before


class _NoSite:
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f


def test_an_sae_for_another_model_warns_with_both_names(lm):
    sae = tiny_sae(model_name="gpt2-small")
    with pytest.warns(SAEModelMismatchWarning, match="'gpt2-small'.*'LlamaForCausalLM'"):
        lm.trace(CLEAN, saes=[sae]).run()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.trace(CLEAN, saes=[tiny_sae(model_name="meta/LlamaForCausalLM")]).run()
        lm.trace(CLEAN, saes=[tiny_sae()]).run()  # no model name: nothing to compare


# -- the splice -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_cached_features_and_error_are_the_saes_on_the_site(lm, arch):
    sae = tiny_sae(arch)
    plain = lm.trace([CLEAN, CORRUPTED], cache=["blocks.1.resid_post"]).run()
    x = plain.cache["blocks.1.resid_post"]
    names = [FEATS, "blocks.1.resid_post.sae.error", "blocks.1.hook_resid_post.hook_sae_recons",
             "blocks.1.resid_post.sae.input", "blocks.1.resid_post.sae.output",
             "blocks.1.resid_post"]
    tr = lm.trace([CLEAN, CORRUPTED], saes=[sae], cache=names).run()
    f = tr.cache[FEATS]
    assert f.shape == (2, x.shape[1], 96) and (f > 0).any()
    # observed bitwise 0 for all three architectures: the splice runs the SAE's own encode and
    # decode on the same activation
    assert_within(f, sae.encode(x), 0.0, "features")
    assert_within(tr.cache["blocks.1.resid_post.sae.error"], x - sae.decode(sae.encode(x)), 0.0,
                  "error")
    assert_within(tr.cache["blocks.1.hook_resid_post.hook_sae_recons"],
                  sae.decode(sae.encode(x)), 0.0, "reconstruction")
    assert torch.equal(tr.cache["blocks.1.resid_post.sae.input"], x)
    assert torch.equal(tr.cache["blocks.1.resid_post.sae.output"], x)
    assert torch.equal(tr.cache["blocks.1.resid_post"], x)  # the exact splice changes nothing
    assert torch.equal(tr.logits, plain.logits)
    everything = lm.trace(CLEAN, saes=[sae], cache=True).run()
    assert FEATS in everything.cache and "blocks.1.resid_post.sae.error" in everything.cache


def test_a_no_op_feature_edit_leaves_the_logits_unchanged(lm):
    sae = tiny_sae()
    base = lm.trace(CLEAN).run().logits
    f = lm.trace(CLEAN, saes=[sae], cache=[FEATS]).run().cache[FEATS]
    dead = int((f[0] == 0).all(0).nonzero()[0])
    live = int(f[0, -1].argmax())
    for edit in (iv.function(lambda a: a.clone()), edit_features([dead], value=0.0),
                 edit_features([live], scale=1.0),
                 edit_features([live], value=f[:, -1:, live:live + 1], positions=[-1])):
        out = lm.trace(CLEAN, saes=[sae], interventions={FEATS: edit}).run().logits
        assert torch.equal(out, base)


def test_feature_edits_equal_the_activation_they_imply(lm):
    """decode(f') + error, computed by hand and applied with replace_with."""
    sae = tiny_sae("standard")
    x = lm.trace(CLEAN, cache=["blocks.1.resid_post"]).run().cache["blocks.1.resid_post"]
    f = sae.encode(x)
    live = int(f[0, -2].argmax())
    f2 = f.clone()
    f2[0, -2, live] = 3.0
    f2[0, :, 7] *= 2
    expected = sae.decode(f2) + (x - sae.decode(f))
    edits = [edit_features([live], value=3.0, positions=[-2]), edit_features([7], scale=2.0)]
    got = lm.trace(CLEAN, saes=[sae], interventions={FEATS: edits}).run().logits
    ref = lm.trace(CLEAN, interventions={"blocks.1.resid_post": iv.replace_with(expected)}
                   ).run().logits
    # observed 7.2e-7 on logits up to 3.0: the splice adds decode(f') and the error inside the
    # hook, the hand route adds them before replace_with, so float32 rounds in another order;
    # 6e-6 is 8.4x that
    assert_within(got, ref, 6e-6, "feature edits vs their activation")
    assert (got - lm.trace(CLEAN).run().logits).abs().max() > 1e-3


def test_error_edits_and_keep_error_false(lm):
    sae = tiny_sae()
    x = lm.trace(CLEAN, cache=["blocks.1.resid_post"]).run().cache["blocks.1.resid_post"]
    recon = sae.decode(sae.encode(x))
    no_error = lm.trace(CLEAN, saes=[sae], keep_error=False).run().logits
    ref = lm.trace(CLEAN, interventions={"blocks.1.resid_post": iv.replace_with(recon)}
                   ).run().logits
    # observed bitwise 0: without the error the splice writes decode(encode(x)) itself
    assert_within(no_error, ref, 0.0, "keep_error=False vs the reconstruction")
    zero_err = lm.trace(CLEAN, saes=[sae], interventions={
        "blocks.1.resid_post.sae.error": iv.zero(positions=[-1])}).run().logits
    mixed = x.clone()
    mixed[:, -1] = recon[:, -1]
    ref2 = lm.trace(CLEAN, interventions={"blocks.1.resid_post": iv.replace_with(mixed)}
                    ).run().logits
    # observed 9.5e-7 on logits up to 3.2 (the reconstruction plus a zeroed error is rounded
    # once more than the reconstruction itself); 8e-6 is 8.4x that
    assert_within(zero_err, ref2, 8e-6, "zeroed error at the last position")
    assert not torch.allclose(no_error, lm.trace(CLEAN).run().logits)


class SAELensLike(torch.nn.Module):
    """Structured like a ``sae_lens.SAE`` (``cfg.metadata.hook_name``, ``cfg.d_in``)."""

    def __init__(self, inner: SparseAutoencoder) -> None:
        super().__init__()
        self.inner = inner
        meta = type("Meta", (), {"hook_name": "blocks.1.hook_resid_post",
                                 "model_name": "LlamaForCausalLM"})()
        self.cfg = type("Cfg", (), {"d_in": 64, "d_sae": inner.d_sae, "metadata": meta})()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.encode(x)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(f)


class DictionaryLearningLike:
    """``dictionary_learning``'s AutoEncoder interface: encode/decode, activation_dim,
    dict_size, no site of its own."""

    def __init__(self, inner: SparseAutoencoder) -> None:
        self.inner, self.activation_dim, self.dict_size = inner, 64, inner.d_sae

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.encode(x)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(f)


def test_any_encode_decode_object_works(lm):
    sae = tiny_sae()
    edit = {FEATS: edit_features([5, 9], value=1.5, positions=[-1])}
    ours = lm.trace(CLEAN, saes=[sae], interventions=edit, cache=[FEATS]).run()
    for other in (SAELensLike(sae), wrap_sae(DictionaryLearningLike(sae), "blocks.1.resid_post"),
                  wrap_sae(DictionaryLearningLike(sae), "blocks.1.hook_resid_post", d_sae=96)):
        got = lm.trace(CLEAN, saes=[other], interventions=edit, cache=[FEATS]).run()
        assert torch.equal(got.logits, ours.logits)
        assert torch.equal(got.cache[FEATS], ours.cache[FEATS])
    r1 = sae_patching(lm, sae, CLEAN, CORRUPTED, features=list(range(20)), **ANSWERS)
    r2 = sae_patching(lm, SAELensLike(sae), CLEAN, CORRUPTED, features=list(range(20)), **ANSWERS)
    assert torch.equal(r1.effect_matrix, r2.effect_matrix)


def test_an_sae_on_per_head_outputs(lm):
    """A hook_z SAE reads attn.z flattened to n_heads * d_head."""
    sae = SparseAutoencoder(64, 40, hook_name="blocks.2.attn.hook_z", reshape_activations="hook_z",
                            seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(0.2)
    name = "blocks.2.attn.z.sae.features"
    base = lm.trace(CLEAN).run().logits
    tr = lm.trace(CLEAN, saes=[sae], cache=[name, "blocks.2.attn.z"]).run()
    assert torch.equal(tr.logits, base)
    z = tr.cache["blocks.2.attn.z"]
    # observed bitwise 0: the same encode on the same flattened heads
    assert_within(tr.cache[name], sae.encode(z.flatten(-2)), 0.0, "hook_z features")
    edited = lm.trace(CLEAN, saes=[sae], interventions={name: edit_features([0], value=9.0)}
                      ).run().logits
    assert (edited - base).abs().max() > 1e-4
    r = sae_patching(lm, sae, CLEAN, CORRUPTED, features=list(range(10)), **ANSWERS)
    rn = sae_patching(lm, sae, CLEAN, CORRUPTED, features=list(range(10)), engine="naive",
                      **ANSWERS)
    # observed ratio 1.6e-5 (|diff| 5.3e-6 on effects up to 0.34): the staircase batches rows
    # the naive loop runs one at a time (the CPU matmul blocks them differently), and dividing
    # by the clean-corrupted gap enlarges that; 1e-4 is 6.3x that, with 7 of 10 cells >= 100x
    assert_matches_reference(r.effect_matrix, rn.effect_matrix, 0.0, rtol=1e-4, min_cells=7,
                             what="hook_z SAE: fast vs naive")


# -- the engine extension ---------------------------------------------------------------------------
def test_site_patch_values_must_stack_one_per_entry(lm):
    site = lm.site("blocks.1.resid_post")
    SitePatch(site, (1, 2), None, torch.zeros(2, 64))
    with pytest.raises(InvalidArgumentError, match="one value per entry \\(2 entries"):
        SitePatch(site, (1, 2), None, torch.zeros(3, 64))
    a, b = SitePatch(site, (1,), None, torch.zeros(1, 64)), SitePatch(site, (1,))
    assert a == b  # values take no part in equality (tensors have no truth value)


# -- feature patching -------------------------------------------------------------------------------
def independent_feature_effects(model: Any, sae: Any, features: list[int],
                                positions: list[int] | None = None) -> torch.Tensor:
    """One model.trace per feature: the base (corrupted) run with the clean run's features."""
    with model.trace([CLEAN, CORRUPTED], saes=[sae], cache=[FEATS]) as tr:
        f_clean = tr.cache[FEATS][:1]
    base = logit_diff(model.trace(CORRUPTED).run().logits, model)
    source = logit_diff(model.trace(CLEAN).run().logits, model)
    out = []
    pos = positions if positions is not None else list(range(f_clean.shape[1]))
    for j in features:
        value = f_clean[:, pos, j][..., None]
        edit = edit_features([j], value=value, positions=pos)
        patched = logit_diff(model.trace(CORRUPTED, saes=[sae], interventions={FEATS: edit}
                                         ).run().logits, model)
        out.append((patched - base) / (source - base))
    return torch.tensor(out)


#: Relative tolerances of SAE feature patching against its references (:func:`conftest.
#: assert_matches_reference`), tiny model and SmolLM2 (float32; batched rows vs one forward per
#: feature, other summation orders). Observed: 1.9e-6 on the tiny model (standard SAE, |diff|
#: 3.4e-6 on effects up to 1.8), 5.4e-5 on SmolLM2 (|diff| 8.6e-7 on effects up to 0.016;
#: the old check was 1e-3 absolute with a 0.01 guard).
SAE_RTOL = 1e-5
SAE_RTOL_REAL = 5e-4


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_sae_patching_equals_the_naive_loop(lm, arch, one_thread):
    sae = tiny_sae(arch)
    fast = sae_patching(lm, sae, CLEAN, CORRUPTED, **ANSWERS)
    naive = sae_patching(lm, sae, CLEAN, CORRUPTED, engine="naive", **ANSWERS)
    loop = independent_feature_effects(lm, sae, list(range(96)))
    assert fast.effect_matrix.shape == (96,) and fast.axes == ("feature",)
    assert fast.labels["feature"] == list(range(96))
    # normalised effects (unpatched value 0), by the suite's rule; float32, the fast engine's
    # batched rows against one forward per feature (other summation orders)
    assert_matches_reference(fast.effect_matrix, naive.effect_matrix, 0.0, rtol=SAE_RTOL,
                             min_cells=8, what=f"{arch} fast vs naive")
    assert_matches_reference(fast.effect_matrix, loop, 0.0, rtol=SAE_RTOL, min_cells=8,
                             what=f"{arch} fast vs plain traces")
    assert fast.method == "sae_patching" and fast.component == FEATS
    # rows whose features agree in both runs are skipped, and are exactly 0
    noop = fast.extra["noop_cells"]
    assert 0 < noop < 96 and fast.extra["rows"] <= 96 - noop + 3  # + 3 reference rows
    assert int((fast.effect_matrix == 0).sum()) >= noop


def test_by_position_groups_and_positions(lm, one_thread):
    sae = tiny_sae()
    cells = [[1, 2, 3], 5, 7]
    r = sae_patching(lm, sae, CLEAN, CORRUPTED, features=cells, positions=[9, -1],
                     by_position=True, **ANSWERS)
    assert r.axes == ("position", "feature") and r.effect_matrix.shape == (2, 3)
    assert r.labels["feature"] == ["1+2+3", 5, 7] and r.labels["position"][1].startswith("13:")
    with lm.trace([CLEAN, CORRUPTED], saes=[sae], cache=[FEATS]) as tr:
        f_clean = tr.cache[FEATS][:1]
    base = logit_diff(lm.trace(CORRUPTED).run().logits, lm)
    source = logit_diff(lm.trace(CLEAN).run().logits, lm)
    for a, p in enumerate([9, 13]):
        for b, feats in enumerate([[1, 2, 3], [5], [7]]):
            edit = edit_features(feats, value=f_clean[:, [p]][..., feats], positions=[p])
            patched = logit_diff(lm.trace(CORRUPTED, saes=[sae], interventions={FEATS: edit}
                                          ).run().logits, lm)
            assert_within(float(r.effect_matrix[a, b]), (patched - base) / (source - base), NORM_ATOL,
                  "hand")


def test_references_are_the_site_all_features_and_error(lm, one_thread):
    sae = tiny_sae()
    r = sae_patching(lm, sae, CLEAN, CORRUPTED, features=[0], positions=[-1], **ANSWERS)
    ref = r.extra["reference"]
    assert ref["positions"] == [[13]]
    site = activation_patching(lm, CLEAN, CORRUPTED, component="blocks.1.resid_post",
                               positions=[-1], **ANSWERS)
    assert_within(ref["site"][0], float(site.effect_matrix[0]), NORM_ATOL, "hand")
    with lm.trace([CLEAN, CORRUPTED], saes=[sae], cache=[FEATS]) as tr:
        f_clean = tr.cache[FEATS][:1, -1:]
    base = logit_diff(lm.trace(CORRUPTED).run().logits, lm)
    source = logit_diff(lm.trace(CLEAN).run().logits, lm)
    edit = iv.replace_with(f_clean, positions=[-1])
    patched = logit_diff(lm.trace(CORRUPTED, saes=[sae], interventions={FEATS: edit}
                                  ).run().logits, lm)
    assert_within(ref["all_features"][0], (patched - base) / (source - base), NORM_ATOL, "hand")
    x = lm.trace([CLEAN, CORRUPTED], cache=["blocks.1.resid_post"]).run().cache[
        "blocks.1.resid_post"]
    err = x - sae.decode(sae.encode(x))
    mixed = x[1:].clone()
    mixed[:, -1] += err[0, -1] - err[1, -1]
    patched = logit_diff(lm.trace(CORRUPTED, interventions={
        "blocks.1.resid_post": iv.replace_with(mixed)}).run().logits, lm)
    assert_within(ref["error"][0], (patched - base) / (source - base), NORM_ATOL, "hand")


def test_a_dataset_follows_the_one_aggregation_rule(lm, one_thread):
    sae = tiny_sae()
    clean = [CLEAN, "When John and Mary went to the store, Mary gave a drink to"]
    corrupted = [CORRUPTED, "When John and Mary went to the store, John gave a drink to"]
    correct, incorrect = [" Mary", " John"], [" John", " Mary"]
    feats = [0, 3, 5, 11, 40]
    r = sae_patching(lm, sae, clean, corrupted, features=feats, positions=[-1],
                     correct=correct, incorrect=incorrect, normalize=False)
    normed = sae_patching(lm, sae, clean, corrupted, features=feats, positions=[-1],
                          correct=correct, incorrect=incorrect)
    raws, bases, sources = [], [], []
    for i in range(2):
        one = sae_patching(lm, sae, clean[i], corrupted[i], features=feats, positions=[-1],
                           correct=correct[i], incorrect=incorrect[i], normalize=False)
        raws.append(one.effect_matrix)
        bases.append(one.corrupted_metric)
        sources.append(one.clean_metric)
    mean_raw = torch.stack(raws).mean(0)
    # observed 6.0e-8 on raw values up to 0.30: two pairs batched together vs alone round
    # differently in float32; 5e-7 is 8.4x that
    assert_within(r.effect_matrix, mean_raw, 5e-7, "raw mean over pairs")
    b, s = sum(bases) / 2, sum(sources) / 2
    # observed ratio 1.8e-6 (|diff| 8.1e-6 on effects up to 4.5): the same float32 difference,
    # divided by a mean gap of only -0.092; 1e-5 is 5.6x that (2 of 5 cells >= 100x)
    assert_matches_reference(normed.effect_matrix, (mean_raw - b) / (s - b), 0.0, rtol=1e-5,
                             min_cells=2, what="normalised mean over pairs")
    assert normed.per_pair.shape == (2, 5)


def test_noising_patches_corrupted_features_into_the_clean_run(lm, one_thread):
    sae = tiny_sae()
    r = sae_patching(lm, sae, CLEAN, CORRUPTED, features=list(range(30)), direction="noise",
                     **ANSWERS)
    with lm.trace([CLEAN, CORRUPTED], saes=[sae], cache=[FEATS]) as tr:
        f_corr = tr.cache[FEATS][1:]
    base = logit_diff(lm.trace(CLEAN).run().logits, lm)
    source = logit_diff(lm.trace(CORRUPTED).run().logits, lm)
    for j in (0, 5, 17):
        edit = edit_features([j], value=f_corr[..., j:j + 1])
        patched = logit_diff(lm.trace(CLEAN, saes=[sae], interventions={FEATS: edit}
                                      ).run().logits, lm)
        assert_within(float(r.effect_matrix[j]), (patched - base) / (source - base), NORM_ATOL, "hand")


# -- attribution --------------------------------------------------------------------------------------
def test_attribution_is_additive_for_a_linear_decoder(lm, one_thread):
    """With decode linear, x_src - x_base = W_dec^T (f_src - f_base) + (err_src - err_base), so
    the feature estimates plus the error estimate equal the site's own estimate, which in turn is
    attribution_patching's."""
    sae = tiny_sae("standard")
    a = sae_attribution(lm, sae, CLEAN, CORRUPTED, **ANSWERS)
    ref = a.extra["reference"]
    site = attribution_patching(lm, CLEAN, CORRUPTED, component="blocks.1.resid_post",
                                **ANSWERS)
    assert_within(ref["site"][0], float(site.effect_matrix[0]), NORM_ATOL, "hand")
    total = float(a.effect_matrix.sum()) + ref["error"][0]
    assert_within(total, ref["site"][0], SUM_ATOL, "hand")
    assert a.effect_matrix.abs().max() > 0.01


def test_attribution_estimates_and_verification(lm, one_thread):
    sae = tiny_sae()
    a = sae_attribution(lm, sae, CLEAN, CORRUPTED, verify_top_k=4, **ANSWERS)
    exact = sae_patching(lm, sae, CLEAN, CORRUPTED, **ANSWERS)
    top = torch.argsort(a.effect_matrix.abs(), descending=True)[:4].tolist()
    assert [v["index"] for v in a.extra["verified"]] == [[j] for j in top]
    for v in a.extra["verified"]:
        assert_within(v["exact"], float(exact.effect_matrix[v["index"][0]]), NORM_ATOL, "hand")
        # observed bitwise 0: the verified entry keeps the estimate the matrix holds
        assert_within(v["estimate"], float(a.effect_matrix[v["index"][0]]), 0.0, "estimate")
    corr = torch.corrcoef(torch.stack([a.effect_matrix, exact.effect_matrix]))[0, 1]
    assert corr > 0.8
    # features that agree in both runs (exact no-ops) have an estimate of exactly 0
    noop = exact.effect_matrix == 0
    assert noop.any() and bool((a.effect_matrix[noop] == 0).all())
    pos = sae_attribution(lm, sae, CLEAN, CORRUPTED, by_position=True, positions=[9, -1],
                          **ANSWERS)
    assert pos.axes == ("position", "feature") and pos.effect_matrix.shape == (2, 96)


def test_top_k_patches_the_largest_estimates(lm, one_thread):
    sae = tiny_sae()
    a = sae_attribution(lm, sae, CLEAN, CORRUPTED, **ANSWERS)
    r = sae_patching(lm, sae, CLEAN, CORRUPTED, top_k=5, **ANSWERS)
    expected = torch.argsort(a.effect_matrix.abs(), descending=True, stable=True)[:5].tolist()
    assert r.labels["feature"] == expected and "top 5 of 96" in r.extra["selected_by"]
    full = sae_patching(lm, sae, CLEAN, CORRUPTED, **ANSWERS)
    # observed ratio 1.1e-6 (|diff| 6.9e-6 on effects up to 6.4): 5 features batch differently
    # from all 96; 8e-6 is 7.4x that, every cell >= 100x
    assert_matches_reference(r.effect_matrix, full.effect_matrix[expected], 0.0, rtol=8e-6,
                             min_cells=5, what="top_k vs the full sweep")


# -- ablation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_feature_ablation_equals_trace_edits(lm, kind, one_thread):
    sae = tiny_sae()
    prompts = [CLEAN, "When John and Mary went to the store, Mary gave a drink to"]
    correct, incorrect = [" Mary", " John"], [" John", " Mary"]
    feats = [0, 2, 5, 9, 33]
    r = ablate(lm, prompts, component=FEATS, saes=[sae], kind=kind, features=feats,
               correct=correct, incorrect=incorrect)
    assert r.axes == ("feature",) and r.labels["feature"] == feats
    f_all = lm.trace(prompts, saes=[sae], cache=[FEATS]).run().cache[FEATS]
    mean = f_all.reshape(-1, 96).mean(0)  # both prompts have 14 tokens: no padding
    for col, j in enumerate(feats):
        changes = []
        for i, p in enumerate(prompts):
            c, k = lm.to_single_token(correct[i]), lm.to_single_token(incorrect[i])
            value = 0.0 if kind == "zero" else float(mean[j])
            edited = lm.trace(p, saes=[sae], interventions={FEATS: edit_features(
                [j], value=value)}).run().logits[0, -1]
            orig = lm.trace(p).run().logits[0, -1]
            changes.append(float((edited[c] - edited[k]) - (orig[c] - orig[k])))
        assert_within(float(r.effect_matrix[col]), sum(changes) / 2, NORM_ATOL, "hand")
    assert r.effect_matrix.abs().max() > 1e-3


def test_feature_resample_ablation_takes_another_prompts_feature(lm, one_thread):
    sae = tiny_sae()
    prompts = [CLEAN, "When John and Mary went to the store, Mary gave a drink to", CORRUPTED]
    feats = [0, 5, 9]
    r = ablate(lm, prompts, component=FEATS, saes=[sae], kind="resample", features=feats,
               correct=" Mary", incorrect=" John")
    sources = r.extra["resample_sources"]
    assert sorted(sources) == [0, 1, 2] and all(s != i for i, s in enumerate(sources))
    f_all = lm.trace(prompts, saes=[sae], cache=[FEATS]).run().cache[FEATS]
    for col, j in enumerate(feats):
        changes = []
        for i, p in enumerate(prompts):
            value = f_all[sources[i]][None, :, j:j + 1]
            edited = lm.trace(p, saes=[sae], interventions={FEATS: edit_features(
                [j], value=value)}).run().logits
            changes.append(logit_diff(edited, lm) - logit_diff(lm.trace(p).run().logits, lm))
        assert_within(float(r.effect_matrix[col]), sum(changes) / 3, NORM_ATOL, "hand")


# -- training ---------------------------------------------------------------------------------------
def test_training_texts_are_real_offline_text():
    docs = training_texts()
    sources = {s for s, _ in docs}
    assert sources == {"known_facts", "python_reference", "stdlib_docstrings"}
    text = " ".join(t for _, t in docs[:2000])
    assert "Antarctica" in text and len(docs) > 3000


def test_train_sae_on_a_tiny_model(lm, tmp_path, one_thread):
    docs = [d for d in training_texts(("known_facts",))][:300]
    sae, report = train_sae(lm, "blocks.1.resid_post", 64, k=4, train_tokens=3000,
                            eval_tokens=300, context=32, epochs=2, docs=docs)
    assert report.l0 == pytest.approx(4.0) and 0.0 < report.explained_variance <= 1.0
    assert all(math.isfinite(v) for v in (report.ce_clean, report.ce_spliced, report.ce_zero))
    assert report.text_tokens["known_facts"] > 3300
    back = load_sae(save_sae(sae, tmp_path / "t"))
    assert back.metadata["training_report"]["l0"] == pytest.approx(4.0)
    x = torch.randn(3, 64)
    assert torch.equal(back.encode(x), sae.encode(x))
    std, rep = train_sae(lm, "blocks.1.resid_post", 64, architecture="standard",
                         train_tokens=3000, eval_tokens=300, context=32, epochs=1, docs=docs)
    assert std.architecture == "standard" and rep.l0 > 0


def test_top_activations_leave_out_the_attention_sinks_the_sae_never_trained_on(make_tiny_lm,
                                                                               one_thread):
    """A planted attention sink (one token's embedding scaled 1000x, so its residual norm is far
    above 10x the median, the training rule) tops several features' listings when only position
    0 is skipped; top_activations must list the strongest ordinary tokens instead, by the SAE's
    stored threshold when it has one and by the rule on the given text when it has none."""
    model = make_tiny_lm("llama")
    sink_id = 200
    ids = torch.randint(4, 190, (6, 12), generator=torch.Generator().manual_seed(3))
    ids[2, 5] = ids[4, 7] = sink_id
    with torch.no_grad():
        model.hf_model.get_input_embeddings().weight[sink_id] *= 1000
    # the independent reference: plain PyTorch hooks, the SAE's own encode, a plain top-k
    acts = capture_modules(model.hf_model, ids, {"r": ("model.layers.1", "out")})["r"][:, 1:]
    norms = acts.norm(dim=-1).flatten()  # [6 * 11] tokens after the first
    sinks = norms > 10 * norms.median()
    assert sinks.nonzero().flatten().tolist() == [2 * 11 + 4, 4 * 11 + 6]  # the planted two
    sae = tiny_sae("topk")
    with torch.no_grad():
        f = sae.encode(acts.reshape(-1, 64))  # [66, 96]
    old_top = f.argmax(0)  # the old rule: everything after position 0
    features = [j for j in range(96) if bool(sinks[old_top[j]]) and f[old_top[j], j] > 0]
    assert len(features) >= 3  # not vacuous: a sink used to top these features
    features = features[:4]
    want = f.masked_fill(sinks[:, None], float("-inf"))[:, features].topk(3, dim=0)

    got = top_activations(model, sae, features, ids, k=3)
    for i, j in enumerate(features):
        listed = [(r["sequence"], r["position"]) for r in got[j]]
        assert (2, 5) not in listed and (4, 7) not in listed
        assert all(r["token"] != model.tokenizer.decode([sink_id]) for r in got[j])
        expect = [(int(t) // 11, 1 + int(t) % 11) for t in want.indices[:, i]]
        assert listed == expect[: len(listed)] and len(listed) == int((want.values[:, i] > 0).sum())
        # observed difference between the two forward routes: 0.0 (same float32 ops); 1e-5 margin
        assert [r["activation"] for r in got[j]] == pytest.approx(
            want.values[: len(listed), i].tolist(), abs=1e-5)

    # an SAE that records its training threshold is held to it, not to this text's median
    sae.metadata["sink_norm_threshold"] = float(norms.max()) + 1.0
    lenient = top_activations(model, sae, features, ids, k=3)
    assert any((r["sequence"], r["position"]) in {(2, 5), (4, 7)}
               for j in features for r in lenient[j])
    sae.metadata["sink_norm_threshold"] = float(norms[~sinks].max()) + 1e-3
    assert top_activations(model, sae, features, ids, k=3) == got


def test_cli_sae_train_and_info(lm, tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(cli.runtime, "load_model", lambda model, dtype=None: lm)
    cli.State.quiet, cli.State.debug = False, False
    runner = CliRunner()
    out = tmp_path / "sae"
    res = runner.invoke(cli.app, ["sae", "train", "--site", "blocks.1.resid_post",
                                  "--features", "32", "--k", "4", "--tokens", "2000",
                                  "--eval-tokens", "300", "--epochs", "1", "--out", str(out),
                                  "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output)
    assert payload["d_sae"] == 32 and payload["l0"] == pytest.approx(4.0)
    assert load_sae(out).d_sae == 32
    # the CLI's SAE is the API's with the same arguments, stored in float16 (the CLI's default
    # --storage-dtype): observed bitwise equal after that rounding
    api, _ = train_sae(lm, "blocks.1.resid_post", 32, k=4, train_tokens=2000, eval_tokens=300,
                       epochs=1)
    cli_sae = load_sae(out)
    for name, value in api.state_dict().items():
        stored = value.to(torch.float16).to(value.dtype) if value.is_floating_point() else value
        assert torch.equal(cli_sae.state_dict()[name].to(value.dtype), stored), name
    info = runner.invoke(cli.app, ["sae", "info", str(out), "--json"])
    assert info.exit_code == 0 and json.loads(info.output)["site"] == "blocks.1.resid_post"
    bad = runner.invoke(cli.app, ["sae", "info", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "does not exist" in bad.output
    bad = runner.invoke(cli.app, ["sae", "train", "--storage-dtype", "int8"])
    assert bad.exit_code == 2 and "storage-dtype" in bad.output
    for command in ("train", "info"):
        res = runner.invoke(cli.app, ["sae", command, "--help"])
        assert res.exit_code == 0 and "Example" in res.output and "causalpatch sae" in res.output


# -- the real model and the shipped SAE -----------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    return load_sae(SHIPPED)


@pytest.mark.real
def test_shipped_sae_is_small_and_was_trained_here(shipped):
    size = sum(p.stat().st_size for p in SHIPPED.iterdir())
    assert size < 5.5e6
    report = shipped.metadata["training_report"]
    assert shipped.site == "blocks.20.resid_post" and shipped.d_sae == 2048
    assert report["explained_variance"] > 0.7 and report["l0"] == pytest.approx(32)
    assert report["ce_recovered"] > 0.9 and report["dead_fraction"] < 0.05


@pytest.mark.real
def test_shipped_sae_reconstructs_ioi_prompts(smollm2, shipped):
    """Text unlike its training text (templated stories, not Python documentation): the
    explained variance of the residual stream at positions >= 1 is lower (0.43 when trained)."""
    from causalpatch.datasets import IOIDataset

    data = IOIDataset(smollm2, n=8, seed=1, equal_length=True)
    x = smollm2.trace(data.clean, cache=["blocks.20.resid_post"]).run().cache[
        "blocks.20.resid_post"][:, 1:].reshape(-1, 576)
    recon = shipped.decode(shipped.encode(x))
    ev = 1 - float(((recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert ev > 0.3


@pytest.mark.real
def test_real_model_no_op_edit_is_exact(smollm2, shipped):
    before = smollm2.hook_snapshot()
    name = "blocks.20.resid_post.sae.features"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trained on this model: no mismatch warning
        base = smollm2.trace(CLEAN).run().logits
        f = smollm2.trace(CLEAN, saes=[shipped], cache=[name]).run().cache[name]
        live = int(f[0, -1].argmax())
        out = smollm2.trace(CLEAN, saes=[shipped], interventions={name: edit_features(
            [live], value=f[:, -1:, live:live + 1], positions=[-1])}).run().logits
    # the splice is exact (decode(f) + error == the activation), and writing a feature its own
    # value changes nothing: observed bitwise equal logits (the old check allowed 1e-5)
    assert torch.equal(out, base)
    assert int((f[0, 1:] > 0).sum(-1).max()) == 32
    assert smollm2.hook_snapshot() == before


@pytest.mark.real
def test_real_model_fast_equals_naive_on_an_ioi_pair(smollm2, shipped, one_thread):
    name = "blocks.20.resid_post.sae.features"
    with smollm2.trace([CLEAN, CORRUPTED], saes=[shipped], cache=[name]) as tr:
        f = tr.cache[name][:, 9]  # the second subject (" John" / " Mary")
    live = ((f[0] != f[1]).nonzero().flatten()).tolist()
    feats = live[:24] + [j for j in range(2048) if j not in live][:4]
    fast = sae_patching(smollm2, shipped, CLEAN, CORRUPTED, features=feats, positions=[9],
                        **ANSWERS)
    naive = sae_patching(smollm2, shipped, CLEAN, CORRUPTED, features=feats, positions=[9],
                         engine="naive", **ANSWERS)
    assert_matches_reference(fast.effect_matrix, naive.effect_matrix, 0.0, rtol=SAE_RTOL_REAL,
                             min_cells=8, what="smollm2 IOI features")
    assert (fast.effect_matrix[-4:] == 0).all()
    ref = fast.extra["reference"]
    site = activation_patching(smollm2, CLEAN, CORRUPTED, component="blocks.20.resid_post",
                               positions=[9], **ANSWERS).effect_matrix[0]
    # observed 4.2e-7 (was allowed 1e-3): both patch the whole site at position 9, in
    # differently batched float32 forwards of 30 layers; 3e-6 is 7.2x that
    assert_within(ref["site"][0], float(site), 3e-6, "reference: the whole site vs patching")


# -- on the shared core: independent checks on three families -----------------------------------
#: grouped-query attention (LLaMA), GPT-2, Gemma 3 (sliding windows, soft-capping)
CORE_FAMILIES = ["llama", "gpt2", "gemma3_text"]
SITE = "blocks.1.resid_post"
LAST3 = [-3, -2, -1]  # positions that reach the last one through Gemma 3's window of 4


@pytest.fixture(scope="module", params=CORE_FAMILIES)
def family_lm(request, make_tiny_lm):
    return request.param, make_tiny_lm(request.param)


def moving_answers(model: Any) -> tuple[int, int]:
    """The tokens whose logits the corruption moves most, up and down: a well-conditioned gap
    (effects are then far above float32 rounding)."""
    diff = (model.trace(CLEAN).run().logits[0, -1]
            - model.trace(CORRUPTED).run().logits[0, -1])
    return int(diff.argmax()), int(diff.argmin())


class HandPatching:
    """SAE feature patching written out: ``model.trace`` replacing the site's activation of the
    base (corrupted) run with ``x_base + (decode(f') - decode(f_base))``, the logit difference
    read off the logits by hand, normalised by the plain runs' gap."""

    def __init__(self, model: Any, sae: Any, correct: int, incorrect: int) -> None:
        self.model, self.sae, self.correct, self.incorrect = model, sae, correct, incorrect
        x = model.trace([CLEAN, CORRUPTED], cache=[SITE]).run().cache[SITE]
        self.x_src, self.x_base = x[0], x[1]
        with torch.no_grad():
            self.f_src, self.f_base = sae.encode(self.x_src), sae.encode(self.x_base)
            self.r_src, self.r_base = sae.decode(self.f_src), sae.decode(self.f_base)
        self.n = self.x_base.shape[0]
        self.m_base = self.metric(model.trace(CORRUPTED).run().logits)
        self.m_src = self.metric(model.trace(CLEAN).run().logits)

    def metric(self, logits: torch.Tensor) -> float:
        return float(logits[0, -1, self.correct] - logits[0, -1, self.incorrect])

    def effect(self, act: torch.Tensor) -> float:
        logits = self.model.trace(CORRUPTED, interventions={
            SITE: iv.replace_with(act[None])}).run().logits
        return (self.metric(logits) - self.m_base) / (self.m_src - self.m_base)

    def positions(self, positions: list[int] | None) -> list[int]:
        return list(range(self.n)) if positions is None else [p % self.n for p in positions]

    def features(self, feats: list[int], positions: list[int] | None = None) -> float:
        pos = torch.tensor(self.positions(positions))
        f = self.f_base.clone()
        f[pos[:, None], torch.tensor(feats)[None, :]] = self.f_src[pos[:, None],
                                                                   torch.tensor(feats)[None, :]]
        act = self.x_base.clone()
        with torch.no_grad():
            act[pos] = self.x_base[pos] + (self.sae.decode(f[pos]) - self.r_base[pos])
        return self.effect(act)

    def references(self, positions: list[int] | None = None) -> dict[str, float]:
        pos = torch.tensor(self.positions(positions))
        xb, xs, rb, rs = self.x_base, self.x_src, self.r_base, self.r_src
        acts = {name: self.x_base.clone() for name in ("site", "all_features", "error")}
        acts["site"][pos] = xs[pos]
        acts["all_features"][pos] = xb[pos] + (rs[pos] - rb[pos])
        acts["error"][pos] = xb[pos] + ((xs[pos] - rs[pos]) - (xb[pos] - rb[pos]))
        return {name: self.effect(act) for name, act in acts.items()}

    def live(self, positions: list[int] | None = None) -> list[int]:
        """Features whose value differs between the runs at ``positions`` (not no-ops)."""
        pos = self.positions(positions)
        return (self.f_src[pos] != self.f_base[pos]).any(0).nonzero().flatten().tolist()


def hand_attribution(model: Any, family: str, sae: Any, correct: int, incorrect: int
                     ) -> dict[str, torch.Tensor]:
    """First-order SAE attribution by plain autograd: a forward hook on the Hugging Face decoder
    layer (the module path written out in ``conftest.REFERENCE``) splices ``x + d_x +
    decode(f + d_f) - decode(f)`` into the base run; ``d metric / d d_f`` and ``/ d d_x``.

    Returns ``features [T, d_sae]``, ``site [T]``, ``error [T]`` (raw metric units) and the
    plain runs' metric ``base`` / ``source``."""
    from conftest import REFERENCE

    path, where = REFERENCE[family].sites["resid_post"]
    assert where == "out"
    layer = model.hf_model.get_submodule(path.format(L=1))
    ids = {text: model.to_tokens(text) for text in (CLEAN, CORRUPTED)}
    seen: dict[str, torch.Tensor] = {}

    def record(module: Any, args: Any, out: Any) -> None:
        seen["x"] = (out[0] if isinstance(out, tuple) else out)[0].detach().clone()

    def splice(module: Any, args: Any, out: Any) -> Any:
        x = out[0] if isinstance(out, tuple) else out
        with torch.no_grad():
            f = sae.encode(x.detach())
            recon = sae.decode(f)
        seen["d_f"] = torch.zeros_like(f, requires_grad=True)
        seen["d_x"] = torch.zeros_like(x, requires_grad=True)
        new = x + seen["d_x"] + (sae.decode(f + seen["d_f"]) - recon)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    def logit_diff_of(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, correct] - logits[0, -1, incorrect]

    handle = layer.register_forward_hook(record)
    try:
        with torch.no_grad():
            source = float(logit_diff_of(model.hf_model(ids[CLEAN]).logits))
            x_src = seen["x"]
            base = float(logit_diff_of(model.hf_model(ids[CORRUPTED]).logits))
            x_base = seen["x"]
    finally:
        handle.remove()
    handle = layer.register_forward_hook(splice)
    try:
        with torch.enable_grad():
            m = logit_diff_of(model.hf_model(ids[CORRUPTED]).logits)
            g_f, g_x = torch.autograd.grad(m, [seen["d_f"], seen["d_x"]])
    finally:
        handle.remove()
    with torch.no_grad():
        f_src, f_base = sae.encode(x_src), sae.encode(x_base)
        r_src, r_base = sae.decode(f_src), sae.decode(f_base)
        g_f, g_x = g_f[0], g_x[0]
        return {"features": (f_src - f_base) * g_f, "site": ((x_src - x_base) * g_x).sum(-1),
                "error": (((x_src - r_src) - (x_base - r_base)) * g_x).sum(-1),
                "base": torch.tensor(base), "source": torch.tensor(source)}


#: hand patching / hand autograd against the method, relative to ``scale``, the largest effect
#: of the comparison (its cells and references): float32 runs of other batch shapes. Largest
#: observed 1.3e-6 (GPT-2, by position), over the three families.
HAND_RTOL = 1e-5


def assert_close_to(got: Any, want: Any, scale: float, what: str) -> None:
    """``|got - want| <= HAND_RTOL * scale`` (``scale``: the largest effect of the comparison),
    by ``conftest.assert_matches_reference``: its relative tolerance is that bound over
    ``max |want|`` (0 = no effect), and ``want`` must not be all 0."""
    want_t = torch.as_tensor(want, dtype=torch.float64)
    top = float(want_t.abs().max())
    assert top > 0, f"{what}: the reference is 0 everywhere (vacuous)"
    import os

    if os.environ.get("CAUSALPATCH_TOL_REPORT"):
        diff = float((torch.as_tensor(got, dtype=torch.float64) - want_t).abs().max())
        print(f"\n[hand] {what}: max |difference| / scale {diff / scale:.3g}")
    assert_matches_reference(got, want_t, 0.0, rtol=HAND_RTOL * scale / top, min_cells=1,
                             what=what)

#: normalised effects (fractions of the clean-corrupted gap) against hand patching on the tiny
#: model, absolute: float32 runs of other batch shapes. Largest observed 7.6e-6.
NORM_ATOL = 7e-5
#: the feature estimates plus the error estimate against the site's estimate (additivity of a
#: linear decoder, float32 sums over 96 features): observed 1.1e-5.
SUM_ATOL = 1e-4



def test_sae_patching_equals_hand_patching_on_three_families(family_lm, one_thread):
    """Exact feature patching (by position and jointly, groups of features, no-op cells, the
    three references) equals model.trace patches written out, to 1e-5 of the largest effect."""
    family, model = family_lm
    sae = tiny_sae("topk", d_in=model.d_model)
    correct, incorrect = moving_answers(model)
    hand = HandPatching(model, sae, correct, incorrect)
    live = hand.live(LAST3)
    dead = next(j for j in range(96) if j not in hand.live())
    cells = [live[0], [live[1], live[2]], live[3], dead, [live[4], dead]]
    r = sae_patching(model, sae, CLEAN, CORRUPTED, features=cells, positions=LAST3,
                     by_position=True, correct=correct, incorrect=incorrect, progress=False)
    assert r.axes == ("position", "feature") and r.effect_matrix.shape == (3, 5)
    assert r.labels["feature"] == [live[0], f"{live[1]}+{live[2]}", live[3], dead,
                                   f"{live[4]}+{dead}"]
    want = torch.tensor([[hand.features(c if isinstance(c, list) else [c], [p]) for c in cells]
                         for p in LAST3])
    refs = [hand.references([p]) for p in LAST3]
    scale = max(float(want.abs().max()), *(abs(v) for ref in refs for v in ref.values()))
    assert float(want.abs().max()) > 1e-2  # effects far above float32 rounding
    assert_close_to(r.effect_matrix, want, scale, f"{family} by position")
    assert (r.effect_matrix[:, 3] == 0).all()  # the no-op cell is exactly 0
    for name in REFERENCE_NAMES:
        assert_close_to(r.extra["reference"][name], [ref[name] for ref in refs], scale,
                        f"{family} reference {name}")
    assert r.extra["reference"]["positions"] == [[hand.n - 3], [hand.n - 2], [hand.n - 1]]
    assert r.extra["noop_cells"] >= 3 and r.extra["rows"] + r.extra["skipped"] == 3 * 5 + 9
    # observed 3.6e-7 on metrics up to 2.6: the hand forward and the sweep's batched one round
    # differently in float32; 3e-6 is 8.4x that
    assert_within(r.clean_metric, hand.m_src, 3e-6, f"{family} clean metric")
    assert_within(r.corrupted_metric, hand.m_base, 3e-6, f"{family} corrupted metric")
    # jointly over every position: twelve features and the references
    feats = hand.live()[:12]
    joint = sae_patching(model, sae, CLEAN, CORRUPTED, features=feats, correct=correct,
                         incorrect=incorrect, progress=False)
    want = torch.tensor([hand.features([j]) for j in feats])
    ref = hand.references()
    scale = max(float(want.abs().max()), *(abs(v) for v in ref.values()))
    assert_close_to(joint.effect_matrix, want, scale, f"{family} jointly")
    for name in REFERENCE_NAMES:
        assert_close_to(joint.extra["reference"][name], [ref[name]], scale, f"{family} {name}")


REFERENCE_NAMES = ("site", "all_features", "error")


def test_sae_attribution_equals_hand_autograd_on_three_families(family_lm, one_thread):
    """The first-order estimates (cells, by position, site and error references) equal plain
    autograd through a hook on the Hugging Face layer; verify_top_k's exact values equal hand
    patching; top_k patches the largest estimates."""
    family, model = family_lm
    sae = tiny_sae("topk", d_in=model.d_model)
    correct, incorrect = moving_answers(model)
    hand = hand_attribution(model, family, sae, correct, incorrect)
    gap = float(hand["source"] - hand["base"])
    n = hand["features"].shape[0]
    # every feature, all positions jointly
    a = sae_attribution(model, sae, CLEAN, CORRUPTED, correct=correct, incorrect=incorrect,
                        progress=False)
    want = hand["features"].sum(0) / gap
    site = float(hand["site"].sum()) / gap
    scale = max(float(want.abs().max()), abs(site))
    assert float(want.abs().max()) > 1e-2
    assert_close_to(a.effect_matrix, want, scale, f"{family} features")
    assert_close_to(a.extra["reference"]["site"], [site], scale, f"{family} site")
    assert_close_to(a.extra["reference"]["error"], [float(hand["error"].sum()) / gap], scale,
                    f"{family} error")
    # observed 1.2e-7 (float32 forwards batched differently, as above); 1e-6 is 8.4x that
    assert_within(a.corrupted_metric, float(hand["base"]), 1e-6, f"{family} corrupted metric")
    # by position, a group of features, verify_top_k
    patching = HandPatching(model, sae, correct, incorrect)
    live = patching.live(LAST3)
    cells = [live[0], [live[1], live[2]], live[3], live[4]]
    b = sae_attribution(model, sae, CLEAN, CORRUPTED, features=cells, positions=LAST3,
                        by_position=True, verify_top_k=3, correct=correct,
                        incorrect=incorrect, progress=False)
    rows = [p % n for p in LAST3]
    want = torch.stack([hand["features"][rows][:, c if isinstance(c, list) else [c]].sum(-1)
                        for c in cells], dim=1) / gap
    scale = float(want.abs().max())
    assert_close_to(b.effect_matrix, want, scale, f"{family} by position")
    assert_close_to(b.extra["reference"]["site"], hand["site"][rows] / gap, max(
        scale, float(hand["site"][rows].abs().max()) / abs(gap)), f"{family} site by position")
    order = torch.argsort(want.flatten().abs(), descending=True, stable=True)[:3].tolist()
    verified = b.extra["verified"]
    assert [v["cell"] for v in verified] == [[k // 4, k % 4] for k in order]
    exact = []
    for v in verified:
        p, c = v["cell"]
        assert v["index"] == [rows[p], b.labels["feature"][c]]
        # observed bitwise 0: the verified entry keeps the estimate the matrix holds
        assert_within(v["estimate"], float(b.effect_matrix[p, c]), 0.0, "estimate")
        feats = cells[c] if isinstance(cells[c], list) else [cells[c]]
        exact.append(patching.features(feats, [LAST3[p]]))
    refs = [patching.references([p]) for p in LAST3]  # the sweep's largest effects
    scale = max(*map(abs, exact), *(abs(v) for ref in refs for v in ref.values()))
    assert_close_to([v["exact"] for v in verified], exact, scale, f"{family} verified")
    # top_k: the cells of the largest |estimate|, patched exactly
    top = sae_patching(model, sae, CLEAN, CORRUPTED, top_k=4, correct=correct,
                       incorrect=incorrect, progress=False)
    chosen = torch.argsort(a.effect_matrix.abs(), descending=True, stable=True)[:4].tolist()
    assert top.labels["feature"] == chosen and "top 4 of 96" in top.extra["selected_by"]
    exact = [patching.features([j]) for j in chosen]
    scale = max(*map(abs, exact), *map(abs, patching.references().values()))
    assert_close_to(top.effect_matrix, exact, scale, f"{family} top_k")


# -- datasets, pair groups, checkpoints and executors ----------------------------------------------
#: two token lengths (14 and 6), so two pair groups on the fast engine
TWO_LENGTHS = [
    (CLEAN, CORRUPTED, " Mary", " John"),
    ("When John and Mary went to the store, Mary gave a drink to",
     "When John and Mary went to the store, John gave a drink to", " John", " Mary"),
    ("The city of Paris is in", "The city of Rome is in", " Paris", " Rome"),
    ("The city of Rome is in", "The city of Paris is in", " Rome", " Paris"),
]


def two_lengths() -> dict[str, list[str]]:
    return dict(zip(("clean", "corrupted", "correct", "incorrect"),
                    map(list, zip(*TWO_LENGTHS))))


class SeedStyleTask:
    """A dataset written in the seed framework's style (methods, answer token ids)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def get_clean_corrupt_pairs(self) -> list[tuple[str, str]]:
        return [(c, x) for c, x, _, _ in TWO_LENGTHS]

    def get_target_tokens(self, i: int) -> tuple[int, int]:
        _, _, good, bad = TWO_LENGTHS[i]
        return self.model.to_single_token(good), self.model.to_single_token(bad)


def test_a_seed_style_dataset_runs_in_pair_groups_of_one_length(lm, one_thread):
    sae = tiny_sae()
    d = two_lengths()
    feats = [0, 3, 5, [11, 40], 57]
    lists = sae_patching(lm, sae, d["clean"], d["corrupted"], correct=d["correct"],
                         incorrect=d["incorrect"], features=feats, positions=[-2, -1],
                         normalize=False, progress=False)
    seeds = sae_patching(lm, sae, SeedStyleTask(lm), features=feats, positions=[-2, -1],
                         normalize=False, progress=False)
    assert torch.equal(seeds.effect_matrix, lists.effect_matrix)
    assert seeds.extra["pair_groups"]["groups"] == 2 and seeds.extra["pair_groups"][
        "lengths"] == [6, 14]
    # every pair of a group shares the staircase batches; alone, each gives the same values
    alone, unpatched = [], []
    for clean, corrupted, good, bad in TWO_LENGTHS:
        one = sae_patching(lm, sae, clean, corrupted, correct=good, incorrect=bad,
                           features=feats, positions=[-2, -1], normalize=False, progress=False)
        alone.append(one.effect_matrix)
        unpatched.append([one.unpatched_metric])
    # raw metric values, so the effect is the change from each pair's unpatched run. Observed
    # ratio 1.3e-6 (|diff| 5.7e-7 on changes up to 0.43): a pair's staircase batches hold other
    # rows in its group than alone, so the CPU matmul blocks them differently; 1e-5 is 7.5x that.
    # 4 of the 20 cells move >= 100x the tolerance (pair 2's features do not move it at all)
    assert_matches_reference(seeds.per_pair, torch.stack(alone), torch.tensor(unpatched),
                             rtol=1e-5, min_cells=4, what="pairs in their group vs alone")
    a_seeds = sae_attribution(lm, sae, SeedStyleTask(lm), features=feats, progress=False)
    a_lists = sae_attribution(lm, sae, d["clean"], d["corrupted"], correct=d["correct"],
                              incorrect=d["incorrect"], features=feats, progress=False)
    assert torch.equal(a_seeds.effect_matrix, a_lists.effect_matrix)
    assert a_seeds.extra["reference"] == a_lists.extra["reference"]


class Killed(Exception):
    """A simulated kill (raised from a progress callback)."""


def kill_after(cells: int) -> Callable[[int, int], None]:
    """A progress callback that 'kills' the run once more than ``cells`` cells are done."""

    def progress(done: int, total: int) -> None:
        if done > cells:
            raise Killed

    return progress


@pytest.mark.parametrize("method", ["sae_patching", "sae_attribution"])
def test_a_killed_run_resumes_from_its_checkpoint_with_identical_numbers(lm, tmp_path, method,
                                                                         one_thread):
    sae = tiny_sae()
    d = two_lengths()
    run = sae_patching if method == "sae_patching" else sae_attribution
    kw = dict(correct=d["correct"], incorrect=d["incorrect"], features=list(range(40)))
    per_pair = 40 + 3 if method == "sae_patching" else 40 + 2  # feature cells + references
    ckpt = tmp_path / "run.json"
    with pytest.raises(Killed):  # killed during the second group (the pairs of length 6)
        run(lm, sae, d["clean"], d["corrupted"], checkpoint=ckpt,
            progress=kill_after(2 * per_pair), **kw)
    saved = json.loads(ckpt.read_text())["cells"]
    assert sorted(saved) == ["0", "1"] and all(len(saved[p]) == per_pair for p in saved)
    seen: list[int] = []
    resumed = run(lm, sae, d["clean"], d["corrupted"], checkpoint=ckpt,
                  progress=lambda done, total: seen.append(done), **kw)
    assert seen[0] == 2 * per_pair  # the first group came from the checkpoint, all at once
    fresh = run(lm, sae, d["clean"], d["corrupted"], checkpoint=tmp_path / "fresh.json",
                progress=False, **kw)
    assert torch.equal(resumed.effect_matrix, fresh.effect_matrix)
    assert torch.equal(resumed.per_pair, fresh.per_pair)
    assert resumed.extra["reference"] == fresh.extra["reference"]
    plain = run(lm, sae, d["clean"], d["corrupted"], progress=False, **kw)
    # observed bitwise 0: the same cells in the same batches, and the checkpoint's JSON keeps
    # every float32 exactly
    assert_within(resumed.effect_matrix, plain.effect_matrix, 0.0, f"{method} resumed vs plain")
    # the checkpoint knows the SAE: another one (or other weights) is refused
    other = tiny_sae(seed=2)
    with pytest.raises(CheckpointMismatchError):
        run(lm, other, d["clean"], d["corrupted"], checkpoint=ckpt, progress=False, **kw)
    changed = tiny_sae()
    with torch.no_grad():
        changed.W_dec[5, 7] += 0.5
    with pytest.raises(CheckpointMismatchError):
        run(lm, changed, d["clean"], d["corrupted"], checkpoint=ckpt, progress=False, **kw)


class InProcessExecutor:
    """The executor protocol without a cluster: the method's evaluator factory is serialised as
    for Ray workers (``executors.dumps_factory``, which refuses a captured model), rebuilt, and
    every task's cells are evaluated in two shards, as when Ray splits a group's cells."""

    def __init__(self) -> None:
        self.sweeps: list[str] = []

    def run(self, model: Any, build: Any, tasks: Any, on_result: Any,
            label: str = "patching") -> dict[str, Any]:
        from ray import cloudpickle

        from causalpatch.executors import dumps_factory

        stats: dict[str, Any] = {}
        evaluate = cloudpickle.loads(dumps_factory(build))(model, stats)
        for group, cells in tasks:
            half = len(cells) // 2
            for part in ([cells[:half], cells[half:]] if half else [cells]):
                on_result(group, part, evaluate(group, part, None))
        self.sweeps.append(label)
        return {"stats": [stats], "shards": len(tasks)}


def test_the_executor_path_is_wired(lm, monkeypatch, one_thread):
    import ray  # noqa: F401 - installed by `make test`; the factory goes through its cloudpickle
    monkeypatch.setattr("causalpatch.options.resolve_executor", lambda executor, model: executor)
    sae = tiny_sae()
    d = two_lengths()
    kw = dict(correct=d["correct"], incorrect=d["incorrect"], progress=False)
    ex = InProcessExecutor()
    local = sae_patching(lm, sae, d["clean"], d["corrupted"], top_k=6, **kw)
    remote = sae_patching(lm, sae, d["clean"], d["corrupted"], top_k=6, executor=ex, **kw)
    assert ex.sweeps == ["SAE attribution", "SAE features"]  # top_k's estimate, then the sweep
    assert remote.labels == local.labels
    # observed ratio 1.4e-7 (|diff| 2.4e-7 on effects up to 1.76), all 6 cells far above the
    # tolerance: the executor splits a group's cells into two shards, so batches hold other rows
    # than locally and the CPU matmul blocks them differently; 1e-6 is 7.4x that
    assert_matches_reference(remote.effect_matrix, local.effect_matrix, 0.0, rtol=1e-6,
                             min_cells=6, what="executor vs local")
    assert remote.extra["noop_cells"] == local.extra["noop_cells"]
    # observed 2.4e-7 on a value of 1.0, for the same reason; 2e-6 is 8.4x that
    assert_within(remote.extra["reference"]["site"], local.extra["reference"]["site"], 2e-6,
                  "reference: the whole site")
    ex.sweeps.clear()
    local = sae_attribution(lm, sae, d["clean"], d["corrupted"], verify_top_k=3, **kw)
    remote = sae_attribution(lm, sae, d["clean"], d["corrupted"], verify_top_k=3, executor=ex,
                             **kw)
    assert ex.sweeps == ["SAE attribution", "verifying"]
    assert torch.equal(remote.effect_matrix, local.effect_matrix)
    assert [v["index"] for v in remote.extra["verified"]] == [
        v["index"] for v in local.extra["verified"]]
    # observed 6.0e-7 (sharded batches, as above); 5e-6 is 8.4x that
    assert_within([v["exact"] for v in remote.extra["verified"]],
                  [v["exact"] for v in local.extra["verified"]], 5e-6, "verified cells")
