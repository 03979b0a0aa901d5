"""``blocks.L.attn.pattern``: the model's own attention weights ``[batch, head, query, key]``,
read-only, on every adapter family (issue 26)."""

from __future__ import annotations

import copy

import matplotlib
import pytest
import torch

import causalpatch.interventions as iv
from causalpatch.errors import InvalidArgumentError
from causalpatch.names import hook_name_for_site, site_name_for_hook_name

matplotlib.use("Agg")

PROMPTS = ["a b c d e f g h", "a b c"]


def _eager_attentions(lm, batch):
    ref = copy.deepcopy(lm.hf_model)
    ref.set_attn_implementation("eager")
    mask = batch.attention_mask if batch.padded else None
    with torch.no_grad():
        return ref(batch.input_ids, attention_mask=mask, output_attentions=True).attentions


def test_pattern_equals_the_models_eager_attention_weights(tiny_lm):
    implementation = tiny_lm.config._attn_implementation
    names = [f"blocks.{layer}.attn.pattern" for layer in range(tiny_lm.n_layers)]
    with tiny_lm.trace(PROMPTS, cache=names) as tr:
        pass
    expected = _eager_attentions(tiny_lm, tr.batch)
    lengths = tr.batch.attention_mask.sum(-1).tolist()
    for layer, name in enumerate(names):
        got = tr.cache[name]
        assert got.shape == (2, tiny_lm.n_heads, tr.batch.input_ids.shape[1],
                             tr.batch.input_ids.shape[1])
        for row, n in enumerate(lengths):  # padded queries hold whatever the model computed
            torch.testing.assert_close(got[row, :, :n], expected[layer][row, :, :n],
                                       rtol=0, atol=1e-5)
        torch.testing.assert_close(got[:, :, :lengths[1]].sum(-1),
                                   torch.ones_like(got[:, :, :lengths[1], 0]))
    # the user's model is left as it was: no hook, same config and attention implementation
    assert tiny_lm.hook_snapshot() == {}
    assert tiny_lm.config._attn_implementation == implementation
    for module in tiny_lm.hf_model.modules():
        if hasattr(module, "config") and hasattr(module, "layer_idx"):
            assert module.config is tiny_lm.config


def test_pattern_reflects_interventions_and_leaves_logits_unchanged(tiny_lm):
    plain, _ = tiny_lm.run_with_cache(PROMPTS[0], names=[])
    logits, cache = tiny_lm.run_with_cache(PROMPTS[0], names=["blocks.1.attn.pattern"])
    torch.testing.assert_close(logits, plain, rtol=0, atol=0)  # reading patterns changes nothing
    _, zeroed = tiny_lm.run_with_cache(PROMPTS[0], names=["blocks.1.attn.pattern"],
                                       interventions={"blocks.1.attn.q": iv.zero()})
    uniform = zeroed["blocks.1.attn.pattern"][0, :, -1]  # [head, key]: equal over its keys
    seen = uniform > 0
    torch.testing.assert_close(uniform[seen], (1.0 / seen.sum(-1, keepdim=True)).expand_as(
        uniform)[seen])
    assert not torch.allclose(cache["blocks.1.attn.pattern"][0, :, -1], uniform)


def test_transformer_lens_names_and_seed_reads(tiny_lm):
    assert site_name_for_hook_name("blocks.3.attn.hook_pattern") == "blocks.3.attn.pattern"
    assert hook_name_for_site("blocks.3.attn.pattern") == "blocks.3.attn.hook_pattern"
    _, cache = tiny_lm.run_with_cache(PROMPTS[0], names=["blocks.0.attn.hook_pattern"])
    pattern = cache["blocks.0.attn.pattern"]
    torch.testing.assert_close(cache["blocks.0.hook_pattern"], pattern)
    with tiny_lm.trace(PROMPTS[0]):
        seed = tiny_lm.layers[0].attn.pattern.output.save()
    torch.testing.assert_close(seed, pattern, rtol=0, atol=0)
    pattern_of = tiny_lm.attention_pattern(PROMPTS[0], layer=0, heads=[1, 3])
    torch.testing.assert_close(pattern_of, pattern[0, [1, 3]], rtol=0, atol=0)


def test_pattern_is_read_only(tiny_lm):
    with pytest.raises(InvalidArgumentError, match="read-only.*attn.q"):
        tiny_lm.trace(PROMPTS[0], interventions={"blocks.0.attn.pattern": iv.zero()})
    assert tiny_lm.hook_snapshot() == {}


def test_plot_attention_pattern_returns_a_figure(tiny_lm):
    from matplotlib.figure import Figure

    from causalpatch.render import plot_attention_pattern

    fig = plot_attention_pattern(tiny_lm, PROMPTS[0], layer=1, heads=[0, 2])
    assert isinstance(fig, Figure)
    assert len([ax for ax in fig.axes if ax.images]) == 2
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == tiny_lm.to_str_tokens(PROMPTS[0])


def test_sweeping_the_pattern_is_refused_before_any_forward(tiny_lm, monkeypatch):
    from causalpatch import activation_patching
    from causalpatch.errors import InvalidArgumentError

    def no_forward(*args, **kwargs):
        raise AssertionError("a forward pass ran before the component was checked")

    monkeypatch.setattr(type(tiny_lm.hf_model), "forward", no_forward)
    with pytest.raises(InvalidArgumentError, match="read-only"):
        activation_patching(tiny_lm, "When Mary and John", "When John and Mary",
                            component="attn.pattern", correct=" Mary", incorrect=" John")
