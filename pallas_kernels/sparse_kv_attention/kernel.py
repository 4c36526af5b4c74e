"""Block-sparse KV attention, Pallas kernel for the prefix part.

Grid (B, K, P): program (b, k, p) holds the R = T*G query rows of KV head k of row b (padded to a
power of two >= 16) and walks the entries p, p+P, ... of its block list, loading `block_size`
slots per listed block (entries of -1 and slots at or past lengths[b] masked), with the
online-softmax statistics in registers. One partial (m, l, acc) per split; the api merges them
with the in-flight part by log-sum-exp. Backend as in `tree_attention/kernel.py` (Pallas through
Triton; interpret mode on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from jaxtyping import Array, Float, Int

from pallas_kernels.common import BlockSizes, block_update, init_carry
from pallas_kernels.tree_attention.kernel import load_block, make_dot


def _kernel(len_ref, idx_ref, q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, *, BK, NB, S, bs):
    b, p = pl.program_id(0), pl.program_id(2)
    P = pl.num_programs(2)
    length = len_ref[b]
    q = q_ref[...]  # [Rp, E]
    dot = make_dot(q.dtype)
    trips = jnp.maximum(pl.cdiv(NB - p, P), 0)

    def body(i, carry):
        blk = idx_ref[p + i * P]
        start = pl.multiple_of(jnp.maximum(blk, 0) * BK, BK)
        k = load_block(k_ref, start, BK, S)
        v = load_block(v_ref, start, BK, S)
        valid = ((start + jnp.arange(BK, dtype=jnp.int32)) < length) & (blk >= 0)
        return block_update(q, k, v, valid, carry, dot)

    m, den, acc = jax.lax.fori_loop(0, trips, body, init_carry(q.shape[0], q.shape[1]))
    m_ref[...], l_ref[...], acc_ref[...] = m, den, acc


def prefix_partials(
    qg: Float[Array, "B K Rp E"],
    k_cache: Float[Array, "B K S E"],
    v_cache: Float[Array, "B K S E"],
    lengths: Int[Array, " B"],
    block_indices: Int[Array, "B K NB"],
    *,
    block_size: int,
    block_sizes: BlockSizes,
    num_splits: int,
    interpret: bool = False,
):
    """(m, l, acc) float32 [B, K, P, Rp(, E)] of the listed blocks, one partial per split."""
    B, K, Rp, E = qg.shape
    S, NB = k_cache.shape[2], block_indices.shape[2]
    if E < 16 or E & (E - 1):
        raise NotImplementedError(f"sparse_kv_attention kernel: head dim {E} not a power of 2")
    if block_size < 16 or block_size & (block_size - 1):
        raise NotImplementedError(
            f"sparse_kv_attention kernel: block_size {block_size} is not a power of two >= 16"
        )
    f32 = jnp.float32
    kernel = functools.partial(_kernel, BK=block_size, NB=NB, S=S, bs=block_sizes)
    bq = min(Rp, block_sizes.block_q)
    row = lambda b, k, p, r: (b, k, r, 0)  # noqa: E731
    kv = lambda b, k, p, r: (b, k, 0, 0)  # noqa: E731
    return pl.pallas_call(
        kernel,
        grid=(B, K, num_splits, Rp // bq),
        in_specs=[
            pl.BlockSpec((B,), lambda b, k, p, r: (0,)),
            pl.BlockSpec((None, None, NB), lambda b, k, p, r: (b, k, 0)),
            pl.BlockSpec((None, None, bq, E), row),
            pl.BlockSpec((None, None, S, E), kv),
            pl.BlockSpec((None, None, S, E), kv),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, bq), lambda b, k, p, r: (b, k, p, r)),
            pl.BlockSpec((None, None, None, bq), lambda b, k, p, r: (b, k, p, r)),
            pl.BlockSpec((None, None, None, bq, E), lambda b, k, p, r: (b, k, p, r, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, K, num_splits, Rp), f32),
            jax.ShapeDtypeStruct((B, K, num_splits, Rp), f32),
            jax.ShapeDtypeStruct((B, K, num_splits, Rp, E), f32),
        ],
        compiler_params=plt.CompilerParams(
            num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
        ),
        interpret=interpret,
        name="sparse_kv_attention_prefix",
    )(lengths.astype(jnp.int32), block_indices.astype(jnp.int32), qg, k_cache, v_cache)
