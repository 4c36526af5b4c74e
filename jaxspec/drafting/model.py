"""Model drafts: a separate checkpoint or a layer-skip self-draft of the target."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxspec.config import ModelConfig
from jaxspec.errors import ConfigError
from jaxspec.model.params import Params


@dataclasses.dataclass(frozen=True)
class ModelDraft:
    """A draft model: its static config (params travel separately, as arrays)."""

    cfg: ModelConfig


def layer_skip(
    params: Params, cfg: ModelConfig, keep: tuple[int, ...]
) -> tuple[ModelConfig, Params]:
    """A training-free self-draft: the target's embedding, the layers in `keep` (in order), its
    final norm and head. Returns (draft config, draft params); the params share no buffers with
    the target's stacked layers (a gather), the embedding/head are shared."""
    keep = tuple(int(i) for i in keep)
    in_range = all(0 <= i < cfg.num_layers for i in keep)
    if not keep or not in_range or list(keep) != sorted(set(keep)):
        raise ConfigError(
            f"layer-skip layers must be distinct, increasing and in [0, {cfg.num_layers}); "
            f"got {keep}"
        )
    idx = jnp.asarray(keep)
    layers = jax.tree_util.tree_map(lambda x: x[idx], params.layers)  # None leaves stay None
    return dataclasses.replace(cfg, num_layers=len(keep)), params.replace(layers=layers)


def default_skip_layers(L: int) -> tuple[int, ...]:
    """Default layer-skip draft: drop a contiguous band of round(L/6) layers starting at L/2 (the
    best-scoring candidate of `scripts/search_layerskip.py` for SmolLM2: layers 15-19 of 30)."""
    width = max(1, round(L / 6)) if L > 1 else 0
    return tuple(i for i in range(L) if not L // 2 <= i < L // 2 + width) or (0,)
