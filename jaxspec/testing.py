"""Tiny jaxspec-native models for tests and examples (no checkpoint needed)."""

from __future__ import annotations

import jax

from jaxspec.config import ModelConfig
from jaxspec.model import init_params

TINY = ModelConfig(
    arch="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=512,
    eos_token_ids=(3,),
)


def tiny_model(seed: int = 0, cfg: ModelConfig = TINY, scale: float = 0.5):
    """(cfg, params) of a random tiny model whose greedy outputs are not degenerate."""
    return cfg, init_params(cfg, jax.random.key(seed), scale=scale)
