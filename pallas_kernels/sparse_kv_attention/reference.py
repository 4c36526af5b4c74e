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


def selected_slots(
    block_indices: Int[Array, "B K NB"], block_size: int, num_slots: int
) -> Bool[Array, "B K S"]:
    """Which cache slots the block lists select (a scatter, not a [.., NB, S] comparison)."""
    B, K, _ = block_indices.shape
    nblocks = -(-num_slots // block_size)
    idx = jnp.where(block_indices < 0, nblocks, block_indices)  # -1 -> a dropped extra block
    rows = jnp.arange(B)[:, None, None]
    heads = jnp.arange(K)[None, :, None]
    sel = jnp.zeros((B, K, nblocks + 1), bool).at[rows, heads, idx].set(True, mode="drop")
    return jnp.repeat(sel[:, :, :nblocks], block_size, axis=2)[:, :, :num_slots]


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
    B, T, H, K, S, E = validate(q, k_cache, v_cache, lengths, k_new, v_new, inflight, block_indices)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    slot_valid = jnp.arange(S, dtype=jnp.int32)[None, :] < lengths[:, None]  # [B, S]
    prefix = selected_slots(block_indices, block_size, S) & slot_valid[:, None, :]
    return dense_attention(q, k_cache, v_cache, k_new, v_new, prefix[:, :, None], inflight, prefix)
