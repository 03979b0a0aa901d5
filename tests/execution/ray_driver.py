"""A Ray driver run as its own process by test_distributed.py (and killed there), on the tiny
model saved by ``conftest.save_tiny_llama`` and the pairs ``conftest.IOI_PAIRS``.

Usage: python ray_driver.py MODEL_DIR ADDRESS CHECKPOINT OUT_JSON [SLEEP_PER_SHARD]

Runs an 8-pair ``attn_head`` sweep on the cluster at ADDRESS with a checkpoint, sleeping on
the driver after each shard (so a test can kill it mid-sweep), and writes the effect matrix
and the number of cells the workers computed to OUT_JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

def main(argv: list[str]) -> None:
    import torch
    from conftest import IOI_PAIRS  # first: importing conftest sets 2 torch threads

    torch.set_num_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from causalpatch import InterpretableModel, activation_patching
    from causalpatch.executors import RayExecutor

    model_dir, address, checkpoint, out = argv[:4]
    sleep = float(argv[4]) if len(argv) > 4 else 0.0
    model = InterpretableModel(model_dir)
    rows = IOI_PAIRS[:8]
    clean, corrupted = [r[0] for r in rows], [r[1] for r in rows]
    correct, incorrect = [r[2] for r in rows], [r[3] for r in rows]
    n_cells = model.n_layers * model.n_heads
    seen = [0]

    def slow(done: int, total: int) -> None:  # called on the driver as each shard lands
        if sleep and done // n_cells > seen[0]:
            seen[0] = done // n_cells
            time.sleep(sleep)

    ex = RayExecutor(address=address, num_workers=2, shards_per_worker=4)
    result = activation_patching(model, clean, corrupted, component="attn_head",
                                 correct=correct, incorrect=incorrect, checkpoint=checkpoint,
                                 executor=ex, progress=slow)
    Path(out).write_text(json.dumps({
        "effect": result.effect_matrix.tolist(),
        "cells_computed": result.extra["executor"]["cells"]}))
    ex.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
