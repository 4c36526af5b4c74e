"""Chunked dense prefill of ragged prompts into a KV cache, and the EOS test shared by decoding.

Prompts are right-padded to P (a multiple of the chunk C); a `fori_loop` feeds C tokens of every
row per iteration, and each row advances its cache length by its own count, so padding never
enters the cache. Returns the cache and each row's final hidden state of its last prompt token.
Unrolled weights are stacked once per call, so the chunks always walk the layers with `lax.scan`.
With `cfg.prefill` (CritiPrefill) the chunk is its segment and each chunk decides on device whether
it runs block-sparse (`jaxspec/critiprefill.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxspec import critiprefill
from jaxspec.config import ModelConfig
from jaxspec.kv_cache import KVCache, advance, init_cache
from jaxspec.model import forward_hidden, stacked
from jaxspec.model.params import Params, k_slot_last_for
from jaxspec.types import Array, Bool, Float, Int


def is_eos(tok: Int[Array, "*B"], cfg: ModelConfig) -> Bool[Array, "*B"]:
    hit = jnp.zeros(tok.shape, bool)
    for e in cfg.eos_token_ids:
        hit |= tok == e
    return hit


def prefill_cache(
    params: Params,
    cfg: ModelConfig,
    prompts: Int[Array, "B P"],
    prompt_lengths: Int[Array, " B"],
    *,
    slots: int,
    chunk: int,
) -> tuple[KVCache, Float[Array, "B M"]]:
    """A cache of `slots` slots holding each row's prompt (lengths = prompt_lengths), and the
    final hidden state of each row's last prompt token."""
    B, P = prompts.shape
    cp = cfg.prefill
    if cp is not None:
        chunk = cp.segment  # CritiPrefill's segments are the prefill chunks
    if P % chunk:
        raise ValueError(f"padded prompt length {P} is not a multiple of the chunk {chunk}")
    cache = init_cache(cfg, B, slots, params.embed.dtype, k_slot_last_for(params))
    params = stacked(params)  # unrolled weights: stacked once, the chunks scan the layers

    def body(c, carry):
        toks = jax.lax.dynamic_slice_in_dim(prompts, c * chunk, chunk, axis=1)
        return prefill_chunk(params, cfg, toks, prompt_lengths, c, *carry)

    last_h = jnp.zeros((B, cfg.hidden_size), params.embed.dtype)
    return jax.lax.fori_loop(0, P // chunk, body, (cache, last_h))


def prefill_chunk(
    params: Params,
    cfg: ModelConfig,
    toks: Int[Array, "B C"],
    prompt_lengths: Int[Array, " B"],
    c: Int[Array, ""],
    cache: KVCache,
    last_h: Float[Array, "B M"],
) -> tuple[KVCache, Float[Array, "B M"]]:
    """Chunk `c` (tokens [c·C, (c+1)·C) of each row) into the cache; `last_h` takes the hidden
    state of a row's last prompt token when this chunk holds it. `prefill_cache` loops over it;
    the serving engine calls it one chunk at a time between decode steps. Unrolled weights
    (`jaxspec.model.unrolled`) are stacked for it (`jaxspec.model.stacked`)."""
    params = stacked(params)
    chunk = toks.shape[1]
    cp = cfg.prefill
    n_valid = jnp.clip(prompt_lengths - c * chunk, 0, chunk)
    positions = cache.lengths[:, None] + jnp.arange(chunk, dtype=jnp.int32)[None, :]
    sparse = None if cp is None else critiprefill.segment_is_sparse(cp, c, prompt_lengths)
    h, cache = forward_hidden(params, cfg, toks, positions, cache, sparse_prefill=sparse)
    ends_here = (n_valid > 0) & (prompt_lengths <= (c + 1) * chunk)
    h_last = jnp.take_along_axis(h, jnp.maximum(n_valid - 1, 0)[:, None, None], axis=1)[:, 0]
    last_h = jnp.where(ends_here[:, None], h_last, last_h)
    return advance(cache, n_valid), last_h
