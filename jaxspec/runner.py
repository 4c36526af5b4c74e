"""Host-side driver: validate prompts, bucket shapes, compile once per bucket, time the phases.

Buckets (so new prompts reuse compilations): the padded prompt length P is the next power of two
>= the longest prompt (at least 16) up to 256, then the next multiple of 256 (tighter buckets keep
the cache, which every decode step reads whole, small); the prefill chunk is the largest power of
two <= min(chunk, P) that divides P; the batch is padded to
the next power of two <= batch_size with empty rows; the output buffer O is max_new_tokens
rounded up to a multiple of 32 (each row still stops at its own max_new_tokens).
Compilation is done ahead of time (`lower().compile()`) and timed separately from running.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.config import ModelConfig
from jaxspec.errors import InputError
from jaxspec.generate import decode, prefill_jit
from jaxspec.metrics import Metrics
from jaxspec.model.params import Params
from jaxspec.sampling import SamplingParams


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def prompt_bucket(n: int) -> int:
    """Padded prompt length: powers of two up to 256, then multiples of 256."""
    return next_pow2(n, 16) if n <= 256 else -(-n // 256) * 256


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    chunk: int = 256

    def validate(self):
        if self.max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size <= 0:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.chunk <= 0 or self.chunk & (self.chunk - 1):
            raise InputError(f"prefill chunk must be a power of two, got {self.chunk}")
        SamplingParams.make(1, self.temperature, self.top_k, self.top_p)


def check_prompts(prompts: list[list[int]], cfg: ModelConfig, max_new_tokens: int):
    for i, ids in enumerate(prompts):
        if len(ids) == 0:
            raise InputError(f"prompt {i} is empty")
        if len(ids) + max_new_tokens > cfg.max_position_embeddings:
            raise InputError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it "
                f"exceeds the model's context of {cfg.max_position_embeddings} tokens"
            )


class Runner:
    """Runs AR generation over many prompts in batches, keeping compiled executables per bucket."""

    def __init__(self, params: Params, cfg: ModelConfig):
        self.params, self.cfg = params, cfg
        self._compiled: dict[tuple, tuple] = {}

    def _executables(self, B: int, P: int, out_len: int, chunk: int, args):
        key = (B, P, out_len, chunk)
        if key in self._compiled:
            return self._compiled[key], 0.0
        t0 = time.perf_counter()
        pre = prefill_jit.lower(*args, cfg=self.cfg, max_new_tokens=out_len, chunk=chunk).compile()
        state_shape = jax.eval_shape(
            lambda *a: prefill_jit(*a, cfg=self.cfg, max_new_tokens=out_len, chunk=chunk), *args
        )
        dec = decode.lower(self.params, self.cfg, state_shape).compile()
        self._compiled[key] = (pre, dec)
        return (pre, dec), time.perf_counter() - t0

    def run(self, prompts: list[list[int]], opts: GenerateOptions) -> tuple[list, Metrics]:
        opts.validate()
        check_prompts(prompts, self.cfg, opts.max_new_tokens)
        m = Metrics(num_prompts=len(prompts))
        outputs: list[list[int]] = []
        out_len = -(-opts.max_new_tokens // 32) * 32
        key = jax.random.key(opts.seed)
        n_batches = 0
        for start in range(0, len(prompts), opts.batch_size):
            batch = prompts[start : start + opts.batch_size]
            B = min(next_pow2(len(batch)), next_pow2(opts.batch_size))
            P = prompt_bucket(max(map(len, batch)))
            chunk = min(opts.chunk, P & -P)  # P & -P: largest power of two dividing P
            arr = np.zeros((B, P), np.int32)
            lens = np.zeros((B,), np.int32)
            for i, ids in enumerate(batch):
                arr[i, : len(ids)], lens[i] = ids, len(ids)
            key, sub = jax.random.split(key)
            sp = SamplingParams.make(B, opts.temperature, opts.top_k, opts.top_p)
            max_new = jnp.full((B,), opts.max_new_tokens, jnp.int32)
            args = (self.params, jnp.asarray(arr), jnp.asarray(lens), sub, sp, max_new)
            (pre, dec), compile_s = self._executables(B, P, out_len, chunk, args)
            m.compile_s += compile_s
            t0 = time.perf_counter()
            state = pre(*args)
            jax.block_until_ready(state)
            t1 = time.perf_counter()
            state = dec(self.params, state)
            jax.block_until_ready(state)
            t2 = time.perf_counter()
            m.prefill_s += t1 - t0
            m.decode_s += t2 - t1
            toks, n_out = np.asarray(state.tokens), np.asarray(state.n_out)
            outputs += [toks[i, : n_out[i]].tolist() for i in range(len(batch))]
            m.target_steps += int(state.steps)
            m.new_tokens += int(n_out[: len(batch)].sum())
            n_batches += 1
        after_first = m.new_tokens - len(prompts)
        m.tokens_per_s = after_first / m.decode_s if m.decode_s > 0 else 0.0
        m.ttft_s = m.prefill_s / max(n_batches, 1)
        m.verify_s = m.decode_s
        return outputs, m
