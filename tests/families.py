"""Tiny randomly initialised models of every supported family (fixed seed), for fast tests."""

from __future__ import annotations

import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel,
                          GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

from causalpatch import InterpretableModel


class CharTokenizer:
    """Characters to ids 5..94 (no special tokens): enough for string prompts offline."""

    pad_token_id = 0
    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [(ord(c) % 90) + 5 for c in text]

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=4, max_position_embeddings=64)
CONFIGS = {
    "gpt2": (GPT2LMHeadModel, lambda: GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=4,
                                                 n_positions=64, bos_token_id=1, eos_token_id=2)),
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(**SMALL, num_key_value_heads=2)),
    "mistral": (MistralForCausalLM, lambda: MistralConfig(**SMALL, num_key_value_heads=2)),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**SMALL, num_key_value_heads=2)),
    "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=8)),
    "gemma3": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(
        **SMALL, num_key_value_heads=2, head_dim=8, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "neox-parallel": (GPTNeoXForCausalLM, lambda: GPTNeoXConfig(**SMALL, use_parallel_residual=True)),
    "neox": (GPTNeoXForCausalLM, lambda: GPTNeoXConfig(**SMALL, use_parallel_residual=False)),
}
FAMILIES = list(CONFIGS)


def tiny(family: str, dtype: torch.dtype = torch.float32) -> InterpretableModel:
    """A tiny model of ``family`` with fixed random weights."""
    cls, config = CONFIGS[family]
    torch.manual_seed(0)
    model = cls(config()).eval().to(dtype)
    return InterpretableModel(model, tokenizer=CharTokenizer())
