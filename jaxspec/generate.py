"""Autoregressive generation: the N = 0 case of the speculative step.

Plain decoding is `jaxspec.speculative` with the root-only tree `chain(0)` and no draft: the same
state (`DecodeState` is `SpecState`, with `draft_cache = None`), the same step, the same kernels.
This module gives it the signatures of a plain decoder:
  `prefill(params, prompts, prompt_lengths, key, sampling, max_new, *, cfg, max_new_tokens, chunk)`
      chunked prefill of ragged prompts, then each row's first token → `DecodeState`.
  `ar_step(params, cfg, state)` one token per live row; finished rows (EOS or their own
      max-new-tokens) stop advancing but never stop the batch. DONATES `state`.
  `decode(params, cfg, state)` a `lax.while_loop` over `ar_step` until every row is done.
  `generate(...)` = prefill + decode in one jitted function, usable inside a JAX pipeline.

Shapes: prompts int32[B, P] (P a multiple of the chunk; right-padded, any pad value), output
buffer int32[B, O] filled with -1 past each row's `n_out`. Emitted tokens include the EOS token
that ended a row. Static arguments (`cfg`, `max_new_tokens`, `chunk`) recompile when changed;
everything per row (lengths, sampling, limits) is an array.
"""

from __future__ import annotations

import functools

import jax

from jaxspec.config import ModelConfig
from jaxspec.model.params import Params
from jaxspec.prefill import is_eos, prefill_cache
from jaxspec.sampling import SamplingParams
from jaxspec.speculative import SpecConfig, SpecState, _spec_decode, _spec_step, spec_prefill
from jaxspec.trees import chain
from jaxspec.types import Array, Int, PRNGKeyArray

DecodeState = SpecState
__all__ = ["DecodeState", "ar_step", "decode", "generate", "is_eos", "prefill", "prefill_cache",
           "prefill_jit", "stream"]  # fmt: skip


@functools.cache
def ar_spec(cfg: ModelConfig) -> SpecConfig:
    """The speculative configuration of plain decoding: root-only tree, no draft."""
    return SpecConfig(cfg, cfg, chain(0), "greedy")


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
    return spec_prefill(params, None, prompts, prompt_lengths, key, sampling, max_new,
                        spec=ar_spec(cfg), max_new_tokens=max_new_tokens, chunk=chunk)  # fmt: skip


def _ar_step(params: Params, cfg: ModelConfig, state: DecodeState) -> DecodeState:
    return _spec_step(params, None, state, ar_spec(cfg))


def _decode(params: Params, cfg: ModelConfig, state: DecodeState) -> DecodeState:
    return _spec_decode(params, None, state, ar_spec(cfg))


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
    while not bool(state.done.all()):
        state = ar_step(params, cfg, state)
        yield state
