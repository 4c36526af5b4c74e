"""Block-sparse KV attention over per-(row, KV head) block lists, with multi-token queries.
Conventions: `common.py`; semantics: `reference.py`.

`impl`: "reference" | "pallas" (interpret mode off the GPU) | "auto" (the kernel on a GPU,
falling back to the reference only on NotImplementedError, e.g. a block size that is not a power
of two >= 16; the reference elsewhere).
"""

from __future__ import annotations

from jaxtyping import Array, Bool, Float, Int

from pallas_kernels import common
from pallas_kernels.common import BlockSizes
from pallas_kernels.sparse_kv_attention import reference


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
    impl: common.Impl = "auto",
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B T H E"]:
    B, T, H, K, S, E = common.validate(
        q, k_cache, v_cache, lengths, k_new, v_new, inflight, block_indices
    )
    bs = block_sizes or BlockSizes()

    def ref():
        return reference.sparse_kv_attention(
            q, k_cache, v_cache, lengths, block_indices, k_new, v_new, inflight,
            block_size=block_size,
        )  # fmt: skip

    def pallas(interpret: bool):
        from pallas_kernels.sparse_kv_attention import kernel

        G, NB = H // K, block_indices.shape[2]
        bq, Rp = common.row_tiling(T * G, bs.block_q)
        qg = common.group_queries(q, K, Rp)
        kn, vn, mask = common.tree_keys(k_new, v_new, inflight, G, Rp)
        splits = common.auto_splits(bs.num_splits, NB, B * K * (Rp // bq))
        parts = kernel.sparse_partials(
            qg, k_cache, v_cache, lengths, block_indices, kn, vn, mask, block_size=block_size,
            bq=bq, num_splits=splits, block_sizes=bs, interpret=interpret,
        )  # fmt: skip
        return common.ungroup(common.merge(*parts, T * G), T, H).astype(q.dtype)

    return common.dispatch("sparse_kv_attention", impl, pallas, ref, q.dtype)
