"""KV cache pytree with per-row committed lengths.

`k, v: [L, B, K, S, E]` (layers, rows, KV heads, slots, head dim; heads before slots so the
attention matmuls read the cache in place) and `lengths: int32[B]`. With `k_slot_last` (a static
field; caches built for unrolled weights, `jaxspec.model.unrolled`) K is stored `[L, B, K, E, S]`:
the score matmul q·Kᵀ then reads K with its slots contiguous, which XLA:CPU runs ~30% faster at
batch 8. Code that moves slots between caches goes through `gather_slots` / `scatter_slots` /
`k_std`, which hide the K layout.
Slots `[0, lengths[b])` hold row b's committed tokens, whose position equals their slot index.
Slots at and past `lengths[b]` are scratch: a forward writes its T in-flight tokens at
`[lengths[b], lengths[b] + T)` (writes past S are dropped) without advancing `lengths`; the caller
commits by advancing `lengths` (AR, prefill) or by writing or gathering the accepted path
first (trees).
Scratch slots are always masked, so garbage there never leaks.

Per-layer caches (`layered()`; what decoding with unrolled weights uses, `spec_prefill`): `k`
and `v` are tuples of L arrays, `[B, K, S, E]` each (K `[B, K, E, S]` slot-last), so each layer's
attention reads its own buffer in place. A layer sliced out of the stacked `[L, ...]` array is a
copy on XLA:CPU (read, write, read again: at batch 4 × 4096 slots an AR step took 110 ms
stacked and 83 ms per-layer; `scripts/bench_cache_layout.py`). A per-layer cache holds finite
values only: `layered()` and every write store non-finite K/V as 0. Its attention therefore skips
zeroing V's scratch slots (another cache-sized copy per layer): masked probabilities times finite
values are exactly 0.
`stacked()` converts back; `gather_slots` / `scatter_slots` / `k_std` / `v_std` take both forms.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from jaxspec.config import ModelConfig
from jaxspec.types import Array, Float, Int

LOGICAL_AXES = ("layers", "batch", "kv_heads", "kv_seq", None)


@struct.dataclass
class KVCache:
    k: Float[Array, "L B K S E"]  # [L, B, K, E, S] when k_slot_last; per layer: a tuple
    v: Float[Array, "L B K S E"]
    lengths: Int[Array, " B"]
    k_slot_last: bool = struct.field(pytree_node=False, default=False)

    @property
    def per_layer(self) -> bool:
        """Whether K and V are tuples of per-layer arrays (`layered`)."""
        return isinstance(self.v, tuple)

    @property
    def num_layers(self) -> int:
        return len(self.v) if self.per_layer else self.v.shape[0]

    @property
    def num_slots(self) -> int:
        return self.v[0].shape[2] if self.per_layer else self.v.shape[3]

    @property
    def dtype(self):
        return self.v[0].dtype if self.per_layer else self.v.dtype

    def layered(self) -> KVCache:
        """The same cache held per layer (a copy, non-finite values stored as 0; see the module
        docstring)."""
        if self.per_layer:
            return self
        L = self.num_layers
        return self.replace(k=tuple(_finite(self.k[i]) for i in range(L)),
                            v=tuple(_finite(self.v[i]) for i in range(L)))  # fmt: skip

    def stacked(self) -> KVCache:
        """The same cache with K and V stacked `[L, ...]` (a copy when held per layer)."""
        if not self.per_layer:
            return self
        return self.replace(k=jnp.stack(self.k), v=jnp.stack(self.v))

    def v_std(self) -> Float[Array, "L B K S E"]:
        """V as one [L, B, K, S, E] array (a copy when held per layer)."""
        return self.stacked().v

    @property
    def k_axes(self) -> tuple:
        """Logical axis names of `k` (sharding)."""
        return K_SLOT_LAST_AXES if self.k_slot_last else LOGICAL_AXES

    def k_std(self) -> Float[Array, "L B K S E"]:
        """K as [L, B, K, S, E] (a transposed copy when stored slot-last)."""
        k = self.stacked().k
        return k.swapaxes(3, 4) if self.k_slot_last else k

    def gather_slots(
        self, rows: Int[Array, "B 1"], slots: Int[Array, "B J"]
    ) -> tuple[Float[Array, "B J L K E"], Float[Array, "B J L K E"]]:
        """K and V of slot slots[b, j] of row rows[b], every layer: [B, J, L, K, E] each."""
        if self.per_layer:  # [B, J, K, E] per layer, stacked on axis 2
            k = [x[rows, :, :, slots] if self.k_slot_last else x[rows, :, slots] for x in self.k]
            return jnp.stack(k, axis=2), jnp.stack([x[rows, :, slots] for x in self.v], axis=2)
        k = self.k[:, rows, :, :, slots] if self.k_slot_last else self.k[:, rows, :, slots]
        return k, self.v[:, rows, :, slots]

    def scatter_slots(
        self,
        rows: Int[Array, "B 1"],
        slots: Int[Array, "B J"],
        k_rows: Float[Array, "B J L K E"],
        v_rows: Float[Array, "B J L K E"],
    ) -> KVCache:
        """The cache with K/V [B, J, L, K, E] written at slot slots[b, j] of row rows[b] (slots
        past the end are dropped); `lengths` unchanged."""
        k_rows, v_rows = k_rows.astype(self.dtype), v_rows.astype(self.dtype)
        if self.per_layer:  # finite values only (the module docstring)
            k_rows, v_rows = _finite(k_rows), _finite(v_rows)
            k = tuple(
                x.at[rows, :, :, slots].set(k_rows[:, :, i], mode="drop") if self.k_slot_last
                else x.at[rows, :, slots].set(k_rows[:, :, i], mode="drop")
                for i, x in enumerate(self.k)
            )  # fmt: skip
            v = tuple(x.at[rows, :, slots].set(v_rows[:, :, i], mode="drop")
                      for i, x in enumerate(self.v))  # fmt: skip
            return self.replace(k=k, v=v)
        if self.k_slot_last:
            k = self.k.at[:, rows, :, :, slots].set(k_rows, mode="drop")
        else:
            k = self.k.at[:, rows, :, slots].set(k_rows, mode="drop")
        return self.replace(k=k, v=self.v.at[:, rows, :, slots].set(v_rows, mode="drop"))


def _finite(x: Array) -> Array:
    """x with its non-finite values replaced by 0."""
    return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


K_SLOT_LAST_AXES = ("layers", "batch", "kv_heads", None, "kv_seq")


def with_k_layout(cache: KVCache, k_slot_last: bool) -> KVCache:
    """The same cache with K stored slot-last or not (a transposed copy when it changes)."""
    if cache.k_slot_last == k_slot_last:
        return cache
    if cache.per_layer:
        return cache.replace(k=tuple(x.swapaxes(2, 3) for x in cache.k), k_slot_last=k_slot_last)
    return cache.replace(k=cache.k.swapaxes(3, 4), k_slot_last=k_slot_last)


def init_cache(
    cfg: ModelConfig, batch: int, slots: int, dtype=jnp.float32, k_slot_last: bool = False
) -> KVCache:
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, slots, cfg.head_dim)
    k_shape = shape[:3] + (cfg.head_dim, slots) if k_slot_last else shape
    return KVCache(
        k=jnp.zeros(k_shape, dtype),  # two separate buffers: both are donated
        v=jnp.zeros(shape, dtype),
        lengths=jnp.zeros((batch,), jnp.int32),
        k_slot_last=k_slot_last,
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
