"""Attention over a committed prefix plus in-flight tokens (dense-mask reference path).

The T in-flight query tokens of row b attend to
  * the committed prefix: cache slots `s < lengths[b]` (key position = s), and
  * the in-flight tokens themselves, written at slots `lengths[b] + j`, where `inflight[b, t, j]`
    (causal for plain decoding and prefill, the ancestor mask for a token tree),
optionally restricted to a sliding window over positions. GQA is computed by grouping the H query
heads into K groups of G (`BTKGE`), never by repeating K/V. Softmax is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxspec.types import Array, Bool, Float, Int

NEG_INF = -1e30


def build_mask(
    lengths: Int[Array, " B"],
    positions: Int[Array, "B T"],
    inflight: Bool[Array, "#B T T"],
    num_slots: int,
    sliding_window: int | None = None,
) -> Bool[Array, "B T S"]:
    """Which cache slots each in-flight query may attend to (shared by all layers)."""
    B, T = positions.shape
    slot = jnp.arange(num_slots, dtype=jnp.int32)[None, :]  # [1, S]
    rel = slot - lengths[:, None]  # [B, S]: index among in-flight tokens
    prefix = (rel < 0)[:, None, :]  # [B, 1, S]
    in_idx = jnp.clip(rel, 0, T - 1)
    inflight = jnp.broadcast_to(inflight, (B, T, T))
    in_ok = jnp.take_along_axis(
        inflight, jnp.broadcast_to(in_idx[:, None, :], (B, T, num_slots)), 2
    )
    in_ok = in_ok & ((rel >= 0) & (rel < T))[:, None, :]
    mask = prefix | in_ok
    if sliding_window is not None:
        key_pos = jnp.where(rel < 0, slot, jnp.take_along_axis(positions, in_idx, axis=1))
        mask &= (positions[:, :, None] - key_pos[:, None, :]) < sliding_window
    return mask


def attend(
    q: Float[Array, "B T H E"],
    k: Float[Array, "B S K E"],
    v: Float[Array, "B S K E"],
    mask: Bool[Array, "B T S"],
) -> Float[Array, "B T H E"]:
    B, T, H, E = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, E)
    scores = jnp.einsum("btkge,bske->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (E**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bske->btkge", probs, v)
    return out.reshape(B, T, H, E)
