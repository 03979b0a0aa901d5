"""Writes to traced values inside ``with model.trace(...)`` (issue 26): each either takes effect
exactly as the equivalent intervention, or raises an error naming the supported forms.

The same through nnsight's spelling of the Hugging Face module tree
(``model.transformer.h[i].output[0]``, ``model.model.layers[i]...``, ``lm_head.output``,
``o_proj.input[0][0]``) on every family: reads equal plain PyTorch hooks on the hand-written
paths of ``conftest.REFERENCE``, writes equal the equivalent intervention bit for bit."""

from __future__ import annotations

import pytest
import torch

import causalpatch.interventions as iv
from causalpatch.errors import InvalidArgumentError
from conftest import REFERENCE, capture_modules

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


# -- nnsight's module tree: model.transformer.h[i] / model.model.layers[i] ---------------------
#: The unembedding module, written out by hand: ``lm_head`` in every family's modelling code
#: of the pinned ``transformers`` (GPT-NeoX's ``embed_out`` was renamed).
UNEMBED = "lm_head"


def _walk(lm, path, layer=LAYER):
    """``model.<a>.<b>[layer].<c>`` for the hand-written path ``a.b.{L}.c``."""
    node = lm
    for part in path.split("."):
        node = node[layer] if part == "{L}" else getattr(node, part)
    return node


def _ids(lm, prompt):
    return lm.to_tokens(prompt)


def test_module_tree_reads_are_the_modules_values(tiny_lm, tiny_family):
    ref = REFERENCE[tiny_family]
    layer_path = ref.sites["resid_post"][0]
    attn_kind = "attn.raw" if "attn.raw" in ref.sites else "attn"
    unembed = UNEMBED
    wanted = {"layer": (layer_path.format(L=LAYER), "out"),
              "attn": (ref.sites[attn_kind][0].format(L=LAYER), "out"),
              "o_proj_in": (ref.o_proj.format(L=LAYER), "in"), "unembed": (unembed, "out")}
    expected = capture_modules(tiny_lm.hf_model, _ids(tiny_lm, CORRUPT), wanted)
    stack = _walk(tiny_lm, layer_path.rsplit(".{L}", 1)[0] + ".{L}")
    n_layers = len(_walk(tiny_lm, layer_path.rsplit(".{L}", 1)[0]))
    with tiny_lm.trace(CORRUPT) as tr:
        hidden = stack.output[0].save()
        attn = _walk(tiny_lm, ref.sites[attn_kind][0]).output[0].save()
        o_in = _walk(tiny_lm, ref.o_proj).input[0][0].save()
        logits = getattr(tiny_lm, unembed).output.save()
    assert n_layers == tiny_lm.n_layers
    for name, got in (("layer", hidden), ("attn", attn), ("o_proj_in", o_in),
                      ("unembed", logits)):
        torch.testing.assert_close(got, expected[name], rtol=0, atol=0, msg=name)
    if tiny_family not in ("gemma2", "gemma3_text"):  # their logits are soft-capped after it
        torch.testing.assert_close(logits, tr.logits, rtol=0, atol=0)
    assert tiny_lm.hook_snapshot() == {}


def test_module_tree_writes_equal_the_interventions(tiny_lm, tiny_family):
    ref = REFERENCE[tiny_family]
    layer = _walk(tiny_lm, ref.sites["resid_post"][0])
    o_proj = _walk(tiny_lm, ref.o_proj)
    with tiny_lm.trace(CLEAN):
        clean = layer.output[0].save().clone()
        clean_z = o_proj.input[0][0].save().clone()
    p, head, d_head = 6, 1, tiny_lm.d_head  # position 6: where the prompts differ
    cases = [
        (lambda: layer.output[0].__setitem__(slice(None), clean),
         {f"layers.{LAYER}": iv.replace_with(clean)}),
        (lambda: layer.output[0].__setitem__((slice(None), p, slice(None)), clean[:, p, :]),
         {f"layers.{LAYER}": _set((slice(None), p), clean[:, p])}),
        (lambda: setattr(layer, "output", (clean,)), {f"layers.{LAYER}": iv.replace_with(clean)}),
        (lambda: o_proj.input[0][0].__setitem__(
            (slice(None), slice(None), slice(head * d_head, (head + 1) * d_head)),
            clean_z[:, :, head * d_head:(head + 1) * d_head]),
         {f"blocks.{LAYER}.attn.z": iv.replace_with(
             clean_z.view(*clean_z.shape[:2], -1, d_head), heads=[head])}),
    ]
    base = _logits_with(tiny_lm, {})
    for i, (write, interventions) in enumerate(cases):
        expected = _logits_with(tiny_lm, interventions)
        assert not torch.allclose(expected, base), i
        with tiny_lm.trace(CORRUPT) as tr:
            write()
        torch.testing.assert_close(tr.logits, expected, rtol=0, atol=0, msg=f"case {i}")
    assert tiny_lm.hook_snapshot() == {}


def test_module_tree_refusals_name_the_supported_form(tiny_lm, tiny_family):
    ref = REFERENCE[tiny_family]
    layer = _walk(tiny_lm, ref.sites["resid_post"][0])
    with tiny_lm.trace(CORRUPT) as tr:
        with pytest.raises(InvalidArgumentError, match=r"tuple.*\[0\]\[:, 2\] = x"):
            layer.output[:, 2] = 0.0
        with pytest.raises(InvalidArgumentError, match=r"tuple.*\[0\]\[:\] = x"):
            layer.output[0] = 0.0
        with pytest.raises(InvalidArgumentError, match="would change nothing"):
            layer.foo = 1
        with pytest.raises(InvalidArgumentError, match="only the first"):
            layer.output = (torch.zeros(1), torch.zeros(1))
        o_proj_input = _walk(tiny_lm, ref.o_proj).input
        with pytest.raises(InvalidArgumentError, match="only the first positional"):
            o_proj_input[1]["x"] = 1.0
        with pytest.raises(InvalidArgumentError, match=r"tuple.*\[0\]\[:\] = x"):
            o_proj_input[0][0] = 1.0
    torch.testing.assert_close(tr.logits, _logits_with(tiny_lm, {}), rtol=0, atol=0)
    with pytest.raises(InvalidArgumentError, match="trace"):
        layer.output
    with pytest.raises(AttributeError):
        tiny_lm.no_such_module
    assert tiny_lm.hook_snapshot() == {}


# -- in-place operations: nnsight's proxies change the model's own activation ------------------
def _shifted(fn):
    """An intervention applying ``fn`` to a copy of the activation."""
    def apply(act):
        out = act.clone()
        fn(out)
        return out
    return apply


def test_in_place_operations_are_writes(tiny_lm, tiny_family):
    """``value.add_(x)``, ``.mul_``, ``.zero_()``, ``.copy_(x)``, ``.clamp_``, ``s += x`` on a saved
    handle, an in-place op on a view (``output[0][:, p].add_``) and on nnsight's module tree each
    equal the equivalent intervention bit for bit."""
    clean = _clean_hidden(tiny_lm)
    p = 4
    site = f"layers.{LAYER}"

    def iadd_saved(v):
        s = v.save()
        s += clean

    cases = {
        "add_": (lambda v: v.add_(1.0), _shifted(lambda a: a.add_(1.0))),
        "mul_": (lambda v: v.mul_(2.0), _shifted(lambda a: a.mul_(2.0))),
        "zero_": (lambda v: v.zero_(), iv.zero()),
        "copy_": (lambda v: v.copy_(clean), iv.replace_with(clean)),
        "clamp_": (lambda v: v.clamp_(min=0.0), _shifted(lambda a: a.clamp_(min=0.0))),
        "s += x": (iadd_saved, _shifted(lambda a: a.add_(clean))),
        "view add_": (lambda v: v[0][:, p].add_(1.0), _shifted(lambda a: a[0][:, p].add_(1.0))),
    }
    base = _logits_with(tiny_lm, {})
    for what, (op, intervention) in cases.items():
        expected = _logits_with(tiny_lm, {site: intervention})
        assert not torch.equal(expected, base), what
        with tiny_lm.trace(CORRUPT) as tr:
            op(tiny_lm.layers[LAYER].output)
        torch.testing.assert_close(tr.logits, expected, rtol=0, atol=0, msg=what)
    # nnsight's spelling: the decoder layer's output tuple, element 0
    layer = _walk(tiny_lm, REFERENCE[tiny_family].sites["resid_post"][0])
    with tiny_lm.trace(CORRUPT) as tr:
        layer.output[0].mul_(2.0)
    torch.testing.assert_close(tr.logits, _logits_with(tiny_lm, {site: cases["mul_"][1]}),
                               rtol=0, atol=0)
    assert tiny_lm.hook_snapshot() == {}


def test_in_place_refusals_and_after_the_block(tiny_lm):
    with tiny_lm.trace(CORRUPT) as tr:
        with pytest.raises(InvalidArgumentError, match="changes the shape.*output\\[:\\] = x"):
            tiny_lm.layers[LAYER].output.unsqueeze_(0)
        with pytest.raises(InvalidArgumentError, match="cannot be written"):
            tiny_lm.output.add_(1.0)
        with pytest.raises(InvalidArgumentError, match="read-only"):
            tiny_lm.layers[0].attn.pattern.output.zero_()
        kept = tiny_lm.layers[LAYER].output.save()
    base = _logits_with(tiny_lm, {})
    torch.testing.assert_close(tr.logits, base, rtol=0, atol=0)  # nothing refused took effect
    before = kept.clone()
    kept.add_(1.0)  # after the block: a plain tensor, changed locally only
    torch.testing.assert_close(kept, before + 1.0, rtol=0, atol=0)
    torch.testing.assert_close(tr.logits, base, rtol=0, atol=0)
    assert tiny_lm.hook_snapshot() == {}


def test_cache_entries_inside_the_block_are_writable_values(tiny_lm):
    """``tr.cache[name]`` (and ``.get``, any spelling) inside the block is the same writable value
    as ``tr.value(name)``; outside a block the cache is a plain record."""
    clean = _clean_hidden(tiny_lm)
    site = f"layers.{LAYER}"
    with tiny_lm.trace(CORRUPT, cache=[site]) as tr:
        tr.cache[site][:] = clean
    torch.testing.assert_close(tr.logits, _logits_with(tiny_lm, {site: iv.replace_with(clean)}),
                               rtol=0, atol=0)
    with tiny_lm.trace(CORRUPT, cache=[f"blocks.{LAYER}.resid_post"]) as tr:
        tr.cache.get(site).zero_()
    zeroed = _logits_with(tiny_lm, {site: iv.zero()})
    assert not torch.equal(zeroed, _logits_with(tiny_lm, {}))
    torch.testing.assert_close(tr.logits, zeroed, rtol=0, atol=0)
    with tiny_lm.trace(CORRUPT, cache=["blocks.0.attn.pattern"]) as tr:
        with pytest.raises(InvalidArgumentError, match="read-only"):
            tr.cache["blocks.0.attn.pattern"][:] = 0.0
    _, cache = tiny_lm.run_with_cache(CORRUPT, names=[site])
    assert type(cache[site]) is torch.Tensor  # a record, outside any block
    assert tiny_lm.hook_snapshot() == {}
