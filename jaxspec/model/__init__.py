"""Llama-family decoder (Llama 2/3, SmolLM2, Qwen2, Mistral): pure functions over params."""

from jaxspec.model.params import (
    LOGICAL_AXES,
    LayerParams,
    Params,
    init_params,
    param_shapes,
)
from jaxspec.model.transformer import causal_mask, forward, forward_hidden, lm_head

__all__ = [
    "LOGICAL_AXES",
    "LayerParams",
    "Params",
    "causal_mask",
    "forward",
    "forward_hidden",
    "init_params",
    "lm_head",
    "param_shapes",
]
