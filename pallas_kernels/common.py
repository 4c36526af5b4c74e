"""Shared pieces of the attention kernels: input validation, backend dispatch, the online-softmax
block update used inside the kernels, and the exact log-sum-exp merge of partial results.

Conventions (letters as in `jaxspec.types`):
  q        [B, T, H, E]   in-flight queries (T tree nodes / chain tokens / a prefill segment)
  k_cache  [B, K, S, E]   the layer's cache; slots `s < lengths[b]` are row b's committed prefix
  v_cache  [B, K, S, E]   (key position = slot index); slots at and past `lengths[b]` are scratch
  lengths  [B]            committed prefix length per row, 0 <= lengths[b] <= S
  k_new    [B, T, K, E]   the in-flight tokens' own K/V
  v_new    [B, T, K, E]
  inflight [#B, T, T]     bool: which in-flight tokens each in-flight token sees (ancestor mask)
GQA: query head h uses KV head h // G (G = H / K). Inside the kernels the G heads of a KV head and
the T tokens are flattened into R = T * G query rows (row t * G + g), padded to a power of two.

Attention is computed as a *prefix part* (cache slots, read once for all R rows, split over the
sequence into `num_splits` partial results per (row, KV head)) and an *in-flight part* (the T new
keys under the ancestor mask, taken by split 0), the partials merged exactly by log-sum-exp.
Scores, softmax statistics and accumulators are float32; inside the kernels scores are taken in
base-2 units (s·log2 e, so the softmax needs only `exp2`, the GPU's ex2 instruction) and the
partials' running maxima m are in those units too. Masked keys contribute exactly nothing:
their scores are replaced (not added to) and their values zeroed, so NaN or garbage in masked or
padded K/V never leaks.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

Impl = Literal["auto", "pallas", "reference"]
IMPLS = ("auto", "pallas", "reference")
NEG_INF = -1e30  # finite: exp(NEG_INF - m) underflows to 0 without inf - inf = NaN
LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the prefix part. `block_kv`: cache slots per step (a power of two >= 16);
    `block_q`: query rows per program (a power of two >= 16; fewer rows than that are padded up to
    a power of two and handled by one program); `num_splits`: partial results per (row, KV head)
    along the sequence (None: enough programs to fill the device, flash-decoding style);
    `num_warps`/`num_stages`: GPU launch parameters; `fast_exp`: exp2 by the GPU's approximate
    `ex2.approx.ftz.f32` instruction (relative error ~2^-22), else libdevice's exp2f (interpret
    mode always uses jnp.exp2)."""

    block_kv: int = 64
    block_q: int = 64
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3  # defaults: the best of a sweep on an H100 (BENCHMARKS.md)
    fast_exp: bool = True

    def __post_init__(self):
        if self.block_kv < 16 or self.block_kv & (self.block_kv - 1):
            raise ValueError(f"block_kv must be a power of two >= 16, got {self.block_kv}")
        if self.block_q < 16 or self.block_q & (self.block_q - 1):
            raise ValueError(f"block_q must be a power of two >= 16, got {self.block_q}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {self.num_splits}")


def validate(
    q, k_cache, v_cache, lengths, k_new, v_new, inflight, block_indices=None, k_slot_last=False
) -> tuple[int, ...]:
    """One validation shared by the reference and the kernel: returns (B, T, H, K, S, E).
    `k_slot_last`: k_cache is [B, K, E, S] (the CPU cache layout of unrolled weights)."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, E], got shape {q.shape}")
    B, T, H, E = q.shape
    if v_cache.ndim != 4 or v_cache.shape[0] != B or v_cache.shape[3] != E:
        raise ValueError(f"v_cache must be [B={B}, K, S, E={E}], got shape {v_cache.shape}")
    K, S = v_cache.shape[1], v_cache.shape[2]
    want = (B, K, E, S) if k_slot_last else (B, K, S, E)
    if k_cache.shape != want:
        form = "[B, K, E, S] (k_slot_last)" if k_slot_last else "[B, K, S, E]"
        raise ValueError(f"k_cache must be {form} = {want}, got shape {k_cache.shape}")
    if H % K:
        raise ValueError(f"query heads H={H} are not a multiple of KV heads K={K}")
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if x.shape != (B, T, K, E):
            raise ValueError(f"{name} must be [B, T, K, E] = {(B, T, K, E)}, got {x.shape}")
    if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be int[B={B}], got {lengths.dtype}{list(lengths.shape)}")
    if inflight.ndim != 3 or inflight.shape[0] not in (1, B) or inflight.shape[1:] != (T, T):
        raise ValueError(f"inflight mask must be bool[#B, T={T}, T={T}], got {inflight.shape}")
    if inflight.dtype != jnp.bool_:
        raise ValueError(f"inflight mask must be bool, got {inflight.dtype}")
    if block_indices is not None:
        if block_indices.ndim != 3 or block_indices.shape[:2] != (B, K):
            raise ValueError(
                f"block_indices must be int[B={B}, K={K}, NB], got {block_indices.shape}"
            )
        if not jnp.issubdtype(block_indices.dtype, jnp.integer):
            raise ValueError(f"block_indices must be integer, got {block_indices.dtype}")
    return B, T, H, K, S, E


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def dispatch(name: str, impl: str, pallas_fn, reference_fn, dtype=None):
    """`reference`: the pure-jnp spec (the CPU path). `pallas`: the kernel (interpret mode off the
    GPU). `auto`: on a GPU, the kernel for 16-bit inputs, falling back to the reference only when
    the kernel raises NotImplementedError for these inputs; the reference elsewhere and for
    float32 inputs (the kernel's exact float32 matmuls measured 1.5x slower than XLA's tf32 ones
    for 62-node trees on an H100; `pallas` still forces the kernel)."""
    if impl not in IMPLS:
        raise ValueError(f"{name}: impl must be one of {IMPLS}, got {impl!r}")
    wide = dtype is not None and jnp.dtype(dtype).itemsize > 2
    if impl == "reference" or (impl == "auto" and (not on_gpu() or wide)):
        return reference_fn()
    if impl == "pallas":
        return pallas_fn(interpret=not on_gpu())
    try:
        return pallas_fn(interpret=False)
    except NotImplementedError:
        return reference_fn()


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


def group_queries(q: Float[Array, "B T H E"], K: int, rows: int) -> Float[Array, "B K Rp E"]:
    """[B, T, H, E] -> [B, K, Rp, E] with row t*G + g = query head k*G + g of token t, scaled by
    E**-0.5 and zero-padded to `rows` rows."""
    B, T, H, E = q.shape
    G = H // K
    qg = q.reshape(B, T, K, G, E).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, E)
    qg = qg * jnp.asarray(E**-0.5, q.dtype)
    return jnp.pad(qg, ((0, 0), (0, 0), (0, rows - T * G), (0, 0)))


def row_tiling(R: int, block_q: int) -> tuple[int, int]:
    """(rows per program bq, padded rows Rp): bq is a power of two >= 16, Rp a multiple of bq."""
    bq = min(block_q, next_pow2(R))
    return bq, -(-R // bq) * bq


def tree_keys(
    k_new: Float[Array, "B T K E"],
    v_new: Float[Array, "B T K E"],
    inflight: Bool[Array, "#B T T"],
    G: int,
    Rp: int,
) -> tuple[Float[Array, "B K Tp E"], Float[Array, "B K Tp E"], Int[Array, "#B Rp Tp"]]:
    """The in-flight keys/values as [B, K, Tp, E] (Tp: a power of two >= 16, zero-padded) and the
    mask per query row, int8 [#B, Rp, Tp] (row t*G + g sees what token t sees)."""
    T = k_new.shape[1]
    Tp = next_pow2(T)
    pad = ((0, 0), (0, 0), (0, Tp - T), (0, 0))
    kn = jnp.pad(k_new.transpose(0, 2, 1, 3), pad)
    vn = jnp.pad(v_new.transpose(0, 2, 1, 3), pad)
    mask = jnp.repeat(inflight, G, axis=1)
    mask = jnp.pad(mask, ((0, 0), (0, Rp - T * G), (0, Tp - T))).astype(jnp.int8)
    return kn, vn, mask


def ungroup(out: Float[Array, "B K Rp E"], T: int, H: int) -> Float[Array, "B T H E"]:
    B, K, _, E = out.shape
    G = H // K
    return out[:, :, : T * G].reshape(B, K, T, G, E).transpose(0, 2, 1, 3, 4).reshape(B, T, H, E)


def auto_splits(num_splits: int | None, blocks: int, parallel: int, programs: int = 264) -> int:
    """Sequence splits so that `parallel` * splits programs fill the device (two per SM of an
    H100), never more splits than there are KV blocks to walk."""
    if num_splits is not None:
        return num_splits
    return max(1, min(blocks, -(-programs // parallel)))


# --- inside the kernels -----------------------------------------------------------------------


def init_carry(rows: int, E: int):
    f32 = jnp.float32
    return (
        jnp.full((rows,), NEG_INF, f32),
        jnp.zeros((rows,), f32),
        jnp.zeros((rows, E), f32),
    )


def block_update(q, k, v, valid, carry, dot, exp2):
    """One online-softmax step over a block of keys. q [R, E] (pre-scaled by E**-0.5), k/v
    [BK, E], valid bool[BK] or [R, BK], or None for a block known to be all visible (no masking
    work); carry = (running max m [R] in base-2 units, sum l [R], accumulator acc [R, E]).
    `dot(a, b, trans_b)` is the backend's matmul with float32 accumulation, `exp2` its 2**x."""
    m, den, acc = carry
    s = dot(q, k, True) * LOG2E
    if valid is not None:
        if valid.ndim == 1:
            valid_s, valid_v = valid[None, :], valid[:, None]
        else:  # keys seen by some row (a max, not jnp.any: Triton lowering has no reduce_or)
            valid_s, valid_v = valid, (jnp.max(valid.astype(jnp.int32), axis=0) > 0)[:, None]
        s = jnp.where(valid_s, s, NEG_INF)
        v = jnp.where(valid_v, v, jnp.zeros_like(v))
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = exp2(m - m_new)
    p = exp2(s - m_new[:, None])
    if valid is not None:
        p = jnp.where(valid_s, p, 0.0)
    den = den * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, False)
    return m_new, den, acc


# --- after the kernels ------------------------------------------------------------------------


def merge(
    m_p: Float[Array, "B K P Rp"],
    l_p: Float[Array, "B K P Rp"],
    acc_p: Float[Array, "B K P Rp E"],
    R: int,
) -> Float[Array, "B K R E"]:
    """Exact log-sum-exp merge of the per-split partials (first R rows; m in base-2 units); rows
    that saw no key at all come out as zeros."""
    m_p, l_p, acc_p = m_p[..., :R], l_p[..., :R], acc_p[..., :R, :]
    if m_p.shape[2] == 1:
        den, acc = l_p[:, :, 0], acc_p[:, :, 0]
    else:
        w = jnp.exp2(m_p - jnp.max(m_p, axis=2, keepdims=True))
        den = jnp.sum(l_p * w, axis=2)
        acc = jnp.sum(acc_p * w[..., None], axis=2)
    return acc / jnp.where(den == 0, 1.0, den)[..., None]
