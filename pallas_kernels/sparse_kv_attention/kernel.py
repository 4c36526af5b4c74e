"""Block-sparse KV attention, Pallas kernel: the tree-attention kernel with a listed walk.

Program (b, k, p, r) walks the entries p, p+P, ... of the block list of (row b, KV head k),
loading `block_size` slots per listed block (entries of -1, and slots at or past lengths[b] or
the cache, masked); everything else (grid, fused in-flight keys, partials, backend) is
`tree_attention/kernel.py`'s `partials`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from pallas_kernels.tree_attention.kernel import partials


def listed_walk(walk_refs, step, length, p, P, BK, carry):
    (idx_ref,) = walk_refs  # [NB] block ids of this (row, KV head), -1 = unused
    NB = idx_ref.shape[0]
    trips = jnp.maximum(pl.cdiv(NB - p, P), 0)

    def body(i, c):
        blk = idx_ref[p + i * P]
        return step(pl.multiple_of(jnp.maximum(blk, 0) * BK, BK), blk >= 0, c)

    return jax.lax.fori_loop(0, trips, body, carry)


def sparse_partials(
    qg: Float[Array, "B K Rp E"],
    k_cache: Float[Array, "B K S E"],
    v_cache: Float[Array, "B K S E"],
    lengths: Int[Array, " B"],
    block_indices: Int[Array, "B K NB"],
    kn: Float[Array, "B K Tp E"],
    vn: Float[Array, "B K Tp E"],
    mask: Int[Array, "#B Rp Tp"],
    *,
    block_size: int,
    **kw,
):
    if block_size < 16 or block_size & (block_size - 1):
        raise NotImplementedError(
            f"sparse_kv_attention kernel: block_size {block_size} is not a power of two >= 16"
        )
    NB = block_indices.shape[2]
    return partials(
        qg, k_cache, v_cache, lengths, kn, vn, mask, block_kv=block_size, walk=listed_walk,
        walk_inputs=(block_indices.astype(jnp.int32),),
        walk_specs=(pl.BlockSpec((None, None, NB), lambda b, k, p, r: (b, k, 0)),),
        name="sparse_kv_attention", **kw,
    )  # fmt: skip
