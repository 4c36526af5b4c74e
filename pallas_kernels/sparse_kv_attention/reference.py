"""Block-sparse KV attention, pure jnp: the specification of the op and its CPU path.

Like tree attention, but the prefix part reads only the cache blocks listed for each (row, KV
head): `block_indices[b, k, :]` holds block ids (block i = slots [i*block_size, (i+1)*block_size)),
-1 for unused entries; listed ids must be distinct. A slot is attended when its block is listed
for (b, k) and it lies below lengths[b]. Covers sink + window drafts (MagicDec: the sink blocks
and the blocks of the recent window) and selected blocks (CritiPrefill: the top-k blocks of a
segment, its own tokens being the in-flight part under the causal mask).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels.common import validate
from pallas_kernels.tree_attention.reference import dense_attention


def sparse_kv_attention(
    q: Float[Array, "B T H E"],
    k_cache: Float[Array, "B K S E"],
    v_cache: Float[Array, "B K S E"],
    lengths: Int[Array, " B"],
    block_indices: Int[Array, "B K NB"],
    k_new: Float[Array, "B T K E"],
    v_new: Float[Array, "B T K E"],
    inflight: Bool[Array, "#B T T"],
    *,
    block_size: int,
) -> Float[Array, "B T H E"]:
    """Gathers the listed blocks' slots ([B, K, NB*block_size], so the work scales with the
    blocks read, not the cache) and attends to them plus the in-flight tokens."""
    B, T, H, K, S, E = validate(q, k_cache, v_cache, lengths, k_new, v_new, inflight, block_indices)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    NB = block_indices.shape[2]
    slots = block_indices[..., None] * block_size + jnp.arange(block_size, dtype=jnp.int32)
    valid = (block_indices[..., None] >= 0) & (slots < lengths[:, None, None, None])
    slots, valid = slots.reshape(B, K, NB * block_size), valid.reshape(B, K, NB * block_size)
    idx = jnp.clip(slots, 0, S - 1)[..., None]  # slots past the cache are invalid anyway
    k_sel = jnp.take_along_axis(k_cache, idx, axis=2)
    v_sel = jnp.take_along_axis(v_cache, idx, axis=2)
    return dense_attention(q, k_sel, v_sel, k_new, v_new, valid[:, :, None], inflight, valid)
