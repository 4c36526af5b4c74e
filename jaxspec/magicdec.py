"""MagicDec's draft cache: a fixed-size sparse KV cache per row (attention sink + sliding window).

ALGORITHMS.md §1. The draft (the target's own weights for self-speculation, or a small draft
model) reads a compact `KVCache` of `budget + scratch` slots instead of the full context, so its
step costs O(budget) KV reads however long the context grows.

Layout of the compact cache (`F` fixed slots, a ring of `W = budget − F` window slots):
  * slots [0, F)        the fixed entries: the first F tokens (StreamingLLM's attention sinks,
                        `sink`), or for SnapKV the F = budget − obs_window selected tokens;
  * slots [F, budget)   a ring over the most recent tokens: the committed token with position
                        t ≥ ring0 lives at slot F + (t − ring0) mod W (t < ring0: slot t). The
                        window SLIDES: each commit overwrites the oldest window entries;
  * slots [n_valid, …)  scratch for the in-flight tree (the unchanged model forward writes the
                        T in-flight K/V rows at lengths + t and reads the prefix [0, lengths)).
`lengths` of the compact cache = n_valid = the number of valid committed slots (≤ budget); the
row's true committed length `total` is the target cache's length. Keys are stored rotated at
their absolute positions, and queries use absolute positions. Attention depends only on
position differences, and the window is contiguous and ends right before the queries, so this
equals StreamingLLM's re-indexing inside the cache (window keys at slots F…, the query at
n_valid) for the window; the fixed entries are re-indexed explicitly: before each draft pass
their keys are rotated from a canonical copy (`DraftRing.fixed_k`, rotated at positions 0…F−1)
by shift = total − n_valid, which places sink s at position s + shift, i.e. just before the
window (`reindex`; off for SnapKV, whose positions stay absolute as in the reference).

Builders (`MagicDec.builder`):
  * "copy"      the drafting model's dense prompt KV (the target's own cache for self-spec) is
                gathered into the sink and window slots (cheap; not the reference's re-prefill:
                flag it in results);
  * "streaming" a separate chunked prefill of the prompt by the draft with streaming attention
                (each chunk sees sink + window + itself), as the reference does;
  * "snapkv"    (self-spec) SnapKV selection over the target's prompt KV (`snapkv_select`).
During decoding the accepted tokens' KV enters the window: the target's exact KV for
self-speculation with the copy/SnapKV builders (as the SnapKV reference), the draft's own KV
otherwise (as the StreamingLLM reference).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec.config import ModelConfig
from jaxspec.errors import ConfigError
from jaxspec.kv_cache import KVCache, init_cache, with_k_layout
from jaxspec.model import forward_hidden, k_slot_last_for, stacked
from jaxspec.model.layers import apply_rope, rope_inv_freq
from jaxspec.model.params import Params
from jaxspec.types import Array, Float, Int

BUILDERS = ("copy", "streaming", "snapkv")


@dataclasses.dataclass(frozen=True)
class MagicDec:
    budget: int = 512  # committed draft-cache slots per row (fixed + window)
    sink: int = 16  # StreamingLLM attention sinks (copy/streaming builders)
    builder: str = "copy"
    self_draft: bool = True  # the draft is the target's weights
    obs_window: int = 32  # SnapKV: observation window (last queries) = its recent window
    pool: int = 5  # SnapKV: average-pooling kernel over keys

    def __post_init__(self):
        if self.builder not in BUILDERS:
            raise ConfigError(f"unknown draft-cache builder {self.builder!r}; choose {BUILDERS}")
        if self.sink < 0:
            raise ConfigError(f"sink must be >= 0, got {self.sink}")
        if self.builder == "snapkv":
            if not self.self_draft:
                raise ConfigError("the snapkv builder selects from the target's KV: it needs "
                                  "self-speculation (no separate draft model)")  # fmt: skip
            if not 0 < self.obs_window < self.budget:
                raise ConfigError(
                    f"snapkv needs 0 < obs_window ({self.obs_window}) < budget ({self.budget})"
                )
            if self.pool < 1 or self.pool % 2 == 0:
                raise ConfigError(f"snapkv pooling kernel must be odd and >= 1, got {self.pool}")
        elif self.budget <= self.sink:
            raise ConfigError(
                f"draft budget ({self.budget}) must exceed the sink ({self.sink}) to leave a window"
            )

    @property
    def fixed(self) -> int:
        return self.budget - self.obs_window if self.builder == "snapkv" else self.sink

    @property
    def window(self) -> int:
        return self.budget - self.fixed

    @property
    def reindex(self) -> bool:
        return self.builder != "snapkv"

    @property
    def commit_target_kv(self) -> bool:
        """Whether accepted tokens enter the draft window with the target's exact KV."""
        return self.self_draft and self.builder != "streaming"

    def check(self, num_nodes: int, draft: ModelConfig):
        """Checks that need the tree size and the draft model."""
        if self.window < num_nodes:
            raise ConfigError(
                f"the draft window ({self.window} slots = budget {self.budget} - "
                f"{self.fixed} fixed) must hold one step's {num_nodes} in-flight tokens"
            )
        if draft.sliding_window is not None:
            raise ConfigError("MagicDec's compact draft cache does not support sliding-window "
                              "attention models")  # fmt: skip


@struct.dataclass
class DraftRing:
    """Per-row bookkeeping of the compact cache (the `KVCache` holds K/V and n_valid)."""

    fixed_k: Float[Array, "L B K F E"]  # canonical fixed keys, rotated at positions 0..F-1
    ring0: Int[Array, " B"]  # the position of the token at window slot F


def n_valid(md: MagicDec, total: Int[Array, " B"], ring0: Int[Array, " B"]) -> Int[Array, " B"]:
    """Valid committed slots of rows that have committed `total` tokens."""
    return jnp.where(total < ring0, total, jnp.minimum(md.budget, md.fixed + total - ring0))


def slot_of(md: MagicDec, t: Int[Array, "B J"], ring0: Int[Array, "B 1"]) -> Int[Array, "B J"]:
    return jnp.where(t < ring0, t, md.fixed + (t - ring0) % md.window)


def prepare(md: MagicDec, cfg: ModelConfig, dcache: KVCache, ring: DraftRing, total) -> KVCache:
    """The compact cache ready for a draft pass of rows at committed length `total`: lengths =
    n_valid and (StreamingLLM re-indexing) the fixed keys rotated to sit before the window."""
    nv = n_valid(md, total, ring.ring0)
    dcache = dcache.replace(lengths=nv)
    if not md.reindex or md.fixed == 0:
        return dcache
    L, B, K, F, E = ring.fixed_k.shape
    x = ring.fixed_k.transpose(1, 0, 3, 2, 4).reshape(B, L * F, K, E)
    shift = jnp.broadcast_to((total - nv)[:, None], (B, L * F))
    x = apply_rope(x, shift, rope_inv_freq(cfg)).reshape(B, L, F, K, E).transpose(1, 0, 3, 2, 4)
    x = (x.swapaxes(3, 4) if dcache.k_slot_last else x).astype(dcache.dtype)  # K's layout
    axis = 3 if dcache.k_slot_last else 2  # the slot axis of one layer's K
    if dcache.per_layer:  # each layer's buffer updated in place (finite: rotated finite keys)
        k = tuple(jax.lax.dynamic_update_slice_in_dim(y, x[i], 0, axis)
                  for i, y in enumerate(dcache.k))  # fmt: skip
    else:
        k = jax.lax.dynamic_update_slice_in_dim(dcache.k, x, 0, axis + 1)
    return dcache.replace(k=k)


def commit(
    md: MagicDec,
    dcache: KVCache,
    ring: DraftRing,
    src: KVCache,
    src_start: Int[Array, " B"],
    idx: Int[Array, "B J"],
    count: Int[Array, " B"],
    total: Int[Array, " B"],
) -> tuple[KVCache, DraftRing]:
    """Commit, for each row, the `count[b]` in-flight rows src[src_start + idx[b, j]] (j <
    count) as the tokens at positions total + j: into their ring slots (evicting the oldest
    window entries) and, for positions < F, into the canonical fixed keys."""
    B, J = idx.shape
    rows = jnp.arange(B)[:, None]
    j = jnp.arange(J)[None]
    t = total[:, None] + j
    live = j < count[:, None]
    s = src_start[:, None] + idx
    k_rows, v_rows = src.gather_slots(rows, s)  # [B, J, L, K, E]
    dst = jnp.where(live, slot_of(md, t, ring.ring0[:, None]), dcache.num_slots)
    dcache = dcache.scatter_slots(rows, dst, k_rows, v_rows)
    fixed_k = ring.fixed_k
    if md.reindex and md.fixed:
        fdst = jnp.where(live & (t < md.fixed), t, md.fixed)
        fixed_k = fixed_k.at[:, rows, :, fdst].set(k_rows.astype(fixed_k.dtype), mode="drop")
    nv = n_valid(md, total + count, ring.ring0)
    return dcache.replace(lengths=nv), ring.replace(fixed_k=fixed_k)


def empty(md: MagicDec, cfg: ModelConfig, batch: int, scratch: int, dtype,
          k_slot_last: bool = False) -> tuple:  # fmt: skip
    """An empty compact cache (budget + scratch slots) and its ring (ring0 = F)."""
    dcache = init_cache(cfg, batch, md.budget + scratch, dtype, k_slot_last)
    fixed = jnp.zeros((cfg.num_layers, batch, cfg.num_kv_heads, md.fixed, cfg.head_dim), dtype)
    return dcache, DraftRing(fixed_k=fixed, ring0=jnp.full((batch,), md.fixed, jnp.int32))


def build_copy(md: MagicDec, dense: KVCache, scratch: int) -> tuple[KVCache, DraftRing]:
    """The compact cache of rows whose dense cache `dense` holds lengths[b] prompt tokens (slot
    = position): the first F tokens and the last window tokens, in their ring slots; K in the
    dense cache's layout."""
    dcache, ring = _copy_std(md, dense, scratch)
    return with_k_layout(dcache, dense.k_slot_last), ring


def _copy_std(md: MagicDec, dense: KVCache, scratch: int) -> tuple[KVCache, DraftRing]:
    """`build_copy` with K as [L, B, K, S, E] whatever the dense cache's layout."""
    P = dense.lengths
    B = P.shape[0]
    c = jnp.arange(md.budget)[None]  # compact slot
    # the latest position t < P with slot_of(t) == c (ring0 = F): t = c + W·⌊(P − 1 − c) / W⌋
    t = jnp.where(c < md.fixed, c, c + md.window * ((P[:, None] - 1 - c) // md.window))
    t = jnp.clip(t, 0, dense.num_slots - 1)  # invalid slots (c ≥ P) are masked by n_valid
    rows = jnp.arange(B)[:, None]
    pad = ((0, 0), (0, 0), (0, 0), (0, scratch), (0, 0))
    k_rows, v_rows = dense.gather_slots(rows, t)  # [B, budget, L, K, E]
    k = jnp.pad(k_rows.transpose(2, 0, 3, 1, 4), pad)  # [L, B, K, budget, E]
    v = jnp.pad(v_rows.transpose(2, 0, 3, 1, 4), pad)
    ring = DraftRing(fixed_k=k[:, :, :, : md.fixed], ring0=jnp.full((B,), md.fixed, jnp.int32))
    return KVCache(k=k, v=v, lengths=n_valid(md, P, ring.ring0)), ring


def build_streaming(
    md: MagicDec,
    params: Params,
    cfg: ModelConfig,
    prompts: Int[Array, "B P"],
    prompt_lengths: Int[Array, " B"],
    *,
    chunk: int,
    scratch: int,
) -> tuple[KVCache, DraftRing]:
    """StreamingLLM prefill: chunks of `chunk` tokens, each attending to sink + window + itself
    (causal), their own KV committed into the ring after each chunk."""
    B, P = prompts.shape
    if P % chunk or chunk > md.window:
        raise ConfigError(f"streaming prefill chunk {chunk} must divide the padded prompt "
                          f"({P}) and fit the window ({md.window})")  # fmt: skip
    dcache, ring = empty(md, cfg, B, max(scratch, chunk), params.embed.dtype,
                         k_slot_last_for(params))  # fmt: skip
    idx = jnp.broadcast_to(jnp.arange(chunk, dtype=jnp.int32)[None], (B, chunk))
    params = stacked(params)  # prompt chunks scan the layers (`jaxspec.prefill`)

    def body(c, carry):
        dcache, ring = carry
        total = jnp.minimum(prompt_lengths, c * chunk)
        dcache = prepare(md, cfg, dcache, ring, total)
        toks = jax.lax.dynamic_slice_in_dim(prompts, c * chunk, chunk, axis=1)
        positions = total[:, None] + jnp.arange(chunk, dtype=jnp.int32)[None]
        _, written = forward_hidden(params, cfg, toks, positions, dcache)
        count = jnp.clip(prompt_lengths - c * chunk, 0, chunk)
        return commit(md, written, ring, written, dcache.lengths, idx, count, total)

    return jax.lax.fori_loop(0, P // chunk, body, (dcache, ring))


def snapkv_select(
    md: MagicDec,
    q_obs: Float[Array, "L B T H E"],
    k: Float[Array, "L B K S E"],
    lengths: Int[Array, " B"],
) -> Int[Array, "L B K F"]:
    """SnapKV: per (layer, row, KV head) the F = budget − obs_window positions before the
    observation window with the highest pooled attention from the window's T queries (query t
    of row b sits at position lengths[b] − T + t): softmax over the causal prefix, summed over
    the queries, average-pooled along keys (kernel `pool`, stride 1, zero padding counted), summed
    over the G query heads of each KV head. Rows with lengths ≤ budget select nothing useful
    (their whole prompt fits; `build_snapkv` keeps it as is)."""
    L, B, T, H, E = q_obs.shape
    K, S = k.shape[2], k.shape[3]
    G = H // K
    start = lengths - T
    qpos = start[:, None] + jnp.arange(T)[None]  # [B, T]
    kpos = jnp.arange(S)
    valid = (kpos[None, None] <= qpos[:, :, None]) & (kpos[None, None] < lengths[:, None, None])
    pad = md.pool // 2

    def one_layer(args):
        q, kl = args  # [B, T, H, E], [B, K, S, E]
        s = jnp.einsum("btkge,bkse->bkgts", q.reshape(B, T, K, G, E).astype(jnp.float32),
                       kl.astype(jnp.float32)) / jnp.sqrt(jnp.float32(E))  # fmt: skip
        w = jax.nn.softmax(jnp.where(valid[:, None, None], s, -jnp.inf), axis=-1)
        w = jnp.where(valid[:, None, None], w, 0.0).sum(axis=3)  # [B, K, G, S]
        pooled = jax.lax.reduce_window(w, 0.0, jax.lax.add, (1, 1, 1, md.pool), (1, 1, 1, 1),
                                       ((0, 0), (0, 0), (0, 0), (pad, pad))) / md.pool  # fmt: skip
        score = jnp.where(kpos[None, None] < start[:, None, None], pooled.sum(axis=2), -jnp.inf)
        return jax.lax.top_k(score, md.fixed)[1].astype(jnp.int32)  # [B, K, F]

    return jax.lax.map(one_layer, (q_obs, k))


def build_snapkv(
    md: MagicDec,
    params: Params,
    cfg: ModelConfig,
    dense: KVCache,
    prompts: Int[Array, "B P"],
    prompt_lengths: Int[Array, " B"],
    scratch: int,
) -> tuple[KVCache, DraftRing]:
    """SnapKV's compact cache from the target's dense prompt cache (self-speculation): rows
    longer than the budget keep the selected F positions per (layer, KV head) in the fixed slots
    and their last obs_window tokens in the window (ring0 = length − obs_window); shorter rows
    keep their whole prompt (the copy layout). Positions stay absolute (no re-indexing). The
    observation window's queries are recomputed by one forward over its tokens."""
    T = md.obs_window
    P = prompt_lengths
    B = P.shape[0]
    start = jnp.maximum(P - T, 0)
    pos = jnp.clip(start[:, None] + jnp.arange(T)[None], 0, prompts.shape[1] - 1)
    toks = jnp.take_along_axis(prompts, pos, axis=1)
    # the forward's K/V writes are discarded (dead code); only the queries are used
    _, _, q_obs = forward_hidden(stacked(params), cfg, toks, pos, dense.replace(lengths=start),
                                 queries=True)  # fmt: skip
    dense_k = dense.k_std()  # [L, B, K, S, E]
    sel = snapkv_select(md, q_obs, dense_k, P)  # [L, B, K, F]
    gather = jnp.broadcast_to(sel[..., None], sel.shape + (dense_k.shape[-1],))
    fixed_k = jnp.take_along_axis(dense_k, gather, axis=3)
    fixed_v = jnp.take_along_axis(dense.v, gather, axis=3)
    rows = jnp.arange(B)[:, None]
    recent = jnp.clip(start[:, None] + jnp.arange(T)[None], 0, dense.num_slots - 1)  # [B, T]
    win_k, win_v = (x.transpose(2, 0, 3, 1, 4) for x in dense.gather_slots(rows, recent))
    long = (P > md.budget)[None, :, None, None, None]
    copy, _ = _copy_std(md, dense, scratch)
    k = jnp.where(long, jnp.pad(jnp.concatenate([fixed_k, win_k], axis=3),
                                ((0, 0),) * 3 + ((0, scratch), (0, 0))), copy.k)  # fmt: skip
    v = jnp.where(long, jnp.pad(jnp.concatenate([fixed_v, win_v], axis=3),
                                ((0, 0),) * 3 + ((0, scratch), (0, 0))), copy.v)  # fmt: skip
    ring0 = jnp.where(P > md.budget, start, md.fixed).astype(jnp.int32)
    L, _, K, _, E = dense_k.shape
    ring = DraftRing(fixed_k=jnp.zeros((L, B, K, 0, E), dense_k.dtype), ring0=ring0)
    dcache = KVCache(k=k, v=v, lengths=n_valid(md, P, ring0))
    return with_k_layout(dcache, dense.k_slot_last), ring
