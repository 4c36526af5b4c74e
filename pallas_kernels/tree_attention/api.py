"""Tree attention: the in-flight tree nodes of each row attend to the row's committed prefix
(per-row length) and to the tree nodes under the ancestor mask. Conventions: `common.py`.

`impl`: "reference" (pure jnp, the CPU path), "pallas" (the kernel; interpret mode off the GPU),
"auto" (the kernel on a GPU, falling back to the reference only on NotImplementedError, e.g. a
sliding window or an odd head dim; the reference elsewhere).
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
) -> Float[Array, "B T H E"]:
    B, T, H, K, S, E = common.validate(q, k_cache, v_cache, lengths, k_new, v_new, inflight)
    bs = block_sizes or BlockSizes()

    def ref():
        return reference.tree_attention(
            q, k_cache, v_cache, lengths, k_new, v_new, inflight, positions, sliding_window
        )

    def pallas(interpret: bool):
        from pallas_kernels.tree_attention import kernel

        if sliding_window is not None:
            raise NotImplementedError("tree_attention kernel: sliding window")
        G = H // K
        Rp = common.next_pow2(T * G)
        qg = common.group_queries(q, K, Rp)
        blocks = -(-S // bs.block_kv)
        parallel = B * K * (Rp // min(Rp, bs.block_q))
        parts = kernel.prefix_partials(
            qg,
            k_cache,
            v_cache,
            lengths,
            block_sizes=bs,
            num_splits=common.auto_splits(bs.num_splits, blocks, parallel),
            interpret=interpret,
        )
        tree = common.inflight_part(qg, k_new, v_new, inflight, T, G)
        out = common.merge(*parts, tree, T * G)
        return common.ungroup(out, T, H).astype(q.dtype)

    return common.dispatch("tree_attention", impl, pallas, ref)
