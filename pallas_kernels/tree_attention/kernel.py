"""Tree attention, Pallas kernel for the prefix part (flash-decoding over the committed prefix).

Grid (B, K, P): program (b, k, p) holds the R = T*G query rows of row b's KV head k (all tree
nodes at once, padded to Rp, a power of two >= 16) and walks the cache blocks p, p+P, p+2P, ...
below lengths[b] (`block_kv` slots per step, the last block masked), keeping the online-softmax
statistics in registers. It writes one partial (m [Rp], l [Rp], acc [Rp, E]) per split; the api
merges the P partials with the in-flight part exactly by log-sum-exp. The prefix KV of a row is
thus read once for all tree nodes and all G query heads of its KV head.

Backend: Pallas lowered through Triton (`plt.CompilerParams`), which the installed JAX still
ships; on CPU the same kernel runs in interpret mode. A Mosaic GPU port would replace only this
file (the api, reference and tests stay).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from jaxtyping import Array, Float, Int

from pallas_kernels.common import BlockSizes, block_update, init_carry


def make_dot(dtype):
    """Matmul with float32 accumulation; float32 inputs stay float32 (no tf32) so the kernel agrees
    with the float32 reference to rounding."""
    exact = jnp.dtype(dtype) == jnp.float32

    def dot(a, b, trans_b):
        return plt.dot(a, b, trans_b=trans_b, allow_tf32=not exact).astype(jnp.float32)

    return dot


def load_block(ref, start, block: int, num_slots: int):
    """Slots [start, start + block) of a [S, E] ref; slots past S read as zeros."""
    in_bounds = (start + jnp.arange(block, dtype=jnp.int32)) < num_slots
    return plt.load(ref.at[pl.ds(start, block), :], mask=in_bounds[:, None], other=0)


def _kernel(len_ref, q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, *, bs: BlockSizes, S: int):
    b, p = pl.program_id(0), pl.program_id(2)
    P, BK = pl.num_programs(2), bs.block_kv
    length = len_ref[b]
    q = q_ref[...]  # [Rp, E]
    dot = make_dot(q.dtype)
    trips = jnp.maximum(pl.cdiv(pl.cdiv(length, BK) - p, P), 0)

    def body(i, carry):
        start = pl.multiple_of((p + i * P) * BK, BK)
        k = load_block(k_ref, start, BK, S)
        v = load_block(v_ref, start, BK, S)
        valid = (start + jnp.arange(BK, dtype=jnp.int32)) < length
        return block_update(q, k, v, valid, carry, dot)

    m, den, acc = jax.lax.fori_loop(0, trips, body, init_carry(q.shape[0], q.shape[1]))
    m_ref[...], l_ref[...], acc_ref[...] = m, den, acc


def prefix_partials(
    qg: Float[Array, "B K Rp E"],
    k_cache: Float[Array, "B K S E"],
    v_cache: Float[Array, "B K S E"],
    lengths: Int[Array, " B"],
    *,
    block_sizes: BlockSizes,
    num_splits: int,
    interpret: bool = False,
):
    """(m, l, acc) float32 [B, K, P, Rp(, E)] of the prefix part, one partial per split."""
    B, K, Rp, E = qg.shape
    S = k_cache.shape[2]
    if E < 16 or E & (E - 1):
        raise NotImplementedError(f"tree_attention kernel: head dim {E} is not a power of 2 >= 16")
    f32 = jnp.float32
    kernel = functools.partial(_kernel, bs=block_sizes, S=S)
    bq = min(Rp, block_sizes.block_q)
    row = lambda b, k, p, r: (b, k, r, 0)  # noqa: E731
    kv = lambda b, k, p, r: (b, k, 0, 0)  # noqa: E731
    return pl.pallas_call(
        kernel,
        grid=(B, K, num_splits, Rp // bq),
        in_specs=[
            pl.BlockSpec((B,), lambda b, k, p, r: (0,)),
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
        name="tree_attention_prefix",
    )(lengths.astype(jnp.int32), qg, k_cache, v_cache)
