"""SAE training checkpoints (``train_sae(..., checkpoint=...)``): a run interrupted after an
epoch and continued from its checkpoint ends with bitwise the SAE and report of an
uninterrupted run without a checkpoint (the reference); the continued run collects no
activations again; a checkpoint of a run with other settings is refused, naming the settings,
before any forward pass; only JSON and safetensors files are written.

The interrupt is an exception raised from ``progress`` (called once an epoch's state is
saved), as the CLI's signal handler raises ``KeyboardInterrupt`` (the real signals are in
``tests/cli/test_cli_signals.py``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import causalpatch.sae.train as sae_train
from causalpatch.errors import CheckpointMismatchError, CorruptResultError, InvalidArgumentError
from causalpatch.sae.checkpoint import checkpoint_status, sibling
from causalpatch.sae.train import train_sae, training_texts

SITE = "blocks.1.resid_post"
#: Small and cheap: 3 epochs of a few steps each on a tiny LLaMA.
SETTINGS: dict[str, Any] = dict(k=4, train_tokens=1500, eval_tokens=200, context=32,
                                epochs=3, batch_tokens=128)


class Stop(Exception):
    """The simulated interrupt."""


@pytest.fixture(scope="module")
def docs() -> list[tuple[str, str]]:
    return list(training_texts(("known_facts",)))[:200]


@pytest.fixture
def lm(make_tiny_lm):
    torch.manual_seed(0)
    return make_tiny_lm("llama")


def _count_forwards(model: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = model.runtime.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(model.runtime, "forward", forward)
    return calls


def _stop_after(epoch: int):
    def progress(done: int, total: int) -> None:
        if done == epoch:
            raise Stop(f"after epoch {done} of {total}")

    return progress


#: ``(architecture, features, k, epochs, interrupted after)``. 16 epochs of ~1400 tokens pass
#: the 20,000 tokens after which an unfired latent counts as dead, and 512 features at k=1 leave
#: many unfired (144 in the state at the interrupt), so the AuxK loss and the dead-feature
#: counters are live across the interrupt; the last epoch's firing counts (``log_sparsity``)
#: are accumulated after it.
CASES = [("topk", 48, 4, 3, 1), ("standard", 48, 4, 3, 2), ("topk", 512, 1, 16, 15)]


@pytest.mark.parametrize("architecture,features,k,epochs,stop", CASES)
def test_interrupted_training_continues_to_bitwise_the_uninterrupted_sae(
        lm, docs, tmp_path, monkeypatch, one_thread, architecture, features, k, epochs, stop):
    settings = {**SETTINGS, "epochs": epochs, "k": k}
    reference, ref_report = train_sae(lm, SITE, features, architecture=architecture,
                                      docs=docs, **settings)
    path = tmp_path / "sae.json"
    with pytest.raises(Stop):
        train_sae(lm, SITE, features, architecture=architecture, docs=docs, checkpoint=path,
                  progress=_stop_after(stop), **settings)
    assert checkpoint_status(path)[:3] == (True, stop, epochs)
    at_stop = load_file(sibling(path, "state"))
    if epochs > 3:  # the dead-latent path is exercised after the resume
        assert int((at_stop["since_fired"] > 20_000).sum()) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "sae.activations.safetensors", "sae.json", "sae.state.safetensors"]

    def no_collection(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the continued run collected the activations again")

    monkeypatch.setattr(sae_train, "collect_activations", no_collection)
    seen: list[int] = []
    sae, report = train_sae(lm, SITE, features, architecture=architecture, docs=docs,
                            checkpoint=path, progress=lambda d, t: seen.append(d), **settings)
    assert seen == list(range(stop + 1, epochs + 1))  # finished epochs are not trained again
    assert checkpoint_status(path)[:3] == (True, epochs, epochs)
    # Observed: bitwise equal (the same float32 operations in the same order on the same
    # saved bits); the bound is therefore equality, not a tolerance.
    for name, weight in reference.state_dict().items():
        assert torch.equal(sae.state_dict()[name], weight), name
    assert torch.equal(sae.log_sparsity, reference.log_sparsity)
    ref, got = ref_report.to_dict(), report.to_dict()
    ref.pop("seconds"), got.pop("seconds")
    assert got == ref
    # not vacuous: the epochs after the interrupt changed the weights
    at_end = load_file(sibling(path, "state"))
    assert (at_end["W_dec"] - at_stop["W_dec"]).abs().max() > 1e-3


def test_a_finished_checkpoint_reruns_without_training(lm, docs, tmp_path, monkeypatch,
                                                       one_thread):
    path = tmp_path / "sae.json"
    first, _ = train_sae(lm, SITE, 48, docs=docs, checkpoint=path, **SETTINGS)
    seen: list[int] = []
    again, _ = train_sae(lm, SITE, 48, docs=docs, checkpoint=path,
                         progress=lambda d, t: seen.append(d), **SETTINGS)
    assert seen == []
    assert torch.equal(again.W_enc, first.W_enc) and torch.equal(again.b_dec, first.b_dec)


@pytest.mark.parametrize("change,named", [
    ({"epochs": 4}, "epochs: 3 there, 4 here"),
    ({"lr": 1e-3}, "lr: 0.0004 there, 0.001 here"),
    ({"seed": 1}, "seed: 0 there, 1 here"),
    ({"n_features": 64}, "n_features: 48 there, 64 here"),
    ({"site": "blocks.0.resid_post"}, "site: 'blocks.1.resid_post' there, "
                                      "'blocks.0.resid_post' here"),
])
def test_other_settings_are_refused_before_any_forward(lm, docs, tmp_path, monkeypatch,
                                                       one_thread, change, named):
    path = tmp_path / "sae.json"
    with pytest.raises(Stop):
        train_sae(lm, SITE, 48, docs=docs, checkpoint=path, progress=_stop_after(1),
                  **SETTINGS)
    before = path.read_bytes(), lm.hook_snapshot()
    calls = _count_forwards(lm, monkeypatch)
    args = {"site": SITE, "n_features": 48, **SETTINGS, **change}
    with pytest.raises(CheckpointMismatchError, match="other settings") as err:
        train_sae(lm, docs=docs, checkpoint=path, **args)
    assert named in str(err.value)
    assert calls == [] and (path.read_bytes(), lm.hook_snapshot()) == before


def test_other_texts_are_refused_and_bad_files_are_named(lm, docs, tmp_path, one_thread):
    path = tmp_path / "sae.json"
    with pytest.raises(Stop):
        train_sae(lm, SITE, 48, docs=docs, checkpoint=path, progress=_stop_after(1),
                  **SETTINGS)
    with pytest.raises(CheckpointMismatchError, match="texts: "):
        train_sae(lm, SITE, 48, docs=docs[:150], checkpoint=path, **SETTINGS)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "causalpatch-checkpoint/1"}))
    with pytest.raises(CorruptResultError, match="not an SAE training checkpoint"):
        train_sae(lm, SITE, 48, docs=docs, checkpoint=other, **SETTINGS)
    with pytest.raises(CheckpointMismatchError, match="does not exist"):
        train_sae(lm, SITE, 48, docs=docs, checkpoint=tmp_path / "no" / "sae.json",
                  **SETTINGS)


def test_stale_tensor_files_of_another_run_are_ignored(lm, docs, tmp_path, one_thread):
    """The manifest removed (as ``--no-resume`` or a mismatch discards it) but the tensor
    files left: a new run with other settings ignores them and trains from the start."""
    path = tmp_path / "sae.json"
    with pytest.raises(Stop):
        train_sae(lm, SITE, 48, docs=docs, checkpoint=path, progress=_stop_after(2),
                  **SETTINGS)
    path.unlink()
    seen: list[int] = []
    sae, _ = train_sae(lm, SITE, 48, docs=docs, checkpoint=path,
                       progress=lambda d, t: seen.append(d), **{**SETTINGS, "seed": 5})
    assert seen == [1, 2, 3]
    reference, _ = train_sae(lm, SITE, 48, docs=docs, **{**SETTINGS, "seed": 5})
    assert torch.equal(sae.W_dec, reference.W_dec)


@pytest.mark.parametrize("stop_at", [4, 12])
def test_a_resume_within_an_epoch_is_as_exact(lm, docs, tmp_path, monkeypatch, one_thread,
                                               stop_at):
    """``checkpoint_steps=4``: interrupted right after the save at step ``stop_at`` (within
    the first or the second epoch of ~11 steps), the run continues mid-epoch, reshuffling from
    the saved generator state, to bitwise the uninterrupted SAE."""
    from causalpatch.sae.checkpoint import TrainingCheckpoint

    reference, ref_report = train_sae(lm, SITE, 48, docs=docs, **SETTINGS)
    path = tmp_path / "sae.json"
    real = TrainingCheckpoint.save_state
    saved: list[int] = []

    def save_then_stop(self: Any, state: dict[str, torch.Tensor]) -> None:
        real(self, state)
        saved.append(int(state["step"]))
        if saved[-1] == stop_at:
            raise Stop

    monkeypatch.setattr(TrainingCheckpoint, "save_state", save_then_stop)
    with pytest.raises(Stop):
        train_sae(lm, SITE, 48, docs=docs, checkpoint=path, checkpoint_steps=4, **SETTINGS)
    status = checkpoint_status(path)
    per_epoch = status.steps // 3
    assert status.steps_done == stop_at and stop_at % per_epoch != 0  # within an epoch
    assert status.epochs_done == stop_at // per_epoch
    monkeypatch.setattr(TrainingCheckpoint, "save_state", real)
    sae, report = train_sae(lm, SITE, 48, docs=docs, checkpoint=path, checkpoint_steps=4,
                            **SETTINGS)
    # Observed: bitwise equal, as for a resume at an epoch's end.
    for name, weight in reference.state_dict().items():
        assert torch.equal(sae.state_dict()[name], weight), name
    assert torch.equal(sae.log_sparsity, reference.log_sparsity)
    assert report.explained_variance == ref_report.explained_variance
    assert checkpoint_status(path).steps_done == status.steps


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_checkpoint_steps_is_refused_before_any_forward(lm, docs, tmp_path, monkeypatch,
                                                            bad):
    calls = _count_forwards(lm, monkeypatch)
    with pytest.raises(InvalidArgumentError, match="checkpoint_steps must be a positive int"):
        train_sae(lm, SITE, 48, docs=docs, checkpoint=tmp_path / "s.json",
                  checkpoint_steps=bad, **SETTINGS)
    assert calls == [] and not (tmp_path / "s.json").exists()
