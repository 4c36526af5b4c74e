"""The Llama-family forward pass: pure functions over `Params`; stacked layers are walked with
`lax.scan`, unrolled ones with a Python loop.

`forward(params, cfg, tokens, positions, cache, inflight)`:
  tokens    int32[B, T]   in-flight tokens (a prefill chunk, 1 token for AR, root + N tree nodes)
  positions int32[B, T]   explicit positions (lengths + t for a chain, lengths + depth for a tree)
  cache     KVCache       committed prefix per row (`lengths[b]` slots); the T new K/V rows are
                          written at slots lengths[b] + t, and `lengths` is NOT advanced
  inflight  bool[#B, T, T] which in-flight tokens each in-flight token sees (None = causal)
returns float32 logits [B, T, V] and the cache with the new K/V written.

Inside the layers the cache is only read (prefix attention); the T new K/V rows of every layer
are scattered into the (donated) cache afterwards, in place. The cache may be stacked or per layer
(`KVCache.layered`: unrolled weights read each layer's buffer in place; the decode path).

Three layouts of the same params (`jaxspec.model.params`): input-major `LayerParams`
(checkpoints, sharding, training), output-major `LayerWeights` (`output_major`; each weight
the left operand of its dot: the faster form on XLA:CPU), and the unrolled layout (`unrolled`:
output-major, one array per layer, walked by a Python loop so no layer's weights are sliced out
of a stack). All give the same logits up to float rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxspec import critiprefill
from jaxspec.config import ModelConfig
from jaxspec.kv_cache import KVCache
from jaxspec.model.attention import attend
from jaxspec.model.layers import (
    apply_rope,
    rms_norm,
    rope_inv_freq,
    swiglu,
    swiglu_output_major,
)
from jaxspec.model.params import LayerWeights, Params, is_output_major, is_unrolled
from jaxspec.types import Array, Bool, Float, Int


def causal_mask(T: int) -> Bool[Array, "1 T T"]:
    return jnp.tril(jnp.ones((T, T), bool))[None]


def forward_hidden(
    params: Params,
    cfg: ModelConfig,
    tokens: Int[Array, "B T"],
    positions: Int[Array, "B T"],
    cache: KVCache,
    inflight: Bool[Array, "#B T T"] | None = None,
    sparse_prefill: Bool[Array, ""] | None = None,
    queries: bool = False,
    write: bool = True,
) -> tuple[Float[Array, "B T M"], KVCache]:
    """Final-normed hidden states of the in-flight tokens, and the cache with their K/V written.
    `sparse_prefill` (a prefill chunk of a model with `cfg.prefill` set): whether this chunk runs
    CritiPrefill's block-sparse attention (`jaxspec/critiprefill.py`). `queries`: also return
    every layer's post-RoPE queries [L, B, T, H, E] (SnapKV's observation window).
    `write=False`: the cache is only read, and the new K/V [L, B, T, K, E] are returned in its
    place, for `write_kv` to write later (e.g. after a `lax.switch` over forwards of several
    widths: a branch that writes the cache makes XLA copy the whole cache through the branch)."""
    B, T = tokens.shape
    if inflight is None:
        inflight = causal_mask(T)
    restack = cache.per_layer and not is_unrolled(params)
    if restack:  # stacked layers scan a stacked cache (a copy each way: not a decode path)
        cache = cache.stacked()
    finite = cache.per_layer  # a per-layer cache holds finite values only (`jaxspec.kv_cache`)
    lengths = cache.lengths
    kt = cache.k_slot_last  # K stored [L, B, K, E, S]
    inv_freq = rope_inv_freq(cfg)
    from jaxspec.sharding import constrain  # (imports the model package itself)

    h = constrain(params.embed[tokens], ("batch", None, "embed"))
    cp = cfg.prefill if sparse_prefill is not None else None
    state = None
    if cp is not None:
        state = critiprefill.init_state(cp, B, cfg.num_kv_heads, cache.num_slots, sparse_prefill)

    def layer(carry, xs):
        h, state = carry
        lp, k_cache, v_cache, index = xs
        om = isinstance(lp, LayerWeights)  # output-major projections
        x = rms_norm(h, lp.attn_norm, cfg.rms_norm_eps)
        if om:  # the weight is the dot's left operand; [K, G2, E, B, T] → [B, T, K, G2, E]
            qkv = jnp.einsum("kcem,btm->kcebt", lp.wqkv, x).transpose(3, 4, 0, 1, 2)
        else:
            qkv = jnp.einsum("btm,mkce->btkce", x, lp.wqkv)  # one fused projection
        if lp.bqkv is not None:
            qkv = qkv + lp.bqkv
        G = cfg.group_size
        q = qkv[:, :, :, :G].reshape(B, T, cfg.num_heads, cfg.head_dim)
        k, v = qkv[:, :, :, G], qkv[:, :, :, G + 1]
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        k, v = k.astype(k_cache.dtype), v.astype(v_cache.dtype)
        if cp is None:
            att = attend(cfg, q, k_cache, v_cache, lengths, k, v, inflight, positions, kt, finite)
        else:
            if kt:  # CritiPrefill's block scoring reads K as [B, K, S, E] (a prefill-time copy)
                k_cache = k_cache.swapaxes(2, 3)
            att, state = critiprefill.attend(
                cp, cfg, index, state, q, k_cache, v_cache, lengths, k, v, inflight, positions
            )
        att = att.astype(h.dtype)
        if om:
            wo, att = lp.wo.reshape(lp.wo.shape[0], -1), att.reshape(B, T, -1)  # one contraction
            h = h + jnp.einsum("mh,bth->mbt", wo, att).transpose(1, 2, 0)
        else:
            h = h + jnp.einsum("bthe,hem->btm", att, lp.wo)
        x = rms_norm(h, lp.mlp_norm, cfg.rms_norm_eps)
        mlp = swiglu_output_major if om else swiglu
        h = h + mlp(x, lp.w_gate_up, lp.w_down)
        return (h, state), (k, v, q if queries else None)

    if is_unrolled(params):  # one array per layer: a Python loop reads each in place
        carry, outs = (h, state), []
        for i, lp in enumerate(params.layers):
            if cache.per_layer:  # the layer's own buffers: read in place, nothing to order
                k_l, v_l = cache.k[i], cache.v[i]
            else:
                # Ties this layer's cache slices (copies on XLA:CPU) to its input. Nothing else
                # orders them, and XLA:CPU then copies every layer's slice up front, and reads
                # them back later from DRAM (a batch-8 forward took 85 ms instead of 46). A row
                # whose hidden state is NaN reads zeros (its output is NaN anyway).
                live = ~jnp.isnan(carry[0][:, 0, 0])[:, None, None, None]
                k_l = jnp.where(live, cache.k[i], jnp.zeros((), cache.dtype))
                v_l = jnp.where(live, cache.v[i], jnp.zeros((), cache.dtype))
            carry, out = layer(carry, (lp, k_l, v_l, jnp.asarray(i, jnp.int32)))
            outs.append(out)
        h = carry[0]
        # Ties the new K/V to the last layer's output, so writing them into the cache follows
        # every layer's cache read. Otherwise the last layer's attention read is no ancestor of
        # the write, and XLA keeps it valid by copying the whole cache each step. (A NaN row
        # writes zeros.)
        done = ~jnp.isnan(h[:, 0, 0])[None, :, None, None, None]
        k_new = jnp.where(done, jnp.stack([o[0] for o in outs]), jnp.zeros((), cache.dtype))
        v_new = jnp.where(done, jnp.stack([o[1] for o in outs]), jnp.zeros((), cache.dtype))
        q_all = jnp.stack([o[2] for o in outs]) if queries else None
    else:
        xs = (params.layers, cache.k, cache.v, jnp.arange(cfg.num_layers))
        (h, _), (k_new, v_new, q_all) = jax.lax.scan(layer, (h, state), xs)
    h = rms_norm(h, params.final_norm, cfg.rms_norm_eps)
    out = write_kv(cache, k_new, v_new) if write else (k_new, v_new)
    if restack and write:
        out = out.layered()
    return (h, out, q_all) if queries else (h, out)


def write_kv(
    cache: KVCache, k_new: Float[Array, "L B T K E"], v_new: Float[Array, "L B T K E"]
) -> KVCache:
    """The cache with T new K/V rows per row written at slots lengths + t, in place (writes past
    S are dropped); `lengths` is not advanced."""
    from jaxspec.sharding import CACHE_AXES, constrain

    B, T = k_new.shape[1:3]
    rows = jnp.arange(B)[:, None]
    slots = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
    # [B, T, L, K, E]: the index dims first, as `scatter_slots` takes them
    cache = cache.scatter_slots(rows, slots, k_new.transpose(1, 2, 0, 3, 4),
                                v_new.transpose(1, 2, 0, 3, 4))  # fmt: skip
    if cache.per_layer:  # unsharded (unrolled weights run on one device)
        return cache
    return cache.replace(k=constrain(cache.k, cache.k_axes), v=constrain(cache.v, CACHE_AXES))


def lm_head(params: Params, h: Float[Array, "B T M"]) -> Float[Array, "B T V"]:
    """float32 logits; the head is the embedding matrix when tied (lm_head is None)."""
    if params.lm_head is None and is_output_major(params):  # the table as the dot's left operand
        logits = jnp.einsum("vm,btm->vbt", params.embed, h).transpose(1, 2, 0)
    elif params.lm_head is None:
        logits = jnp.einsum("btm,vm->btv", h, params.embed)
    else:
        logits = jnp.einsum("btm,mv->btv", h, params.lm_head)
    from jaxspec.sharding import constrain

    return constrain(logits.astype(jnp.float32), ("batch", None, "vocab"))


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: Int[Array, "B T"],
    positions: Int[Array, "B T"],
    cache: KVCache,
    inflight: Bool[Array, "#B T T"] | None = None,
) -> tuple[Float[Array, "B T V"], KVCache]:
    h, cache = forward_hidden(params, cfg, tokens, positions, cache, inflight)
    return lm_head(params, h), cache
