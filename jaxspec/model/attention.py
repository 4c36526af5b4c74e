"""Attention over a committed prefix plus in-flight tokens (dense reference path).

The T in-flight query tokens of row b attend to
  * the committed prefix: cache slots `s < lengths[b]` (key position = s), read-only, and
  * the in-flight tokens themselves (their fresh K/V), where `inflight[b, t, j]` (causal for
    plain decoding and prefill, the ancestor mask for a token tree),
optionally restricted to a sliding window over positions. The two score blocks share one softmax
(exactly the log-sum-exp merge of the two parts), so the prefix KV is read once for all T queries
and the cache is never written inside the layer loop. GQA groups the H query heads into K groups
of G, never repeating K/V. Scores and softmax are float32. The cache layout is
`[B, K, S, E]` per layer so both attention matmuls read it in its natural order (no transposed
copy of the cache per layer: measured 4x slower decode at B=8, S=1024 with `[B, S, K, E]`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxspec.types import Array, Bool, Float, Int

NEG_INF = -1e30


def build_masks(
    lengths: Int[Array, " B"],
    positions: Int[Array, "B T"],
    inflight: Bool[Array, "#B T T"],
    num_slots: int,
    sliding_window: int | None = None,
) -> tuple[Bool[Array, "B T S"], Bool[Array, "B T T"]]:
    """(prefix mask over cache slots, mask over in-flight tokens), shared by all layers."""
    B, T = positions.shape
    slot = jnp.arange(num_slots, dtype=jnp.int32)
    prefix = jnp.broadcast_to((slot[None, :] < lengths[:, None])[:, None, :], (B, T, num_slots))
    inflight = jnp.broadcast_to(inflight, (B, T, T))
    if sliding_window is not None:
        prefix &= (positions[:, :, None] - slot[None, None, :]) < sliding_window
        inflight &= (positions[:, :, None] - positions[:, None, :]) < sliding_window
    return prefix, inflight


def attend(
    q: Float[Array, "B T H E"],
    k_prefix: Float[Array, "B K S E"],
    v_prefix: Float[Array, "B K S E"],
    k_new: Float[Array, "B T K E"],
    v_new: Float[Array, "B T K E"],
    prefix_mask: Bool[Array, "B T S"],
    inflight_mask: Bool[Array, "B T T"],
) -> Float[Array, "B T H E"]:
    B, T, H, E = q.shape
    K, S = k_prefix.shape[1], k_prefix.shape[2]
    G = H // K
    # Queries as [B, K, T*G, E] (row t*G + g): each (row, KV head) is then one plain matmul
    # against its [S, E] keys. Measured 2.3x faster on XLA:CPU than a 5-D "btkge,bkse" einsum.
    qg = q.reshape(B, T, K, G, E).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, E)
    qg = qg * jnp.asarray(E**-0.5, q.dtype)
    kn, vn = k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3)  # [B, K, T, E]
    f32 = jnp.float32
    s_pre = jnp.einsum("bkqe,bkse->bkqs", qg, k_prefix, preferred_element_type=f32)
    s_new = jnp.einsum("bkqe,bkje->bkqj", qg, kn, preferred_element_type=f32)
    s_pre = jnp.where(jnp.repeat(prefix_mask, G, axis=1)[:, None], s_pre, NEG_INF)
    s_new = jnp.where(jnp.repeat(inflight_mask, G, axis=1)[:, None], s_new, NEG_INF)
    probs = jax.nn.softmax(jnp.concatenate([s_pre, s_new], axis=-1), axis=-1)
    p_pre, p_new = probs[..., :S].astype(v_prefix.dtype), probs[..., S:].astype(vn.dtype)
    out = jnp.einsum("bkqs,bkse->bkqe", p_pre, v_prefix)
    out = out + jnp.einsum("bkqj,bkje->bkqe", p_new, vn)
    return out.reshape(B, K, T, G, E).transpose(0, 2, 1, 3, 4).reshape(B, T, H, E)
