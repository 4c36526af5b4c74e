"""Autoregressive generation over a static-shape decode state.

Phases (each a pure function; the jitted forms are module-level):
  `prefill(params, prompts, prompt_lengths, ..., cfg=...)` runs the padded prompts through the
      model in chunks of C tokens (a `fori_loop`; rows of different lengths advance by their own
      count, so padding never enters the cache) and samples each row's first token → `DecodeState`.
  `ar_step(params, state)` feeds each row's last token and samples the next one; finished rows
      (EOS or their own max-new-tokens) stop advancing but never stop the batch. DONATES `state`.
  `decode(params, state)` is a `lax.while_loop` over `ar_step` until every row is done.
  `generate(...)` = prefill + decode in one jitted function, usable inside a JAX pipeline.

Shapes: prompts int32[B, P] (P a multiple of the chunk; right-padded, any pad value), output
buffer int32[B, O] filled with -1 past each row's `n_out`. Emitted tokens include the EOS token
that ended a row. The cache has P + O slots. Static arguments (`cfg`, `max_new_tokens`, `chunk`)
recompile when changed; everything per-row (lengths, sampling, limits) is an array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec.config import ModelConfig
from jaxspec.kv_cache import KVCache, advance, init_cache
from jaxspec.model import forward, forward_hidden, lm_head
from jaxspec.model.params import Params
from jaxspec.sampling import SamplingParams, sample
from jaxspec.types import Array, Bool, Float, Int, PRNGKeyArray


@struct.dataclass
class DecodeState:
    tokens: Int[Array, "B O"]  # emitted tokens, -1 past n_out
    n_out: Int[Array, " B"]  # tokens emitted per row
    root: Int[Array, " B"]  # last emitted token; its KV is not in the cache yet
    done: Bool[Array, " B"]  # row finished (EOS, its max_new, or a padding row)
    max_new: Int[Array, " B"]  # per-row limit on emitted tokens (<= O)
    cache: KVCache  # target KV; lengths = committed tokens per row
    sampling: SamplingParams
    rng: PRNGKeyArray
    steps: Int[Array, ""]  # target forward passes since prefill


def is_eos(tok: Int[Array, " B"], cfg: ModelConfig) -> Bool[Array, " B"]:
    hit = jnp.zeros(tok.shape, bool)
    for e in cfg.eos_token_ids:
        hit |= tok == e
    return hit


def prefill(
    params: Params,
    prompts: Int[Array, "B P"],
    prompt_lengths: Int[Array, " B"],
    key: PRNGKeyArray,
    sampling: SamplingParams,
    max_new: Int[Array, " B"],
    *,
    cfg: ModelConfig,
    max_new_tokens: int,
    chunk: int,
) -> DecodeState:
    """Chunked prefill of ragged prompts, then the first token of each row."""
    B, P = prompts.shape
    prompt_lengths = prompt_lengths.astype(jnp.int32)
    cache, last_h = prefill_cache(
        params, cfg, prompts, prompt_lengths, slots=P + max_new_tokens, chunk=chunk
    )
    logits = lm_head(params, last_h[:, None, :])[:, 0]
    key, sub = jax.random.split(key)
    first = sample(logits, sampling, sub)
    max_new = jnp.minimum(max_new.astype(jnp.int32), max_new_tokens)
    tokens = jnp.full((B, max_new_tokens), -1, jnp.int32).at[:, 0].set(first)
    done = is_eos(first, cfg) | (max_new <= 1) | (prompt_lengths <= 0)
    return DecodeState(
        tokens=tokens,
        n_out=jnp.ones((B,), jnp.int32),
        root=first,
        done=done,
        max_new=max_new,
        cache=cache,
        sampling=sampling,
        rng=key,
        steps=jnp.zeros((), jnp.int32),
    )


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
    if P % chunk:
        raise ValueError(f"padded prompt length {P} is not a multiple of the chunk {chunk}")
    cache = init_cache(cfg, B, slots, params.embed.dtype)

    def body(c, carry):
        cache, last_h = carry
        toks = jax.lax.dynamic_slice_in_dim(prompts, c * chunk, chunk, axis=1)
        n_valid = jnp.clip(prompt_lengths - c * chunk, 0, chunk)
        positions = cache.lengths[:, None] + jnp.arange(chunk, dtype=jnp.int32)[None, :]
        h, cache = forward_hidden(params, cfg, toks, positions, cache)
        ends_here = (n_valid > 0) & (prompt_lengths <= (c + 1) * chunk)
        h_last = jnp.take_along_axis(h, jnp.maximum(n_valid - 1, 0)[:, None, None], axis=1)[:, 0]
        last_h = jnp.where(ends_here[:, None], h_last, last_h)
        return advance(cache, n_valid), last_h

    last_h = jnp.zeros((B, cfg.hidden_size), params.embed.dtype)
    return jax.lax.fori_loop(0, P // chunk, body, (cache, last_h))


def _ar_step(params: Params, cfg: ModelConfig, state: DecodeState) -> DecodeState:
    """One target forward per row: the N = 0 case of the speculative step."""
    cache = state.cache
    positions = cache.lengths[:, None]
    logits, cache = forward(params, cfg, state.root[:, None], positions, cache)
    live = ~state.done
    cache = advance(cache, live.astype(jnp.int32))
    rng, sub = jax.random.split(state.rng)
    nxt = sample(logits[:, 0], state.sampling, sub)
    rows = jnp.arange(nxt.shape[0])
    tokens = state.tokens.at[rows, state.n_out].set(
        jnp.where(live, nxt, -1), mode="drop", unique_indices=True
    )
    n_out = state.n_out + live
    done = state.done | (live & (is_eos(nxt, cfg) | (n_out >= state.max_new)))
    return state.replace(
        tokens=jnp.where(live[:, None], tokens, state.tokens),
        n_out=n_out,
        root=jnp.where(live, nxt, state.root),
        done=done,
        cache=cache,
        rng=rng,
        steps=state.steps + 1,
    )


def _decode(params: Params, cfg: ModelConfig, state: DecodeState) -> DecodeState:
    limit = state.tokens.shape[1]
    return jax.lax.while_loop(
        lambda s: ~jnp.all(s.done) & (s.steps < limit),
        lambda s: _ar_step(params, cfg, s),
        state,
    )


def _generate(
    params: Params,
    prompts: Int[Array, "B P"],
    prompt_lengths: Int[Array, " B"],
    key: PRNGKeyArray,
    sampling: SamplingParams,
    max_new: Int[Array, " B"],
    *,
    cfg: ModelConfig,
    max_new_tokens: int,
    chunk: int,
) -> DecodeState:
    state = prefill(
        params, prompts, prompt_lengths, key, sampling, max_new,
        cfg=cfg, max_new_tokens=max_new_tokens, chunk=chunk,
    )  # fmt: skip
    return _decode(params, cfg, state)


_STATIC = ("cfg", "max_new_tokens", "chunk")
prefill_jit = jax.jit(prefill, static_argnames=_STATIC)
ar_step = jax.jit(_ar_step, static_argnums=(1,), donate_argnums=(2,))
decode = jax.jit(_decode, static_argnums=(1,), donate_argnums=(2,))
generate = jax.jit(_generate, static_argnames=_STATIC)
generate.__doc__ = """Jitted prefill + autoregressive decode; returns the final `DecodeState`.

`generate(params, prompts, prompt_lengths, key, sampling, max_new, *, cfg, max_new_tokens, chunk)`
with prompts int32[B, P] (P a multiple of `chunk`), prompt_lengths int32[B] (>= 1 for real rows,
0 marks a padding row), max_new int32[B] (per-row limit, <= max_new_tokens). Read
`state.tokens[b, :state.n_out[b]]`.
"""


def stream(params: Params, cfg: ModelConfig, state: DecodeState):
    """Python generator over the jitted `ar_step`: yields the state after each step (the caller
    owns it until the next `next()`; the step donates the previous one)."""
    while not bool(jnp.all(state.done)):
        state = ar_step(params, cfg, state)
        yield state
