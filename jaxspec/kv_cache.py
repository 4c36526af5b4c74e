"""KV cache pytree with per-row committed lengths.

`k, v: [L, B, K, S, E]` (layers, rows, KV heads, slots, head dim; heads before slots so the
attention matmuls read the cache in place) and `lengths: int32[B]`.
Slots `[0, lengths[b])` hold row b's committed tokens, whose position equals their slot index.
Slots at and past `lengths[b]` are scratch: a forward writes its T in-flight tokens at
`[lengths[b], lengths[b] + T)` (writes past S are dropped) without advancing `lengths`; the caller
commits by advancing `lengths` (AR, prefill) or by gathering the accepted path first (trees).
Scratch slots are always masked, so garbage there never leaks.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from jaxspec.config import ModelConfig
from jaxspec.types import Array, Float, Int

LOGICAL_AXES = ("layers", "batch", "kv_heads", "kv_seq", None)


@struct.dataclass
class KVCache:
    k: Float[Array, "L B K S E"]
    v: Float[Array, "L B K S E"]
    lengths: Int[Array, " B"]

    @property
    def num_slots(self) -> int:
        return self.k.shape[3]


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, slots, cfg.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),  # two separate buffers: both are donated
        v=jnp.zeros(shape, dtype),
        lengths=jnp.zeros((batch,), jnp.int32),
    )


def cache_bytes(cfg: ModelConfig, batch: int, slots: int, itemsize: int) -> int:
    """Bytes the K and V arrays of `init_cache` occupy (for clear out-of-memory errors)."""
    return 2 * cfg.num_layers * batch * slots * cfg.num_kv_heads * cfg.head_dim * itemsize


def check_fits(cfg: ModelConfig, batch: int, slots: int, itemsize: int, what: str = "KV cache",
               available: int | None = None, copies: float = 1.1) -> int:  # fmt: skip
    """Raise `InputError` naming the size needed when `copies` × a [batch × slots] cache cannot
    fit in the device's available memory (`hardware.available_memory_bytes`, or `available`);
    returns the bytes of one cache. Decoding needs the cache once (it is donated) plus working
    space: 1.1 copies by default; callers that hold more (a benchmark keeping its prefilled rows
    and gathering them) pass more."""
    from jaxspec.errors import InputError
    from jaxspec.hardware import available_memory_bytes

    need = cache_bytes(cfg, batch, slots, itemsize)
    have = available_memory_bytes() if available is None else available
    if have is not None and need * copies > have:
        extra = f" (× {copies:g} working copies)" if copies > 1.5 else ""
        raise InputError(
            f"the {what} for batch {batch} × {slots} slots needs {need / 2**30:.2f} GiB{extra} "
            f"({cfg.num_layers} layers × {cfg.num_kv_heads} KV heads × {cfg.head_dim} dims × "
            f"{itemsize}-byte K and V), but only {have / 2**30:.2f} GiB is available: use a "
            f"smaller batch, shorter prompts or fewer new tokens"
        )
    return need


def advance(cache: KVCache, n: Int[Array, " B"]) -> KVCache:
    """Commit the first n[b] in-flight tokens of each row (they were written at lengths[b]...)."""
    return cache.replace(lengths=cache.lengths + n.astype(jnp.int32))
