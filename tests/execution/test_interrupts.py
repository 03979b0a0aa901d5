"""Exceptions in user code and Ctrl-C mid-sweep leave the model exactly as it was."""

from __future__ import annotations

import pytest
import torch
from ckpt_worker import CLEAN, CORRUPTED, tiny_model

import causalpatch.interventions as iv
from causalpatch import activation_patching


@pytest.fixture(scope="module")
def guarded():
    model = tiny_model()
    fired: list[int] = []
    user = model.hf_model.get_submodule("model.layers.1.mlp").register_forward_hook(
        lambda module, args, out: fired.append(1))
    ids = torch.tensor([CLEAN])
    with torch.no_grad():
        reference = model.hf_model(input_ids=ids).logits.clone()
    yield model, fired, ids, reference
    user.remove()


def _assert_clean(model, fired, ids, reference, hooks_before):
    assert model.hook_snapshot() == hooks_before
    n = len(fired)
    with torch.no_grad():
        assert torch.equal(model.hf_model(input_ids=ids).logits, reference)
    assert len(fired) == n + 1


def test_exception_inside_an_intervention_function(guarded):
    model, fired, ids, reference = guarded
    before = model.hook_snapshot()

    def broken(act):
        raise RuntimeError("user bug")

    with pytest.raises(RuntimeError, match="user bug"):
        model.trace([CLEAN], interventions={"blocks.2.attn.z": [iv.zero(heads=[0]), broken]},
                    cache=["blocks.0.resid_post"]).run()
    _assert_clean(model, fired, ids, reference, before)


@pytest.mark.parametrize("method", ["fast", "naive"])
def test_keyboard_interrupt_mid_sweep(guarded, method):
    model, fired, ids, reference = guarded
    before = model.hook_snapshot()
    ticks: list[int] = []

    def interrupt(done, total):
        ticks.append(done)
        if done >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        activation_patching(model, [CLEAN], [CORRUPTED], component="attn_head",
                            by_position=True, correct=3, incorrect=4, batch_size=2,
                            engine=method, progress=interrupt)
    assert ticks and ticks[-1] < 4 * 12 * 4  # it stopped part-way
    _assert_clean(model, fired, ids, reference, before)


def test_keyboard_interrupt_inside_a_hook_during_the_staircase(guarded, monkeypatch):
    model, fired, ids, reference = guarded
    before = model.hook_snapshot()
    import causalpatch.engine as engine

    real = engine._Writes.apply
    calls = []

    def apply(self, act):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, act)

    monkeypatch.setattr(engine._Writes, "apply", apply)
    with pytest.raises(KeyboardInterrupt):
        activation_patching(model, [CLEAN], [CORRUPTED], component="attn_head",
                            correct=3, incorrect=4)
    monkeypatch.setattr(engine._Writes, "apply", real)
    _assert_clean(model, fired, ids, reference, before)
