"""Params pytree of a Llama-family decoder.

Conventions: per-layer weights are stacked on a leading `L` axis (walked with `lax.scan`);
projections are stored input-major so the forward is plain einsums (`x @ w`):
`wq [L, M, H, E]`, `wk/wv [L, M, K, E]`, `wo [L, H, E, M]`, `w_gate/w_up [L, M, F]`,
`w_down [L, F, M]`. `lm_head` is None when the head is tied to `embed [V, M]`. Optional q/k/v
biases (Qwen2) are None when absent. `LOGICAL_AXES` names every leaf's axes for sharding.
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
    wq: Float[Array, "L M H E"]
    wk: Float[Array, "L M K E"]
    wv: Float[Array, "L M K E"]
    wo: Float[Array, "L H E M"]
    mlp_norm: Float[Array, "L M"]
    w_gate: Float[Array, "L M F"]
    w_up: Float[Array, "L M F"]
    w_down: Float[Array, "L F M"]
    bq: Float[Array, "L H E"] | None = None
    bk: Float[Array, "L K E"] | None = None
    bv: Float[Array, "L K E"] | None = None


@struct.dataclass
class Params:
    embed: Float[Array, "V M"]
    layers: LayerParams
    final_norm: Float[Array, " M"]
    lm_head: Float[Array, "M V"] | None = None


LOGICAL_AXES = Params(
    embed=("vocab", "embed"),
    layers=LayerParams(
        attn_norm=("layers", "embed"),
        wq=("layers", "embed", "heads", None),
        wk=("layers", "embed", "kv_heads", None),
        wv=("layers", "embed", "kv_heads", None),
        wo=("layers", "heads", None, "embed"),
        mlp_norm=("layers", "embed"),
        w_gate=("layers", "embed", "mlp"),
        w_up=("layers", "embed", "mlp"),
        w_down=("layers", "mlp", "embed"),
        bq=("layers", "heads", None),
        bk=("layers", "kv_heads", None),
        bv=("layers", "kv_heads", None),
    ),
    final_norm=("embed",),
    lm_head=("embed", "vocab"),
)


def param_shapes(cfg: ModelConfig) -> Params:
    """The shape of every leaf (tuples), in the same pytree structure as the params."""
    L, M, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    bias = cfg.attention_bias
    return Params(
        embed=(V, M),
        layers=LayerParams(
            attn_norm=(L, M),
            wq=(L, M, H, E),
            wk=(L, M, K, E),
            wv=(L, M, K, E),
            wo=(L, H, E, M),
            mlp_norm=(L, M),
            w_gate=(L, M, F),
            w_up=(L, M, F),
            w_down=(L, F, M),
            bq=(L, H, E) if bias else None,
            bk=(L, K, E) if bias else None,
            bv=(L, K, E) if bias else None,
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
