"""Writes to traced values inside ``with model.trace(...)`` (issue 26): each either takes effect
exactly as the equivalent intervention, or raises an error naming the supported forms."""

from __future__ import annotations

import pytest
import torch

import causalpatch.interventions as iv
from causalpatch.errors import InvalidArgumentError

CLEAN = "a b c d e f"
CORRUPT = "a b c d b f"
LAYER = 1


def _clean_hidden(lm):
    with lm.trace(CLEAN):
        return lm.layers[LAYER].output.save().clone()


def _logits_with(lm, interventions):
    with lm.trace(CORRUPT, interventions=interventions) as tr:
        pass
    return tr.logits


def _set(index, value):
    def fn(act):
        out = act.clone()
        out[index] = value
        return out
    return fn


def test_slice_write_takes_effect(tiny_lm):
    clean = _clean_hidden(tiny_lm)
    expected = _logits_with(tiny_lm, {f"layers.{LAYER}": iv.replace_with(clean)})
    base = _logits_with(tiny_lm, {})
    with tiny_lm.trace(CORRUPT) as tr:
        tiny_lm.layers[LAYER].output[:] = clean
        inside = tiny_lm.output.save()
    assert not torch.allclose(base, expected)
    torch.testing.assert_close(inside, expected, rtol=0, atol=0)
    torch.testing.assert_close(tr.logits, expected, rtol=0, atol=0)


def test_attribute_assignment_takes_effect(tiny_lm):
    clean = _clean_hidden(tiny_lm)
    expected = _logits_with(tiny_lm, {f"layers.{LAYER}": iv.replace_with(clean)})
    with tiny_lm.trace(CORRUPT) as tr:
        tiny_lm.layers[LAYER].output = clean
    torch.testing.assert_close(tr.logits, expected, rtol=0, atol=0)


def test_chained_view_write_takes_effect(tiny_lm):
    clean = _clean_hidden(tiny_lm)
    p = 4
    # output[0] is row 0 of [batch, pos, d_model]; [:, p] its hidden column p (torch indexing,
    # as nnsight on a decoder layer that returns a tensor); [p] is position p
    expected_col = _logits_with(tiny_lm, {f"layers.{LAYER}": _set((0, slice(None), p),
                                                                   clean[0, :, p])})
    expected_pos = _logits_with(tiny_lm, {f"layers.{LAYER}": _set((0, p), clean[0, p])})
    with tiny_lm.trace(CORRUPT) as tr:
        tiny_lm.layers[LAYER].output[0][:, p] = clean[0, :, p]
    torch.testing.assert_close(tr.logits, expected_col, rtol=0, atol=0)
    with tiny_lm.trace(CORRUPT) as tr:
        tiny_lm.layers[LAYER].output[0][p] = clean[0, p]
    torch.testing.assert_close(tr.logits, expected_pos, rtol=0, atol=0)
    with tiny_lm.trace(CORRUPT) as tr:
        tiny_lm.layers[LAYER].output[:, p] = clean[:, p]
    torch.testing.assert_close(tr.logits, expected_pos, rtol=0, atol=0)


def test_writes_compose_with_interventions_and_reads(tiny_lm):
    clean = _clean_hidden(tiny_lm)
    ivs = {"blocks.0.mlp": iv.scale(0.5)}
    expected = _logits_with(tiny_lm, {**ivs, "blocks.0.attn": iv.zero(positions=[2]),
                                      f"layers.{LAYER}.input": iv.replace_with(clean)})
    with tiny_lm.trace(CORRUPT, interventions=ivs, cache=["blocks.2.resid_post"]) as tr:
        tiny_lm.layers[0].attn.output[:, 2] = 0.0
        tiny_lm.layers[LAYER].input[:] = clean
        read = tiny_lm.layers[LAYER].input.save()
        last = tr.cache["blocks.2.resid_post"]
    torch.testing.assert_close(read, clean, rtol=0, atol=0)
    torch.testing.assert_close(tr.logits, expected, rtol=0, atol=0)
    with tiny_lm.trace(CORRUPT, interventions={**ivs, "blocks.0.attn": iv.zero(positions=[2]),
                                               f"layers.{LAYER}.input": iv.replace_with(clean)},
                       cache=["blocks.2.resid_post"]) as ref:
        pass
    torch.testing.assert_close(last, ref.cache["blocks.2.resid_post"], rtol=0, atol=0)


def test_saved_handle_write_and_per_head_write(tiny_lm):
    with tiny_lm.trace(CORRUPT) as tr:
        z = tiny_lm.layers[0].attn.z.output.save()
        z[:, -1, 1] = 0.0
    expected = _logits_with(tiny_lm, {"blocks.0.attn.z": iv.zero(heads=[1], positions=[-1])})
    torch.testing.assert_close(tr.logits, expected, rtol=0, atol=0)


def test_refused_writes_name_the_supported_forms(tiny_lm):
    clean = _clean_hidden(tiny_lm)
    with tiny_lm.trace(CORRUPT) as tr:
        with pytest.raises(InvalidArgumentError, match="cannot be written.*output\\[:\\] = x"):
            tiny_lm.output[:] = 0.0
        with pytest.raises(InvalidArgumentError, match="cannot be written"):
            tiny_lm.output = clean
        with pytest.raises(InvalidArgumentError, match="cannot be written"):
            tr.output[:, -1] = 0.0
        with pytest.raises(InvalidArgumentError, match="is a copy.*one step"):
            tiny_lm.layers[LAYER].output[[0]][:] = clean
        with pytest.raises(InvalidArgumentError, match="would change nothing.*output\\[:\\]"):
            tiny_lm.layers[LAYER].mlp = None
        with pytest.raises(InvalidArgumentError, match="cannot be assigned.*output\\[:\\]"):
            tr.cache[f"layers.{LAYER}"] = clean
        with pytest.raises(InvalidArgumentError, match="cannot write.*Supported"):
            tiny_lm.layers[LAYER].output[:] = torch.zeros(3, 5)
        with pytest.raises(InvalidArgumentError, match="read-only"):
            tiny_lm.layers[0].attn.pattern.output[:] = 0.0
    base = _logits_with(tiny_lm, {})
    torch.testing.assert_close(tr.logits, base, rtol=0, atol=0)  # nothing refused took effect
    with pytest.raises(InvalidArgumentError, match="trace"):
        tiny_lm.layers[LAYER].output = clean
    assert tiny_lm.hook_snapshot() == {}
