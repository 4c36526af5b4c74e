"""CritiPrefill: segment-wise, criticality-based block-sparse prefill (ALGORITHMS.md §2).

The prompt is prefilled in segments of S tokens (the prefill chunk). For a segment that starts at
or after the threshold tau and is not a row's last segment, every layer from `dense_layers` on
(layer 0 stays dense) estimates how critical each KV block of Bk cache slots is to the segment:

  c(s, b) = max(mean(Qmax.Kmax, Qmin.Kmax), mean(Qmax.Kmin, Qmin.Kmin))

from the element-wise max/min of the segment's (post-RoPE) queries per query head and of each
block's keys, averaged over the G query heads of each KV head; blocks that do not end before the
segment's start are masked; a softmax over blocks gives the score, fused across layers
(0.25 previous + 0.75 current from layer 2 on, unless layer fusion is off). The top k = budget/Bk
blocks per (row, KV head) plus the segment's own tokens (causal) are attended with
`sparse_kv_attention`; everything else is dense. The full K/V is still written to the cache:
only the attention of the prefill is approximated, decoding reads the whole cache.

Static shapes: k is static, the sparse/dense choice per segment is a `lax.cond` on a traced
flag, so one compile serves every prompt of a bucket. Ragged batches: a segment runs sparse only
when it is past tau for every row and no row ends inside it (a row's last segment is dense), so
a batch never prunes more than its rows would alone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxspec.errors import ConfigError
from jaxspec.types import Array, Float, Int
from pallas_kernels.common import NEG_INF


@dataclasses.dataclass(frozen=True)
class CritiPrefill:
    """CritiPrefill hyper-parameters (defaults: the paper's experiment scripts)."""

    segment: int = 512  # S: queries per segment (= the prefill chunk)
    block: int = 32  # Bk: cache slots per KV block
    budget: int = 2048  # beta: tokens of selected blocks per segment (k = budget / block)
    threshold: int = 4096  # tau: segments starting before this are dense
    layer_fusion: bool = True
    fusion_weight: float = 0.25  # weight of the previous layer's fused score
    dense_layers: int = 1  # the first layers stay dense

    def __post_init__(self):
        for name in ("segment", "block", "budget", "threshold"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"critiprefill: --{name} must be positive, got {getattr(self, name)}"
                )
        if self.segment % self.block:
            raise ConfigError(
                f"critiprefill: the segment ({self.segment}) must be a multiple of the block "
                f"({self.block})"
            )
        if self.budget % self.block:
            raise ConfigError(
                f"critiprefill: the budget ({self.budget}) must be a multiple of the block "
                f"({self.block})"
            )
        if self.threshold < self.budget:
            raise ConfigError(
                f"critiprefill: the threshold ({self.threshold}) must be >= the budget "
                f"({self.budget}), or a segment could select blocks at or past its start"
            )
        if self.threshold % self.segment:
            raise ConfigError(
                f"critiprefill: the threshold ({self.threshold}) must be a multiple of the "
                f"segment ({self.segment})"
            )

    @property
    def num_selected(self) -> int:
        return self.budget // self.block


def segment_is_sparse(
    cp: CritiPrefill, index: Int[Array, ""], prompt_lengths: Int[Array, " B"]
) -> jax.Array:
    """Whether segment `index` (slots [index*S, (index+1)*S) of every row) runs sparse."""
    start, end = index * cp.segment, (index + 1) * cp.segment
    inside = (prompt_lengths > start) & (prompt_lengths <= end)  # a row's last segment
    return (start >= cp.threshold) & ~jnp.any(inside)


def block_scores(
    cp: CritiPrefill,
    q: Float[Array, "B T H E"],
    k_cache: Float[Array, "B K S E"],
    lengths: Int[Array, " B"],
) -> Float[Array, "B K NB"]:
    """Softmax over blocks of the pooled criticality; blocks not ending by lengths[b] get 0."""
    B, T, H, E = q.shape
    K, S = k_cache.shape[1], k_cache.shape[2]
    G, Bk = H // K, cp.block
    nb = S // Bk
    f32 = jnp.float32
    qg = q.astype(f32).reshape(B, T, K, G, E)
    qmax, qmin = qg.max(axis=1), qg.min(axis=1)  # [B, K, G, E]
    kb = k_cache[:, :, : nb * Bk].astype(f32).reshape(B, K, nb, Bk, E)
    kmax, kmin = kb.max(axis=3), kb.min(axis=3)  # [B, K, NB, E]

    def dot(a, b):
        return jnp.einsum("bkge,bkne->bkgn", a, b)

    c = jnp.maximum(
        (dot(qmax, kmax) + dot(qmin, kmax)) / 2, (dot(qmax, kmin) + dot(qmin, kmin)) / 2
    ).mean(axis=2)  # [B, K, NB]
    ends = (jnp.arange(nb, dtype=jnp.int32) + 1) * Bk
    visible = ends[None, None, :] <= lengths[:, None, None]
    return jax.nn.softmax(jnp.where(visible, c, NEG_INF), axis=-1) * visible


def select_blocks(cp: CritiPrefill, scores: Float[Array, "B K NB"]) -> Int[Array, "B K k"]:
    """The top-k blocks per (row, KV head); entries whose block is masked become -1."""
    k = min(cp.num_selected, scores.shape[-1])
    vals, idx = jax.lax.top_k(scores, k)
    return jnp.where(vals > 0, idx, -1).astype(jnp.int32)


def init_state(cp: CritiPrefill, B: int, K: int, num_slots: int, sparse: jax.Array):
    """(fused score of the previous layer [B, K, NB], this segment's sparse flag)."""
    return jnp.zeros((B, K, num_slots // cp.block), jnp.float32), sparse


def attend(
    cp: CritiPrefill,
    cfg,
    layer: Int[Array, ""],
    state,
    q, k_cache, v_cache, lengths, k_new, v_new, inflight, positions,
):  # fmt: skip
    """One layer's prefill attention: sparse (selected blocks + own segment) or dense."""
    from jaxspec.model.attention import attend as dense_attend
    from pallas_kernels.sparse_kv_attention import sparse_kv_attention

    prev, sparse = state

    def pruned():
        scores = block_scores(cp, q, k_cache, lengths)
        if cp.layer_fusion:
            w = cp.fusion_weight
            scores = jnp.where(layer >= 2, w * prev + (1 - w) * scores, scores)
        blocks = select_blocks(cp, scores)
        out = sparse_kv_attention(
            q, k_cache, v_cache, lengths, blocks, k_new, v_new, inflight,
            block_size=cp.block, impl=cfg.attention,
        )  # fmt: skip
        return out.astype(q.dtype), scores

    def dense():
        out = dense_attend(cfg, q, k_cache, v_cache, lengths, k_new, v_new, inflight, positions)
        return out.astype(q.dtype), prev

    out, prev = jax.lax.cond(sparse & (layer >= cp.dense_layers), pruned, dense)
    return out, (prev, sparse)
