"""Continuous-batching engine: fixed slots in one static-shape decode state, speculative steps.

Conventions:
  * slots     `max_batch` slots live in one decode state (`SpecState`) whose rows are sized to
              the batch bucket of the active requests (1, 2, 4, ..., max_batch): active rows
              are packed first (a finished row's hole takes the last active row), the state
              grows when a request needs a row and shrinks after `shrink_after` iterations at a
              smaller bucket (hysteresis). A row past the active ones has `done = True`: the
              step computes it (static shapes) but never advances or emits it. (Slicing the
              active rows out of a max-batch state each step would copy their KV twice a step.)
  * context   each slot holds up to C = `max_context` tokens (prompt + generated); the caches
              have C + N_max slots (N_max: the largest tree of any bucket), the output buffer C.
  * admit     between two steps: up to `admit_per_step` queued requests start prefilling (while
              rows are free), and up to `prefill_budget` prompt tokens are prefilled, one chunk
              per call (`jaxspec.prefill.prefill_chunk`, one compile per chunk size), so a long
              prompt never stalls the running rows for its whole prefill. A finished prefill
              samples its first token with the request's own seed and is inserted into the next
              row.
  * step      one jitted speculative step (`jaxspec.speculative._spec_step`) for the bucket:
              `spec_for(b)` gives its SpecConfig (None: autoregressive), so speculation follows
              the batch size (SSSD's s(b)); the cost-model gate (`EngineConfig.gate`) decodes AR
              where measured step times and the observed tau predict no gain. One compile per
              (bucket, configuration). The step returns each row's newly emitted tokens
              ([B, D+1], -1 padded), so the host reads a few hundred bytes per step.
  * stop      EOS and max_tokens end a row inside the step; stop token ids, cancellation (a
              client that went away, a stop string found by the server) end it on the host,
              which frees the slot at once.
Every request's tokens are those `jaxspec generate` gives it alone: rows never interact, and
speculation is lossless (greedy: token-identical; sampling: the target distribution).

Threading: `Engine.start()` runs the loop in a daemon thread; `submit`/`cancel`/`stop` are
thread-safe. Request callbacks (`on_tokens`, `on_finish`) run on the engine thread: keep them
short (the server hands them to its event loop).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.config import ModelConfig
from jaxspec.drafting.vocab import model_params, pair_in_layout
from jaxspec.errors import ConfigError, InputError
from jaxspec.generate import ar_spec
from jaxspec.kv_cache import KVCache, check_fits, init_cache
from jaxspec.model import forward_hidden, k_slot_last_for
from jaxspec.prefill import prefill_cache, prefill_chunk
from jaxspec.runner import next_pow2, prompt_bucket, resolve_layout
from jaxspec.sampling import SamplingParams
from jaxspec.serving.metrics import EngineMetrics
from jaxspec.speculative import SpecConfig, SpecState, _spec_step, spec_start


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8  # slots (rows of the decode state)
    max_context: int = 2048  # prompt + generated tokens per slot
    max_queue: int = 64  # queued (not yet admitted) requests before `QueueFull`
    admit_per_step: int = 4  # prefills started between two decode steps
    prefill_budget: int = 256  # prompt tokens prefilled between two decode steps (>= 1 chunk)
    chunk: int = 256  # prefill chunk (a power of two)
    shrink_after: int = 8  # iterations with fewer active rows before the state shrinks
    # cost-model gate (needs `compile_steps`, which times each bucket's steps): a bucket
    # speculates only while tau_est · t_AR / t_spec >= 1; tau_est starts at `expected_tau` and
    # follows the tau observed while speculating (EMA); every `explore_every`-th step of a
    # gated bucket speculates anyway, to keep the estimate current
    gate: bool = True
    expected_tau: float = 1.8
    explore_every: int = 16

    def validate(self, cfg: ModelConfig) -> None:
        for f in ("max_batch", "max_context", "max_queue", "admit_per_step", "chunk",
                  "shrink_after", "prefill_budget"):  # fmt: skip
            if getattr(self, f) < 1:
                raise ConfigError(f"engine {f} must be >= 1, got {getattr(self, f)}")
        if self.chunk & (self.chunk - 1):
            raise ConfigError(f"engine chunk must be a power of two, got {self.chunk}")
        if self.max_context > cfg.max_position_embeddings:
            raise ConfigError(
                f"max_context {self.max_context} exceeds the model's context of "
                f"{cfg.max_position_embeddings} tokens"
            )


class QueueFull(Exception):
    """The engine's queue holds `max_queue` requests; retry later."""


@dataclasses.dataclass
class Request:
    """One generation request. `on_tokens(ids)` receives each step's new tokens (EOS included
    when it ends the request); `on_finish(reason, n_tokens)` is called once: reason "stop"
    (EOS, a stop token, or `cancel(..., "stop")`), "length" (max_tokens), "cancelled", or
    "error: ..."."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    on_tokens: Callable[[list[int]], None] = lambda ids: None
    on_finish: Callable[[str, int], None] = lambda reason, n: None
    id: int = -1  # set by `submit`
    # set by the engine
    submitted: float = 0.0
    first_token: float | None = None
    last_delivery: float = 0.0
    n_out: int = 0
    slot: int | None = None
    finished: bool = False


def _map_rows(fn, axes: tuple[int, ...], *trees):
    """`fn(axis, *leaves)` over the state's leaves that have a batch axis (axis >= 0); the
    others (step counter, rng key: axis -1) come from the first tree."""
    flat = [jax.tree.flatten(t) for t in trees]
    out = [fn(a, *ls) if a >= 0 else ls[0]
           for a, *ls in zip(axes, *(f[0] for f in flat), strict=True)]  # fmt: skip
    return flat[0][1].unflatten(out)


def _release(state: SpecState, slot) -> SpecState:
    return state.replace(done=state.done.at[slot].set(True))


def _move(state: SpecState, src, dst, axes) -> SpecState:
    """Copy row `src` over row `dst` (packing the active rows after one finishes)."""

    def move(a, x):
        row = jax.lax.dynamic_slice_in_dim(x, src, 1, axis=a)
        return jax.lax.dynamic_update_slice_in_dim(x, row, dst, axis=a)

    return _map_rows(move, axes, state)


def _insert(state: SpecState, row: SpecState, slot, axes) -> SpecState:
    """Write a one-row state into row `slot`."""

    def put(a, x, r):
        return jax.lax.dynamic_update_slice_in_dim(x, r.astype(x.dtype), slot, axis=a)

    return _map_rows(put, axes, state, row)


def _resize(state: SpecState, empty: SpecState | None, rows: int, axes) -> SpecState:
    """The first `rows` rows (shrink), or the state followed by `empty`'s rows (grow)."""
    if empty is None:
        return _map_rows(lambda a, x: jax.lax.slice_in_dim(x, 0, rows, axis=a), axes, state)
    return _map_rows(lambda a, x, e: jnp.concatenate([x, e], axis=a), axes, state, empty)


_release_jit = jax.jit(_release, donate_argnums=(0,))
_move_jit = jax.jit(_move, static_argnums=(3,), donate_argnums=(0,))
_insert_jit = jax.jit(_insert, static_argnums=(3,), donate_argnums=(0,))
_resize_jit = jax.jit(_resize, static_argnums=(2, 3))  # new shapes: nothing to donate


def _start_row(params_t, params_d, cache, last_h, prompt, key, sampling, max_new, *, spec,
               context, chunk) -> SpecState:  # fmt: skip
    """The engine-shaped state of prefilled rows: output buffer and history of `context`
    tokens, one-column histograms (the step swaps in its own); the first token sampled."""
    row = spec_start(params_t, params_d, cache, last_h, prompt, key, sampling, max_new,
                     spec=spec, max_new_tokens=context, chunk=chunk)  # fmt: skip
    B = prompt.shape[0]
    history = row.history
    if history is not None:  # width P + context → context (prompt + generated <= context)
        history = history[:, :context]
    return row.replace(history=history, accept_hist=jnp.zeros((B, 1), jnp.int32),
                       rank_hist=jnp.zeros((B, 1), jnp.int32))  # fmt: skip


def _row_state(params_t, params_d, prompt, length, key, sampling, max_new, *, spec, context,
               slots, chunk) -> SpecState:  # fmt: skip
    """`_start_row` after a whole prefill (the state's structure; the engine prefills chunk by
    chunk between steps instead)."""
    cache, last_h = prefill_cache(params_t, spec.target, prompt, length, slots=slots, chunk=chunk)
    return _start_row(params_t, params_d, cache, last_h, prompt, key, sampling, max_new,
                      spec=spec, context=context, chunk=chunk)  # fmt: skip


_chunk_jit = jax.jit(prefill_chunk, static_argnums=(1,), donate_argnums=(5, 6))
_start_jit = jax.jit(_start_row, static_argnames=("spec", "context", "chunk"))


@dataclasses.dataclass
class _Prefill:
    """A request being prefilled, one chunk per call, between decode steps."""

    req: Request
    prompt: np.ndarray  # int32 [1, P], P a multiple of `chunk`
    chunk: int
    cache: KVCache  # one row, the engine's slots
    last_h: jax.Array
    done_chunks: int = 0

    @property
    def finished(self) -> bool:  # chunks past the prompt are padding: skipped (no-ops)
        return self.done_chunks * self.chunk >= len(self.req.prompt)


def _step(params_t, params_d, state: SpecState, spec: SpecConfig, draft_cfg: ModelConfig):
    """One speculative step → (state, tokens emitted by it [B, D+1] (-1 padded), done [B]).
    An autoregressive step on a state with a draft model's cache also writes the root's draft
    K/V and commits it, so the draft cache stays in step with the target's for the next
    speculative step. DONATES `state` (jitted)."""
    B, out_len = state.tokens.shape
    D1 = spec.max_depth + 1
    s = state.replace(accept_hist=jnp.zeros((B, D1), jnp.int32),
                      rank_hist=jnp.zeros((B, spec.max_width + 1), jnp.int32))  # fmt: skip
    ar_with_draft = state.draft_cache is not None and not spec.uses_draft_model
    if ar_with_draft:
        s = _spec_step(params_t, None, s.replace(draft_cache=None), spec)
        lengths = state.draft_cache.lengths
        _, dcache = forward_hidden(model_params(params_d), draft_cfg, state.root[:, None],
                                   lengths[:, None], state.draft_cache)  # fmt: skip
        committed = s.n_out - state.n_out  # 1 per live row (the root), as in the target cache
        s = s.replace(draft_cache=dcache.replace(lengths=lengths + committed))
    else:
        s = _spec_step(params_t, params_d, s, spec)
    j = jnp.arange(D1)[None]
    new = jnp.take_along_axis(s.tokens, jnp.minimum(state.n_out[:, None] + j, out_len - 1), axis=1)
    new = jnp.where(j < (s.n_out - state.n_out)[:, None], new, -1)
    s = s.replace(accept_hist=state.accept_hist, rank_hist=state.rank_hist)
    return s, new, s.done


_step_jit = jax.jit(_step, static_argnums=(3, 4), donate_argnums=(2,))


def batch_axes(shapes_1, shapes_2) -> tuple[int, ...]:
    """Per leaf, the axis whose size differs between a 1-row and a 2-row state (-1: none)."""

    def axis(a, b):
        diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y]
        return diff[0] if diff else -1

    return tuple(jax.tree.leaves(jax.tree.map(axis, shapes_1, shapes_2)))


class Engine:
    """Fixed-slot continuous batching over one decode state (see the module docstring).

    `spec_for(b)` maps a batch bucket (power of two <= max_batch) to a SpecConfig or None (AR);
    every non-None config must draft the same way (all n-gram, or all with the same draft
    model; AR steps keep a draft model's cache in step). `draft` is the draft model's params
    or the n-gram datastore (or None)."""

    def __init__(self, params, cfg: ModelConfig, config: EngineConfig = EngineConfig(),
                 spec_for: Callable[[int], SpecConfig | None] | None = None, draft=None,
                 metrics: EngineMetrics | None = None, layout: str = "auto"):  # fmt: skip
        """`layout` of the weights while decoding, as `jaxspec.runner.Runner`'s (auto: the
        unrolled output-major layout on a CPU)."""
        config.validate(cfg)
        params, draft = pair_in_layout(params, draft, resolve_layout(layout))
        self.params, self.cfg, self.config, self.draft = params, cfg, config, draft
        self.buckets = [1 << i for i in range(next_pow2(config.max_batch).bit_length())]
        self.buckets = [b for b in self.buckets if b < config.max_batch] + [config.max_batch]
        self.specs = {b: (spec_for(b) if spec_for else None) for b in self.buckets}
        self.state_spec = _state_spec(cfg, self.specs)
        self.ar_spec = ar_spec(cfg)  # AR buckets: root-only tree (keeps an n-gram history)
        n_max = max(s.num_nodes for s in [self.state_spec, *self.specs.values()] if s)
        self.slots = config.max_context + n_max
        itemsize = np.dtype(params.embed.dtype).itemsize
        check_fits(cfg, config.max_batch, self.slots, itemsize, "engine KV cache")
        if self.state_spec.uses_draft_model:
            check_fits(self.state_spec.draft, config.max_batch, self.slots, itemsize,
                       "engine draft KV cache")  # fmt: skip
        self.metrics = metrics or EngineMetrics()
        self.metrics.max_slots = config.max_batch
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque[Request] = collections.deque()
        self._cancel: dict[int, str] = {}
        self._active: dict[int, Request] = {}  # slot → request
        self._prefilling: collections.deque[_Prefill] = collections.deque()
        self._next_id = 0
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.axes = batch_axes(self._state_shapes(1), self._state_shapes(2))
        self.state = self._empty_state(self.buckets[0])  # rows = the current batch bucket
        self._oversized = 0  # iterations the state has had a smaller bucket's active rows
        self.step_s: dict[tuple[int, bool], float] = {}  # (bucket, is AR) → seconds per step
        self.tau_est = {b: config.expected_tau for b in self.buckets}
        self._gated_steps = collections.Counter()
        self.compile_s = 0.0
        self._compiled: set = set()

    # ---- public, thread-safe -----------------------------------------------------------------

    def check(self, req: Request) -> None:
        """InputError for a request the engine cannot serve (its messages name the value)."""
        n = len(req.prompt)
        if n == 0:
            raise InputError("the prompt is empty")
        if req.max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {req.max_tokens}")
        if n + req.max_tokens > self.config.max_context:
            raise InputError(
                f"the prompt has {n} tokens; with max_tokens={req.max_tokens} it exceeds the "
                f"server's context of {self.config.max_context} tokens"
            )
        bad = [t for t in req.prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary [0, "
                             f"{self.cfg.vocab_size})")  # fmt: skip
        SamplingParams.make(1, req.temperature, req.top_k, req.top_p)

    def submit(self, req: Request) -> Request:
        """Queue a request (checked first); `QueueFull` when `max_queue` are waiting,
        `RuntimeError` once the engine is stopping."""
        self.check(req)
        with self._lock:
            if not self._accepting:
                raise RuntimeError("the engine is shutting down")
            if len(self._queue) >= self.config.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are queued")
            req.id, self._next_id = self._next_id, self._next_id + 1
            req.submitted = time.perf_counter()
            self._queue.append(req)
            self.metrics.queue_length = len(self._queue)
            self._wake.notify()
        return req

    def cancel(self, req: Request, reason: str = "cancelled") -> None:
        """End a request between steps (queued or running); its slot is freed at once."""
        with self._lock:
            if not req.finished:
                self._cancel.setdefault(req.id, reason)  # the first reason wins
                self._wake.notify()

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="jaxspec-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; with `drain`, finish every queued and running request first."""
        with self._lock:
            self._accepting = False
            if not drain:
                for r in [*self._queue, *(p.req for p in self._prefilling),
                          *self._active.values()]:  # fmt: skip
                    self._cancel[r.id] = "cancelled"
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def rows(self) -> int:
        """Rows of the decode state now: the batch bucket of the active requests."""
        return int(self.state.done.shape[0])

    def compile_steps(self) -> None:
        """Compile (and run, harmlessly: every row is free) each bucket's step and resizes."""
        if self._active or self._thread is not None:
            raise RuntimeError("compile_steps needs an idle engine that is not running")
        for b in self.buckets:
            self._resize(b)
            for spec in dict.fromkeys([self.specs[b] or self.ar_spec, self.ar_spec]):
                times = []
                for _ in range(4):  # compile, then 3 timed runs (every row free: same work)
                    t0 = time.perf_counter()
                    self.state, new, _ = _step_jit(self.params, self.draft, self.state, spec,
                                                   self.state_spec.draft)  # fmt: skip
                    jax.block_until_ready(new)
                    times.append(time.perf_counter() - t0)
                self._note_compile(("step", spec, b), times[0])
                self.step_s[(b, spec is self.ar_spec)] = float(np.median(times[1:]))
        for b in reversed(self.buckets[:-1]):
            self._resize(b)

    def run_until_idle(self) -> None:
        """Run the loop on this thread until nothing is queued or running (tests, scripts)."""
        while self._busy:
            self._iteration()

    # ---- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self._busy or self._cancel or self._stop):
                        self._wake.wait()
                    if self._stop and not self._busy:
                        return
                self._iteration()
        except BaseException as e:  # surfaced to every waiting request, then re-raised
            self.error = e
            with self._lock:
                pending = [*self._queue, *(p.req for p in self._prefilling),
                           *self._active.values()]  # fmt: skip
                self._queue.clear()
                self._prefilling.clear()
                self._active.clear()
            for r in pending:
                self._finish(r, f"error: {type(e).__name__}: {e}")
            raise

    @property
    def _busy(self) -> bool:
        return bool(self._queue or self._prefilling or self._active)

    def _iteration(self) -> None:
        self._apply_cancellations()
        self._admit_some()
        self._prefill_some()
        self._maybe_shrink()
        if self._active:
            self._decode_step()
        with self._lock:
            self.metrics.queue_length = len(self._queue)
            self.metrics.active_slots = len(self._active)

    def _apply_cancellations(self) -> None:
        with self._lock:
            cancel, self._cancel = self._cancel, {}
            queued = [r for r in self._queue if r.id in cancel]
            for r in queued:
                self._queue.remove(r)
        for r in queued:
            self._finish(r, cancel[r.id])
        for p in [p for p in self._prefilling if p.req.id in cancel]:
            self._prefilling.remove(p)
            self._finish(p.req, cancel[p.req.id])
        for r in list(self._active.values()):
            if r.id in cancel:
                self._free(r.slot, cancel[r.id])  # (rows move as others are freed)

    def _admit_some(self) -> None:
        """Start the prefill of up to `admit_per_step` queued requests (while rows are free)."""
        for _ in range(self.config.admit_per_step):
            with self._lock:
                taken = len(self._active) + len(self._prefilling)
                if taken == self.config.max_batch or not self._queue:
                    return
                req = self._queue.popleft()
            n = len(req.prompt)
            P = prompt_bucket(n)
            if self.cfg.prefill is not None:  # CritiPrefill: whole segments, chunk = segment
                chunk = self.cfg.prefill.segment
            else:
                chunk = min(self.config.chunk, P & -P)  # the largest power of two dividing P
            P = -(-P // chunk) * chunk
            prompt = np.zeros((1, P), np.int32)
            prompt[0, :n] = req.prompt
            dtype = self.params.embed.dtype
            cache = init_cache(self.cfg, 1, self.slots, dtype, k_slot_last_for(self.params))
            last_h = jnp.zeros((1, self.cfg.hidden_size), self.params.embed.dtype)
            self._prefilling.append(_Prefill(req, prompt, chunk, cache, last_h))

    def _prefill_some(self) -> None:
        """Prefill chunks (oldest request first) up to `prefill_budget` tokens per iteration;
        a finished prefill samples its first token and takes the next free row."""
        budget = self.config.prefill_budget
        while self._prefilling and budget > 0:
            p = self._prefilling[0]
            c, n = p.done_chunks, len(p.req.prompt)
            toks = jnp.asarray(p.prompt[:, c * p.chunk : (c + 1) * p.chunk])
            t0 = time.perf_counter()
            p.cache, p.last_h = _chunk_jit(self.params, self.cfg, toks, jnp.asarray([n], jnp.int32),
                                           jnp.int32(c), p.cache, p.last_h)  # fmt: skip
            jax.block_until_ready(p.last_h)
            dt = time.perf_counter() - t0
            if not self._note_compile(("chunk", p.chunk), dt):
                self.metrics.prefill_s += dt
            p.done_chunks += 1
            budget -= p.chunk
            if p.finished:
                self._prefilling.popleft()
                self._start(p)

    def _start(self, p: _Prefill) -> None:
        """The prefilled request's first token, and its row in the decode state."""
        req, n = p.req, len(p.req.prompt)
        sp = SamplingParams.make(1, req.temperature, req.top_k, req.top_p)
        t0 = time.perf_counter()
        row = _start_jit(self.params, self.draft, p.cache, p.last_h, jnp.asarray(p.prompt),
                         jax.random.key(req.seed), sp, jnp.asarray([req.max_tokens], jnp.int32),
                         spec=self.state_spec, context=self.config.max_context,
                         chunk=p.chunk)  # fmt: skip
        first, done = jax.device_get((row.tokens[0, 0], row.done[0]))  # one sync
        dt = time.perf_counter() - t0
        if not self._note_compile(("start", p.prompt.shape[1], p.chunk), dt):
            self.metrics.prefill_s += dt
        slot = len(self._active)  # active rows are packed: 0 .. n-1
        if slot == self.rows:  # the next bucket up
            self._resize(self._bucket(slot + 1))
        t0 = time.perf_counter()
        self.state = _insert_jit(self.state, row, jnp.int32(slot), self.axes)
        self._note_compile(("insert", self.rows), time.perf_counter() - t0)
        req.slot = slot
        self._active[slot] = req
        self.metrics.active_slots = len(self._active)
        self.metrics.prompt_tokens += n
        self._deliver(req, [int(first)], bool(done))

    def _decode_step(self) -> None:
        b = self.rows
        spec = self._choose(b)
        t0 = time.perf_counter()
        spec_b = spec or self.ar_spec
        self.state, new, done = _step_jit(self.params, self.draft, self.state, spec_b,
                                          self.state_spec.draft)  # fmt: skip
        new, done = jax.device_get((new, done))
        dt = time.perf_counter() - t0
        m = self.metrics
        m.steps += 1
        if not self._note_compile(("step", spec_b, b), dt):
            m.decode_s += dt
        live = emitted = 0
        for slot, req in list(self._active.items()):  # rows as the step saw them
            toks = [int(t) for t in new[slot] if t >= 0]
            if not toks:
                continue
            live, emitted = live + 1, emitted + len(toks)
            m.record_row_step(spec.num_speculated if spec else 0, len(toks))
            self._deliver(req, toks, bool(done[slot]))
        m.last_bucket, m.last_speculated = b, spec.num_speculated if spec else 0
        if spec is not None and live:  # the bucket's tau estimate follows what it observes
            self.tau_est[b] += 0.1 * (emitted / live - self.tau_est[b])
            m.tau_estimate = self.tau_est[b]

    def predicted_speedup(self, b: int) -> float | None:
        """tau_est · t_AR / t_spec of bucket b (None: its steps were not timed)."""
        t_ar, t_spec = self.step_s.get((b, True)), self.step_s.get((b, False))
        if self.specs[b] is None or t_ar is None or t_spec is None:
            return None
        return self.tau_est[b] * t_ar / t_spec

    def _choose(self, b: int) -> SpecConfig | None:
        """The bucket's speculation, or None (AR) where the cost model predicts no gain."""
        spec = self.specs[b]
        if spec is None or not self.config.gate:
            return spec
        gain = self.predicted_speedup(b)
        if gain is None or gain >= 1:
            return spec
        self._gated_steps[b] += 1
        return spec if self._gated_steps[b] % self.config.explore_every == 0 else None

    def _deliver(self, req: Request, toks: list[int], done: bool) -> None:
        """Hand a step's tokens to the request; finish it on EOS / max_tokens / a stop token."""
        reason = None
        for i, t in enumerate(toks):
            if t in req.stop_token_ids:
                toks, reason = toks[: i + 1], "stop"
                break
        now = time.perf_counter()
        if req.first_token is None:
            req.first_token = now
            self.metrics.observe(self.metrics.ttft, now - req.submitted)
        else:
            dt = (now - req.last_delivery) / len(toks)
            self.metrics.observe(self.metrics.token_latency, dt, len(toks))
        req.last_delivery = now
        req.n_out += len(toks)
        self.metrics.delivered(len(toks))
        req.on_tokens(toks)
        if reason is None and done:  # the step ended the row: EOS, else max_tokens
            reason = "stop" if toks[-1] in self.cfg.eos_token_ids else "length"
        if reason is not None:
            self._free(req.slot, reason)

    def _free(self, slot: int, reason: str) -> None:
        """Finish the request of row `slot`; the last active row moves into it (packing)."""
        req = self._active.pop(slot)
        last = len(self._active)  # the last active row, before this one was removed
        if last != slot:
            self.state = _move_jit(self.state, jnp.int32(last), jnp.int32(slot), self.axes)
            moved = self._active.pop(last)
            moved.slot = slot
            self._active[slot] = moved
        self.state = _release_jit(self.state, jnp.int32(last))
        self.metrics.active_slots = len(self._active)  # before the client hears it finished
        self._finish(req, reason)

    def _bucket(self, n: int) -> int:
        """The smallest batch bucket holding n rows."""
        return next(b for b in self.buckets if b >= n)

    def _maybe_shrink(self) -> None:
        """Shrink the state to the active rows' bucket once it has been too big for
        `shrink_after` iterations (hysteresis: a count hovering at a bucket edge does not
        copy the state back and forth)."""
        target = self._bucket(max(len(self._active), 1))
        self._oversized = self._oversized + 1 if target < self.rows else 0
        if self._oversized >= self.config.shrink_after or (target < self.rows
                                                            and not self._active):  # fmt: skip
            self._resize(target)
            self._oversized = 0

    def _resize(self, rows: int) -> None:
        """The decode state with `rows` rows (active rows are packed first, so a shrink keeps
        them all); timed as compile on the first resize of a shape."""
        if rows == self.rows:
            return
        t0 = time.perf_counter()
        empty = self._empty_state(rows - self.rows) if rows > self.rows else None
        self.state = _resize_jit(self.state, empty, rows, self.axes)
        jax.block_until_ready(self.state.done)
        dt = time.perf_counter() - t0
        if not self._note_compile(("resize", self.rows if empty is None else -rows, rows), dt):
            self.metrics.resize_s += dt
        self.metrics.resizes += 1

    def _finish(self, req: Request, reason: str) -> None:
        if req.finished:
            return
        req.finished = True
        self.metrics.finished(reason, time.perf_counter() - req.submitted)
        req.on_finish(reason, req.n_out)

    def _note_compile(self, key, seconds: float) -> bool:
        """True (and the seconds counted as compile time) on the first call of a shape."""
        if key in self._compiled:
            return False
        self._compiled.add(key)
        self.compile_s += seconds
        self.metrics.compile_s += seconds
        return True

    def _state_shapes(self, B: int):
        """The shapes of a B-row engine state (an admitted row's structure)."""
        chunk = min(self.config.chunk, 16)
        args = (jnp.zeros((B, 16), jnp.int32), jnp.zeros((B,), jnp.int32), jax.random.key(0),
                SamplingParams.make(B), jnp.ones((B,), jnp.int32))  # fmt: skip
        return jax.eval_shape(
            lambda p, d, *a: _row_state(p, d, *a, spec=self.state_spec,
                                        context=self.config.max_context, slots=self.slots,
                                        chunk=chunk),
            self.params, self.draft, *args,
        )  # fmt: skip

    def _empty_state(self, B: int) -> SpecState:
        """B free rows: the structure of an admitted state, zeros, `done` everywhere."""
        C = self.config.max_context
        state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._state_shapes(B))
        return state.replace(done=jnp.ones((B,), bool), rng=jax.random.key(0),
                             tokens=jnp.full((B, C), -1, jnp.int32),
                             sampling=SamplingParams.make(B))  # fmt: skip


def _state_spec(cfg: ModelConfig, specs: dict) -> SpecConfig:
    """The configuration whose state layout every bucket shares (checked)."""
    real = [s for s in specs.values() if s is not None]
    if not real:
        return ar_spec(cfg)
    base = real[0]
    for s in real:
        if s.magicdec is not None:
            raise ConfigError("the serving engine does not run MagicDec (use sssd, chain, tree)")
        if (s.ngram is None) != (base.ngram is None) or s.draft != base.draft:
            raise ConfigError("every bucket of the engine must draft the same way")
    return base
