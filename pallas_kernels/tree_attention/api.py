"""Tree attention: the in-flight tree nodes of each row attend to the row's committed prefix
(per-row length) and to the tree nodes under the ancestor mask. Conventions: `common.py`.

`impl`: "reference" (pure jnp, the CPU path), "pallas" (the kernel; interpret mode off the GPU),
"auto" (the kernel on a GPU, falling back to the reference only on NotImplementedError, e.g. a
sliding window, an odd head dim or a slot-last K cache; the reference elsewhere).
"""

from __future__ import annotations

from jaxtyping import Array, Bool, Float, Int

from pallas_kernels import common
from pallas_kernels.common import BlockSizes
from pallas_kernels.tree_attention import reference


def tree_attention(
    q: Float[Array, "B T H E"],
    k_cache: Float[Array, "B K S E"],
    v_cache: Float[Array, "B K S E"],
    lengths: Int[Array, " B"],
    k_new: Float[Array, "B T K E"],
    v_new: Float[Array, "B T K E"],
    inflight: Bool[Array, "#B T T"],
    positions: Int[Array, "B T"] | None = None,
    *,
    sliding_window: int | None = None,
    impl: common.Impl = "auto",
    block_sizes: BlockSizes | None = None,
    k_slot_last: bool = False,
    finite_values: bool = False,
) -> Float[Array, "B T H E"]:
    """`k_slot_last`: k_cache is [B, K, E, S] (`jaxspec.kv_cache.KVCache.k_slot_last`).
    `finite_values`: V is finite in every slot, masked ones included (the reference then skips
    zeroing them; the kernel masks by its own means either way)."""
    B, T, H, K, S, E = common.validate(
        q, k_cache, v_cache, lengths, k_new, v_new, inflight, k_slot_last=k_slot_last
    )
    bs = block_sizes or BlockSizes()

    def ref():
        return reference.tree_attention(
            q, k_cache, v_cache, lengths, k_new, v_new, inflight, positions, sliding_window,
            k_slot_last, finite_values,
        )  # fmt: skip

    def pallas(interpret: bool):
        from pallas_kernels.tree_attention import kernel

        if sliding_window is not None:
            raise NotImplementedError("tree_attention kernel: sliding window")
        if k_slot_last:
            raise NotImplementedError("tree_attention kernel: a slot-last K cache")
        G = H // K
        bq, Rp = common.row_tiling(T * G, bs.block_q)
        qg = common.group_queries(q, K, Rp)
        kn, vn, mask = common.tree_keys(k_new, v_new, inflight, G, Rp)
        blocks = -(-S // bs.block_kv)
        splits = common.auto_splits(bs.num_splits, blocks, B * K * (Rp // bq))
        parts = kernel.partials(
            qg, k_cache, v_cache, lengths, kn, vn, mask, bq=bq, block_kv=bs.block_kv,
            num_splits=splits, block_sizes=bs, interpret=interpret,
        )  # fmt: skip
        return common.ungroup(common.merge(*parts, T * G), T, H).astype(q.dtype)

    return common.dispatch("tree_attention", impl, pallas, ref, q.dtype)
