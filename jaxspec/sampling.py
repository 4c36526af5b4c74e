"""Logit transforms and samplers shared by decoding, drafting and verification.

Per-row sampling parameters are arrays (`SamplingParams`), so changing them never recompiles:
  temperature f32[B]  0 means greedy (argmax); otherwise logits / temperature
  top_k       i32[B]  0 disables; keeps the k largest logits
  top_p       f32[B]  1 disables; keeps the smallest set of tokens whose mass reaches top_p
Order (as in transformers): temperature → top-k → top-p. Masked logits are -inf; probabilities
and uniforms are float32. Randomness always comes from an explicit PRNG key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.errors import InputError
from jaxspec.types import Array, Float, Int, PRNGKeyArray


@struct.dataclass
class SamplingParams:
    temperature: Float[Array, " B"]
    top_k: Int[Array, " B"]
    top_p: Float[Array, " B"]

    @classmethod
    def make(cls, batch: int, temperature=0.0, top_k=0, top_p=1.0) -> SamplingParams:
        """Validated per-row parameters (scalars are broadcast to every row)."""
        t = np.broadcast_to(np.asarray(temperature, np.float32), (batch,))
        k = np.broadcast_to(np.asarray(top_k, np.int32), (batch,))
        p = np.broadcast_to(np.asarray(top_p, np.float32), (batch,))
        if not np.all(np.isfinite(t)) or np.any(t < 0):
            raise InputError(f"temperature must be a finite number >= 0, got {temperature}")
        if np.any(k < 0):
            raise InputError(f"top_k must be >= 0 (0 disables it), got {top_k}")
        if not np.all(np.isfinite(p)) or np.any(p <= 0) or np.any(p > 1):
            raise InputError(f"top_p must be in (0, 1], got {top_p}")
        return cls(jnp.asarray(t), jnp.asarray(k), jnp.asarray(p))


def process_logits(logits: Float[Array, "B V"], sp: SamplingParams) -> Float[Array, "B V"]:
    """Temperature, top-k and top-p applied; removed tokens get -inf. Rows with T = 0 are left
    at temperature 1 (their caller takes the argmax)."""
    V = logits.shape[-1]
    t = jnp.where(sp.temperature > 0, sp.temperature, 1.0)
    x = logits.astype(jnp.float32) / t[:, None]
    sorted_x = -jnp.sort(-x, axis=-1)  # descending
    k = jnp.where(sp.top_k > 0, jnp.minimum(sp.top_k, V), V)
    kth = jnp.take_along_axis(sorted_x, (k - 1)[:, None], axis=-1)  # [B, 1]
    sorted_x = jnp.where(jnp.arange(V)[None, :] < k[:, None], sorted_x, -jnp.inf)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly larger tokens
    keep = (mass_before < sp.top_p[:, None]) & (jnp.arange(V)[None, :] < k[:, None])
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    pth = jnp.take_along_axis(sorted_x, (n_keep - 1)[:, None], axis=-1)
    threshold = jnp.maximum(kth, pth)
    return jnp.where(x >= threshold, x, -jnp.inf)


def probs(logits: Float[Array, "B V"], sp: SamplingParams) -> Float[Array, "B V"]:
    """float32 distribution after all transforms (one-hot argmax for greedy rows). The sort
    behind top-k/top-p is skipped entirely when every row is greedy."""
    greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)

    def full(_):
        p = jax.nn.softmax(process_logits(logits, sp), axis=-1)
        return jnp.where((sp.temperature > 0)[:, None], p, greedy)

    return jax.lax.cond(jnp.any(sp.temperature > 0), full, lambda _: greedy, None)


def sample(logits: Float[Array, "B V"], sp: SamplingParams, key: PRNGKeyArray) -> Int[Array, " B"]:
    """One token per row: argmax where temperature == 0, else a draw from the processed logits.
    The sort behind top-k/top-p is skipped entirely when every row is greedy."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        drawn = jax.random.categorical(key, process_logits(logits, sp), axis=-1)
        return jnp.where(sp.temperature > 0, drawn.astype(jnp.int32), greedy)

    return jax.lax.cond(jnp.any(sp.temperature > 0), draw, lambda _: greedy, None)
