"""Params pytree of a Llama-family decoder.

Conventions: per-layer weights are stacked on a leading `L` axis (walked with `lax.scan`);
projections are stored input-major so the forward is plain einsums (`x @ w`).
Q, K and V are ONE fused projection grouped by KV head, `wqkv [L, M, K, G + 2, E]`: for KV head
k, slots 0..G-1 are its G query heads (query head h = k * G + g, as in HF GQA), slot G its key and
slot G+1 its value. Gate and up are fused as `w_gate_up [L, M, 2, F]`. Fusing turns five small
matrix-vector products per layer into two larger ones (measured ~20% faster decode on CPU) and
keeps each KV head's weights together, so sharding over `kv_heads` splits them cleanly.
`wo [L, H, E, M]`, `w_down [L, F, M]`. `lm_head` is None when the head is tied to `embed [V, M]`.
The optional q/k/v bias (Qwen2) `bqkv [L, K, G + 2, E]` is None when absent. `LOGICAL_AXES`
names every leaf's axes for sharding.

The output-major layout (`output_major`): the same stacked layers as `LayerWeights`, with the
projections stored output-major (`wqkv [L, K, G + 2, E, M]`, `wo [L, M, H, E]`,
`w_gate_up [L, 2, F, M]`, `w_down [L, M, F]`), so that each weight is the LEFT operand of its dot,
contracted on its minor axis. On XLA:CPU that is the faster form: forwards of 2–16 tokens per
row (speculative verification) ~8–14% faster at batch 1, the one-token step unchanged
(`BENCHMARKS.md`, "Output-major weights"). Checkpoints, conversion, sharding and training use the
input-major `LayerParams`; the runner converts for single-device CPU decoding.

The unrolled layout (`unrolled`): output-major weights held one array per layer, `layers` a tuple
of `LayerWeights` without the `L` axis, walked by a Python loop in the forward. `lax.scan` over
stacked weights makes XLA:CPU copy every layer's weight slice (and KV-cache slice) before its dots
(a dynamic-slice fusion): about twice the memory traffic of the weights themselves. Separate
arrays are read in place: 15-28% faster forwards here, at ~4x the compile time of the forward
(`BENCHMARKS.md`, "Output-major weights" table and its notes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec.config import ModelConfig
from jaxspec.types import Array, Float


@struct.dataclass
class LayerParams:
    attn_norm: Float[Array, "L M"]
    wqkv: Float[Array, "L M K G2 E"]  # G2 = G + 2: G query heads, 1 key, 1 value per KV head
    wo: Float[Array, "L H E M"]
    mlp_norm: Float[Array, "L M"]
    w_gate_up: Float[Array, "L M 2 F"]
    w_down: Float[Array, "L F M"]
    bqkv: Float[Array, "L K G2 E"] | None = None


@struct.dataclass
class Params:
    embed: Float[Array, "V M"]
    layers: LayerParams
    final_norm: Float[Array, " M"]
    lm_head: Float[Array, "M V"] | None = None


@struct.dataclass
class LayerWeights:
    """Stacked layers in the output-major layout (see the module docstring)."""

    attn_norm: Float[Array, "L M"]
    wqkv: Float[Array, "L K G2 E M"]
    wo: Float[Array, "L M H E"]
    mlp_norm: Float[Array, "L M"]
    w_gate_up: Float[Array, "L 2 F M"]
    w_down: Float[Array, "L M F"]
    bqkv: Float[Array, "L K G2 E"] | None = None


def is_unrolled(params: Params) -> bool:
    """Whether the layers are held one `LayerWeights` per layer (`unrolled`)."""
    return isinstance(params.layers, tuple)


def k_slot_last_for(params: Params) -> bool:
    """Whether caches decoded with these params keep K slot-last (`KVCache.k_slot_last`): the
    faster score matmul on XLA:CPU, where unrolled weights are the default. The one place that
    decides it; stacked layouts (sharding, the GPU kernels) keep [L, B, K, S, E]."""
    return is_unrolled(params)


def is_output_major(params: Params) -> bool:
    """Whether the projections are output-major (stacked `LayerWeights`, or `unrolled`)."""
    return is_unrolled(params) or isinstance(params.layers, LayerWeights)


def unrolled(params: Params) -> Params:
    """The unrolled layout (module docstring) of params in any layout: `layers` a tuple of
    per-layer output-major `LayerWeights` (eager; each leaf a new buffer). Params already
    unrolled are returned unchanged."""
    if is_unrolled(params):
        return params
    st = output_major(params).layers
    L = st.attn_norm.shape[0]
    per = tuple(jax.tree_util.tree_map(lambda x, i=i: jnp.array(x[i]), st) for i in range(L))
    return params.replace(layers=per)


def stacked(params: Params) -> Params:
    """Unrolled params with their layers stacked again (output-major); params in another layout
    are returned unchanged. Under `jit` this is one copy of the weights per call: the prefill
    stacks them once and walks the layers with `lax.scan` (compute-bound chunks, where the scan's
    slice copies cost little, and one compiled layer body instead of L)."""
    if not is_unrolled(params):
        return params
    return params.replace(layers=jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *params.layers))


def output_major(params: Params) -> Params:
    """The output-major layout (stacked) of params in any layout (eager: each leaf a new
    buffer); params already in it are returned unchanged."""
    if is_unrolled(params):
        return stacked(params)
    if is_output_major(params):
        return params
    st = params.layers
    return params.replace(
        layers=LayerWeights(
            attn_norm=st.attn_norm,
            wqkv=jnp.moveaxis(st.wqkv, 1, -1),
            wo=jnp.moveaxis(st.wo, -1, 1),
            mlp_norm=st.mlp_norm,
            w_gate_up=jnp.moveaxis(st.w_gate_up, 1, -1),
            w_down=jnp.swapaxes(st.w_down, 1, 2),
            bqkv=st.bqkv,
        )
    )


def input_major(params: Params) -> Params:
    """The inverse of `output_major` and `unrolled`; input-major params are returned unchanged."""
    if not is_output_major(params):
        return params
    lw = output_major(params).layers
    return params.replace(
        layers=LayerParams(
            attn_norm=lw.attn_norm,
            wqkv=jnp.moveaxis(lw.wqkv, -1, 1),
            wo=jnp.moveaxis(lw.wo, 1, -1),
            mlp_norm=lw.mlp_norm,
            w_gate_up=jnp.moveaxis(lw.w_gate_up, -1, 1),
            w_down=jnp.swapaxes(lw.w_down, 1, 2),
            bqkv=lw.bqkv,
        )
    )


LOGICAL_AXES = Params(
    embed=("vocab", "embed"),
    layers=LayerParams(
        attn_norm=("layers", "embed"),
        wqkv=("layers", "embed", "kv_heads", None, None),
        wo=("layers", "heads", None, "embed"),
        mlp_norm=("layers", "embed"),
        w_gate_up=("layers", "embed", None, "mlp"),
        w_down=("layers", "mlp", "embed"),
        bqkv=("layers", "kv_heads", None, None),
    ),
    final_norm=("embed",),
    lm_head=("embed", "vocab"),
)


def param_shapes(cfg: ModelConfig) -> Params:
    """The shape of every leaf (tuples), in the same pytree structure as the params."""
    L, M, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    H, K, E, G2 = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.group_size + 2
    return Params(
        embed=(V, M),
        layers=LayerParams(
            attn_norm=(L, M),
            wqkv=(L, M, K, G2, E),
            wo=(L, H, E, M),
            mlp_norm=(L, M),
            w_gate_up=(L, M, 2, F),
            w_down=(L, F, M),
            bqkv=(L, K, G2, E) if cfg.attention_bias else None,
        ),
        final_norm=(M,),
        lm_head=None if cfg.tie_word_embeddings else (M, V),
    )


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> Params:
    """Random params (normal * scale; norms = 1) for tests and examples."""
    shapes = param_shapes(cfg)
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)  # noqa: E731
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=is_shape)
    keys = jax.random.split(key, len(leaves))
    arrays = [
        scale * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves, strict=True)
    ]
    params = jax.tree_util.tree_unflatten(treedef, arrays)
    params = params.replace(
        final_norm=jnp.ones_like(params.final_norm),
        layers=params.layers.replace(
            attn_norm=jnp.ones_like(params.layers.attn_norm),
            mlp_norm=jnp.ones_like(params.layers.mlp_norm),
        ),
    )
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
