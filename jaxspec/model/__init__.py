"""Llama-family decoder (Llama 2/3, SmolLM2, Qwen2, Mistral): pure functions over params."""

from jaxspec.model.params import (
    LOGICAL_AXES,
    LayerParams,
    LayerWeights,
    Params,
    init_params,
    input_major,
    is_output_major,
    is_unrolled,
    k_slot_last_for,
    output_major,
    param_shapes,
    stacked,
    unrolled,
)
from jaxspec.model.transformer import causal_mask, forward, forward_hidden, lm_head

__all__ = [
    "LOGICAL_AXES",
    "LayerParams",
    "LayerWeights",
    "Params",
    "causal_mask",
    "forward",
    "forward_hidden",
    "init_params",
    "input_major",
    "is_output_major",
    "is_unrolled",
    "k_slot_last_for",
    "lm_head",
    "param_shapes",
    "output_major",
    "stacked",
    "unrolled",
]
