"""Tiny randomly initialised models for unit tests (no hub, built in milliseconds)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    """A 4-layer, 64-wide Llama with a 256-token vocab, in eval mode."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()
