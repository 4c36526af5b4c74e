"""Tree attention, Pallas kernel: flash-decoding over the committed prefix, tree keys fused in.

Grid (B, K, P, Rp // bq): program (b, k, p, r) holds bq query rows (row t*G + g: query head g of
KV head k for in-flight token t; Rp = the T*G rows padded to a multiple of bq) and walks the
cache blocks p, p+P, p+2P, ... below lengths[b] (`block_kv` slots per step, slots past the length
or the cache masked), keeping the online-softmax statistics in registers (scores in base-2 units,
`exp2` by the ex2 instruction: `common.block_update`); split p = 0 then takes the in-flight
(tree) keys under the ancestor mask. It writes one partial (m [bq], l [bq],
acc [bq, E], float32) per split; the api merges the P partials by log-sum-exp. A row's prefix KV
is thus read once for all tree nodes and all G query heads of its KV head.

The walk over the prefix is a parameter (`walk`): contiguous blocks here, a per-(row, KV head)
block list in `sparse_kv_attention/kernel.py`, which reuses `partials`.

Backend: Pallas lowered through Triton (`plt.CompilerParams`), which the installed JAX still
ships (deprecated since JAX 0.11); on CPU the same kernel runs in interpret mode. A Mosaic GPU
port would replace only this file and its sparse sibling (api, reference and tests stay).
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


def make_exp2(fast: bool, interpret: bool):
    """2**x in float32: the `ex2.approx.ftz.f32` instruction (one MUFU op; libdevice's exp2f adds
    denormal handling around it), libdevice's exp2f, or jnp.exp2 in interpret mode."""
    if interpret or not fast:
        return jnp.exp2

    def exp2(x):
        (y,) = plt.elementwise_inline_asm(
            "ex2.approx.ftz.f32 $0, $1;",
            args=[x],
            constraints="=r,r",
            pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
        )
        return y

    return exp2


def load_block(ref, start, block: int, num_slots: int):
    """Slots [start, start + block) of a [S, E] ref; slots past S read as zeros."""
    in_bounds = (start + jnp.arange(block, dtype=jnp.int32)) < num_slots
    return plt.load(ref.at[pl.ds(start, block), :], mask=in_bounds[:, None], other=0)


def contiguous_walk(walk_refs, step, length, p, P, BK, carry):
    """Blocks p, p+P, ... of [0, lengths[b]): the full blocks unmasked, then the partial last
    block (masked) in the split it falls to."""
    del walk_refs
    full = length // BK
    trips = jnp.maximum(pl.cdiv(full - p, P), 0)
    body = lambda i, c: step(pl.multiple_of((p + i * P) * BK, BK), None, c)  # noqa: E731
    carry = jax.lax.fori_loop(0, trips, body, carry)
    tail = ((length % BK) != 0) & (full % P == p)
    last = lambda i, c: step(pl.multiple_of(full * BK, BK), True, c)  # noqa: E731
    return jax.lax.fori_loop(0, tail.astype(jnp.int32), last, carry)


def _kernel(*refs, walk, n_walk: int, BK: int, S: int, exp2):
    len_ref, walk_refs = refs[0], refs[1 : 1 + n_walk]
    q_ref, k_ref, v_ref, kn_ref, vn_ref, mask_ref, m_ref, l_ref, acc_ref = refs[1 + n_walk :]
    b, p = pl.program_id(0), pl.program_id(2)
    P = pl.num_programs(2)
    length = len_ref[b]
    q = q_ref[...]  # [bq, E], pre-scaled
    dot = make_dot(q.dtype)

    def step(start, listed, carry):
        """One block of keys at `start`; listed=None: a block wholly below the length."""
        if listed is None and S >= BK:  # (S < BK: no full block exists, the loop never runs)
            k, v = k_ref[pl.ds(start, BK), :], v_ref[pl.ds(start, BK), :]  # [BK, E]
            return block_update(q, k, v, None, carry, dot, exp2)
        listed = True if listed is None else listed
        k = load_block(k_ref, start, BK, S)
        v = load_block(v_ref, start, BK, S)
        valid = ((start + jnp.arange(BK, dtype=jnp.int32)) < length) & listed
        return block_update(q, k, v, valid, carry, dot, exp2)

    carry = walk(walk_refs, step, length, p, P, BK, init_carry(q.shape[0], q.shape[1]))
    # The in-flight (tree) keys, once per row (split 0 only), in blocks of TK (bounded on-chip
    # memory for long prefill chunks).
    TK = min(BK, kn_ref.shape[0])

    def tree_step(j, carry):
        cols = pl.ds(pl.multiple_of(j * TK, TK), TK)
        mask = mask_ref[:, cols] != 0  # [bq, TK]
        return block_update(q, kn_ref[cols, :], vn_ref[cols, :], mask, carry, dot, exp2)

    n_tree = (p == 0).astype(jnp.int32) * (kn_ref.shape[0] // TK)
    m, den, acc = jax.lax.fori_loop(0, n_tree, tree_step, carry)
    m_ref[...], l_ref[...], acc_ref[...] = m, den, acc


def partials(
    qg: Float[Array, "B K Rp E"],
    k_cache: Float[Array, "B K S E"],
    v_cache: Float[Array, "B K S E"],
    lengths: Int[Array, " B"],
    kn: Float[Array, "B K Tp E"],
    vn: Float[Array, "B K Tp E"],
    mask: Int[Array, "#B Rp Tp"],
    *,
    bq: int,
    block_kv: int,
    num_splits: int,
    block_sizes: BlockSizes,
    walk=contiguous_walk,
    walk_inputs: tuple = (),
    walk_specs: tuple = (),
    interpret: bool = False,
    name: str = "tree_attention",
):
    """(m, l, acc) float32 [B, K, P, Rp(, E)]: one partial per split of the walk."""
    B, K, Rp, E = qg.shape
    S, Tp = k_cache.shape[2], kn.shape[2]
    if E < 16 or E & (E - 1):
        raise NotImplementedError(f"{name} kernel: head dim {E} is not a power of two >= 16")
    f32 = jnp.float32
    exp2 = make_exp2(block_sizes.fast_exp, interpret)
    kernel = functools.partial(
        _kernel, walk=walk, n_walk=len(walk_inputs), BK=block_kv, S=S, exp2=exp2
    )
    bh = lambda b, k, p, r: (b, k, 0, 0)  # noqa: E731
    rows = lambda b, k, p, r: (b, k, r, 0)  # noqa: E731
    one_mask = mask.shape[0] == 1
    mask_rows = lambda b, k, p, r: (0 if one_mask else b, r, 0)  # noqa: E731
    out = lambda b, k, p, r: (b, k, p, r)  # noqa: E731
    return pl.pallas_call(
        kernel,
        grid=(B, K, num_splits, Rp // bq),
        in_specs=[
            pl.BlockSpec((B,), lambda b, k, p, r: (0,)),
            *walk_specs,
            pl.BlockSpec((None, None, bq, E), rows),
            pl.BlockSpec((None, None, S, E), bh),
            pl.BlockSpec((None, None, S, E), bh),
            pl.BlockSpec((None, None, Tp, E), bh),
            pl.BlockSpec((None, None, Tp, E), bh),
            pl.BlockSpec((None, bq, Tp), mask_rows),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, bq), out),
            pl.BlockSpec((None, None, None, bq), out),
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
        name=name,
    )(lengths.astype(jnp.int32), *walk_inputs, qg, k_cache, v_cache, kn, vn, mask)
