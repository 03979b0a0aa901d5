"""A sweep that checkpoints, run as a separate process by test_checkpoint.py (and killed).

Usage: python ckpt_worker.py CHECKPOINT_PATH [SLEEP_PER_CELL]
"""

from __future__ import annotations

import sys
import time

from conftest import id_llama

from causalpatch import InterpretableModel, activation_patching

CLEAN = [5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49]
CORRUPTED = [5, 9, 13, 17, 22, 25, 29, 33, 37, 41, 45, 49]


def sweep(model: InterpretableModel, checkpoint: str | None, sleep: float = 0.0, **kw):
    def slow(done: int, total: int) -> None:
        time.sleep(sleep)

    return activation_patching(model, [CLEAN], [CORRUPTED], component="attn_head",
                               by_position=True, correct=3, incorrect=4, batch_size=2,
                               checkpoint=checkpoint, progress=slow if sleep else False, **kw)


def tiny_model() -> InterpretableModel:
    """A seeded 4-layer tiny LLaMA (the same in the worker and in the test)."""
    return id_llama(n_layers=4)


if __name__ == "__main__":
    sweep(tiny_model(), sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
