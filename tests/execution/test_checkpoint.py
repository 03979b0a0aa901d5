"""Checkpointed sweeps survive SIGKILL and resume without recomputing finished cells."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ckpt_worker import sweep, tiny_model
from conftest import TESTS_DIR, assert_matches_reference, checkpoint_cells

import causalpatch.assemble as sweep_module
from causalpatch.errors import CheckpointMismatchError, CorruptResultError

WORKER = Path(__file__).with_name("ckpt_worker.py")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_killed_sweep_resumes_without_recomputing(model, tmp_path, monkeypatch):
    ckpt = tmp_path / "sweep.ckpt.json"
    proc = subprocess.Popen([sys.executable, str(WORKER), str(ckpt), "0.05"],
                            env={**os.environ, "PYTHONPATH": str(TESTS_DIR)})
    try:
        deadline = time.time() + 120
        while checkpoint_cells(ckpt) < 6 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = checkpoint_cells(ckpt)
    total = 4 * 12 * 4  # layers x positions x heads
    assert 6 <= done_before < total, "the kill must land mid-sweep"

    computed: list[int] = []
    real = sweep_module.patched_logits_many

    def counting(model_, runs, jobs, *args, **kwargs):
        computed.append(len(jobs))
        return real(model_, runs, jobs, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "patched_logits_many", counting)
    resumed = sweep(model, str(ckpt))
    monkeypatch.setattr(sweep_module, "patched_logits_many", real)
    assert sum(computed) == total - done_before  # nothing finished is recomputed
    fresh = sweep(model, None)
    # resumed cells are read back from JSON (float32 -> text -> float32 round-trips exactly) and
    # the rest run in other batches than the fresh sweep (float32 summation order). Observed 0
    # (bitwise; 100 of 192 normalised effects >= 100x the tolerance); 1e-6 of the largest effect
    # allows a few ulps should the batches split differently elsewhere
    assert_matches_reference(resumed.effect_matrix, fresh.effect_matrix, 0.0, rtol=1e-6,
                             min_cells=50, what="resumed after SIGKILL")
    assert checkpoint_cells(ckpt) == total


def test_checkpoint_from_other_arguments_is_refused(model, tmp_path):
    ckpt = tmp_path / "a.json"
    sweep(model, str(ckpt))
    with pytest.raises(CheckpointMismatchError, match="different sweep"):
        sweep(model, str(ckpt), direction="noise")


def test_checkpoint_from_other_model_is_refused(model, tmp_path):
    ckpt = tmp_path / "b.json"
    sweep(model, str(ckpt))
    other = tiny_model()
    with torch.no_grad():
        other.hf_model.get_submodule("model.embed_tokens").weight.add_(1.0)
    with pytest.raises(CheckpointMismatchError):
        sweep(other, str(ckpt))


def test_corrupt_checkpoint_is_refused(model, tmp_path):
    ckpt = tmp_path / "c.json"
    ckpt.write_text('{"format": "causalpatch-checkpoint/1", "key": ')
    with pytest.raises(CorruptResultError, match="not valid JSON"):
        sweep(model, str(ckpt))
