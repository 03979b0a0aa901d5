"""A sweep that checkpoints, run as a separate process by test_checkpoint.py (and killed).

Usage: python ckpt_worker.py CHECKPOINT_PATH [SLEEP_PER_CELL]
"""

from __future__ import annotations

import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from causalpatch import InterpretableModel, activation_patching

CLEAN = [5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49]
CORRUPTED = [5, 9, 13, 17, 22, 25, 29, 33, 37, 41, 45, 49]


class IdTokenizer:
    """Token ids in, token ids out: enough for prompts given as id lists."""

    pad_token_id = 0
    eos_token_id = 0

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"t{i}" for i in ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [int(t[1:]) for t in text.split()]

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}


def tiny_model() -> InterpretableModel:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    return InterpretableModel(LlamaForCausalLM(config).eval(), tokenizer=IdTokenizer())


def sweep(model: InterpretableModel, checkpoint: str | None, sleep: float = 0.0, **kw):
    def slow(done: int, total: int) -> None:
        time.sleep(sleep)

    return activation_patching(model, [CLEAN], [CORRUPTED], component="attn_head",
                               by_position=True, correct=3, incorrect=4, batch_size=2,
                               checkpoint=checkpoint, progress=slow if sleep else False, **kw)


if __name__ == "__main__":
    sweep(tiny_model(), sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
