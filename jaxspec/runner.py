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
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import sharding
from jaxspec.config import ModelConfig
from jaxspec.drafting.vocab import pair_in_layout
from jaxspec.errors import InputError
from jaxspec.generate import decode, prefill_jit
from jaxspec.kv_cache import check_fits
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


LAYOUTS = ("auto", "input", "output", "unrolled")
LAYOUT_ENV = "JAXSPEC_LAYOUT"  # what "auto" picks on a single CPU device (default: unrolled)


def resolve_layout(layout: str, mesh=None) -> str:
    """The layout ("input", "output" or "unrolled") of a `Runner(layout=...)` choice (see
    there)."""
    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "auto":
        if mesh is not None or jax.default_backend() != "cpu":
            return "input"
        env = os.environ.get(LAYOUT_ENV, "unrolled")
        if env not in LAYOUTS[1:]:
            raise InputError(f"{LAYOUT_ENV}={env!r}: must be one of {', '.join(LAYOUTS[1:])}")
        return env
    if layout in ("output", "unrolled") and mesh is not None:
        raise InputError(
            f"layout={layout!r} is for one device (the sharding rules name the input-major "
            "layout); use 'input' or 'auto' with a mesh"
        )
    return layout


def check_prompts(prompts: list[list[int]], cfg: ModelConfig, max_new_tokens: int):
    for i, ids in enumerate(prompts):
        if len(ids) == 0:
            raise InputError(f"prompt {i} is empty")
        if len(ids) + max_new_tokens > cfg.max_position_embeddings:
            raise InputError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it "
                f"exceeds the model's context of {cfg.max_position_embeddings} tokens"
            )


def spec_nodes(spec) -> int:
    """In-flight tokens per row and step of a bucket's configuration, root included (1: AR)."""
    if spec is None:
        return 1
    if spec.ngram is not None:
        return spec.ngram.num_nodes + 1
    return spec.tree.num_nodes


class Runner:
    """Runs generation over many prompts in batches, keeping compiled executables per bucket.

    Without `spec` it decodes autoregressively (`jaxspec.generate`); with a `SpecConfig` and the
    draft's params it runs the speculative step (`jaxspec.speculative`). `spec` may also be a
    function `(batch bucket, context) -> SpecConfig | None` (Sequoia's `--tree auto`): each
    batch then runs the configuration of its bucket (None: autoregressive), one compile per
    bucket; context = padded prompt length + output buffer."""

    def __init__(self, params: Params, cfg: ModelConfig, spec=None, draft_params=None, mesh=None,
                 time_phases: bool = True, layout: str = "auto"):  # fmt: skip
        """`mesh` (`jaxspec.sharding.make_mesh`): params sharded by the rules, each batch's rows
        over `data` (the batch is padded to a multiple of it); None: one device.
        `time_phases`: time the draft and verify phases of each speculative bucket apart (the
        draft/verify split of the metrics; extra compiles); off for studies of tokens per step.
        `layout` of the weights while decoding: "input" (input-major, as checkpoints hold
        them), "output" (`jaxspec.model.output_major`: stacked output-major), "unrolled"
        (`jaxspec.model.unrolled`: output-major, one array per layer; the fastest decode on
        CPU, at ~3x the compile time of "output") or "auto" (on a single CPU device the layout
        named by $JAXSPEC_LAYOUT, unrolled by default; input otherwise); params in another
        layout are converted (a copy)."""
        self.mesh, self.time_phases = mesh, time_phases
        self.layout = resolve_layout(layout, mesh)
        params, draft_params = pair_in_layout(params, draft_params, self.layout)
        if mesh is not None:
            params = sharding.shard_params(params, cfg, mesh)
            if isinstance(draft_params, Params):  # a draft model (not an n-gram datastore)
                draft = spec.draft if spec is not None and not callable(spec) else cfg
                draft_params = sharding.shard_params(draft_params, draft, mesh)
        self.params, self.cfg, self.spec, self.draft_params = params, cfg, spec, draft_params
        self.last_rows: list[dict] = []  # per prompt of the last run: tokens, steps, accepted
        self._compiled: dict[tuple, tuple] = {}
        self._profiled: dict[tuple, tuple] = {}  # bucket → compiled (draft, verify) phases

    def spec_for(self, B: int, context: int):
        """The SpecConfig (or None: AR) of a bucket."""
        return self.spec(B, context) if callable(self.spec) else self.spec

    def _executables(self, B: int, P: int, out_len: int, chunk: int, args, spec):
        key = (spec, B, P, out_len, chunk)
        if key in self._compiled:
            return self._compiled[key], 0.0
        # a clear error, with the size needed, before XLA fails to allocate the target cache
        itemsize = np.dtype(self.params.embed.dtype).itemsize
        n1 = 1 if spec is None else spec.num_nodes
        check_fits(self.cfg, B, P + out_len + n1, itemsize, "target KV cache")
        t0 = time.perf_counter()
        if spec is None:
            fn, dec, static = prefill_jit, decode, dict(cfg=self.cfg)
            lead, tail = (self.params,), (self.cfg,)
        else:
            from jaxspec.speculative import spec_decode, spec_prefill_jit

            fn, dec, static = spec_prefill_jit, spec_decode, dict(spec=spec)
            lead, tail = (self.params, self.draft_params), (spec,)
        static.update(max_new_tokens=out_len, chunk=chunk)
        pre = fn.lower(*lead, *args, **static).compile()
        shapes = jax.eval_shape(lambda *a: fn(*a, **static), *lead, *args)
        # the decode is compiled for the layout the prefill returns (sharded or not)
        state_shape = jax.tree_util.tree_map(
            lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
            shapes, pre.output_shardings,
        )  # fmt: skip
        if spec is None:  # decode(params, cfg, state)
            dec = dec.lower(*lead, *tail, state_shape).compile()
        else:  # spec_decode(params_t, params_d, state, spec)
            dec = dec.lower(*lead, state_shape, *tail).compile()
        self._compiled[key] = (pre, dec, lead)
        return self._compiled[key], time.perf_counter() - t0

    def _phase_times(self, state, bucket, spec, reps: int = 3) -> tuple[float, float, float]:
        """Per-step seconds of the draft phase and of the verify forward, timed separately at the
        step's shapes (the fused step cannot be split without host syncs); compile seconds."""
        from jaxspec.speculative import draft_phase, verify_phase

        compile_s = 0.0
        if bucket not in self._profiled:  # compile ahead of time, timed apart from running
            t0 = time.perf_counter()
            spec_args = (self.params, self.draft_params, state, spec)
            draft = draft_phase.lower(*spec_args).compile()
            drafted_shape = jax.eval_shape(
                lambda p, d, s: draft_phase(p, d, s, spec), *spec_args[:3]
            )
            verify = verify_phase.lower(*spec_args, drafted_shape).compile()
            self._profiled[bucket] = (draft, verify)
            compile_s = time.perf_counter() - t0
        draft, verify = self._profiled[bucket]
        args = (self.params, self.draft_params, state)  # compiled calls omit the static spec
        drafted = jax.block_until_ready(draft(*args))
        times = []
        for fn, extra in ((draft, ()), (verify, (drafted,))):
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                jax.block_until_ready(fn(*args, *extra))
                ts.append(time.perf_counter() - t)
            times.append(float(np.median(ts)))
        return times[0], times[1], compile_s

    def run(self, prompts: list[list[int]], opts: GenerateOptions) -> tuple[list, Metrics]:
        opts.validate()
        check_prompts(prompts, self.cfg, opts.max_new_tokens)
        m = Metrics(num_prompts=len(prompts), method="ar" if self.spec is None else "spec")
        outputs: list[list[int]] = []
        out_len = -(-opts.max_new_tokens // 32) * 32
        key = jax.random.key(opts.seed)
        n_batches, live_steps, accepted, drafted, hist, ranks = 0, 0, 0, 0, None, None
        self.last_rows = []
        ar_decode_s = 0.0
        for start in range(0, len(prompts), opts.batch_size):
            batch = prompts[start : start + opts.batch_size]
            B = min(next_pow2(len(batch)), next_pow2(opts.batch_size))
            if self.mesh is not None:  # rows split evenly over the data axis
                data = self.mesh.shape.get("data", 1)
                B = -(-B // data) * data
            P = prompt_bucket(max(map(len, batch)))
            chunk = min(opts.chunk, P & -P)  # P & -P: largest power of two dividing P
            if self.cfg.prefill is not None:  # CritiPrefill: whole segments, chunk = segment
                chunk = self.cfg.prefill.segment
                P = -(-P // chunk) * chunk
            arr = np.zeros((B, P), np.int32)
            lens = np.zeros((B,), np.int32)
            for i, ids in enumerate(batch):
                arr[i, : len(ids)], lens[i] = ids, len(ids)
            key, sub = jax.random.split(key)
            sp = SamplingParams.make(B, opts.temperature, opts.top_k, opts.top_p)
            max_new = jnp.full((B,), opts.max_new_tokens, jnp.int32)
            args = (jnp.asarray(arr), jnp.asarray(lens), sub, sp, max_new)
            if self.mesh is not None:
                rows = sharding.NamedSharding(self.mesh, sharding.logical_to_pspec(("batch",)))
                rep = sharding.NamedSharding(self.mesh, sharding.PartitionSpec())
                args = sharding.put(args, (rows, rows, rep, rows, rows))
            spec = self.spec_for(B, P + out_len)
            (pre, dec, lead), compile_s = self._executables(B, P, out_len, chunk, args, spec)
            m.compile_s += compile_s
            t0 = time.perf_counter()
            state = pre(*lead, *args)
            jax.block_until_ready(state)
            t1 = time.perf_counter()
            state = dec(*lead, state)
            jax.block_until_ready(state)
            t2 = time.perf_counter()
            m.prefill_s += t1 - t0
            m.decode_s += t2 - t1
            toks, n_out, rl, ra = sharding.gather((state.tokens, state.n_out, state.live_steps,
                                          state.accepted))  # fmt: skip
            n = len(batch)
            outputs += [toks[i, : n_out[i]].tolist() for i in range(n)]
            self.last_rows += [{"new_tokens": int(n_out[i]), "steps": int(rl[i]),
                                "accepted": int(ra[i]), "batch_size": B,
                                "tree_nodes": spec_nodes(spec),
                                "batch_decode_s": t2 - t1} for i in range(n)]  # fmt: skip
            m.target_steps += int(state.steps)
            m.new_tokens += int(n_out[:n].sum())
            if spec is not None and self.time_phases:
                t_draft, t_verify, c_s = self._phase_times(state, (spec, B, P, out_len, chunk),
                                                           spec)  # fmt: skip
                m.compile_s += c_s
                m.draft_s += t_draft * int(state.steps)
                m.verify_s += t_verify * int(state.steps)
            if spec is not None:
                live = int(np.asarray(state.live_steps)[:n].sum())
                live_steps += live
                drafted += live * spec.num_speculated
                accepted += int(np.asarray(state.accepted)[:n].sum())
                hist = _add(hist, np.asarray(state.accept_hist)[:n].sum(0))
                ranks = _add(ranks, np.asarray(state.rank_hist)[:n].sum(0), keep_last=True)
            elif self.spec is not None:  # an autoregressive bucket of a per-bucket runner:
                ar_decode_s += t2 - t1  # each live row-step emits one token, accepts none
                row_steps = int(n_out[:n].sum()) - n
                live_steps += row_steps
                hist = _add(hist, np.asarray([row_steps]))
            n_batches += 1
        after_first = m.new_tokens - len(prompts)
        m.tokens_per_s = after_first / m.decode_s if m.decode_s > 0 else 0.0
        m.ttft_s = m.prefill_s / max(n_batches, 1)
        if self.spec is None:
            m.verify_s = m.decode_s  # an AR step is one target forward (+ sampling)
        else:
            m.verify_s += ar_decode_s
            m.other_s = max(0.0, m.decode_s - m.draft_s - m.verify_s)
        self.last_rank_hist = ranks  # summed over the prompts of this run (None for AR)
        if self.spec is not None and live_steps:
            fill_spec_metrics(m, drafted, after_first, live_steps, accepted, hist, ranks)
        return outputs, m


def _add(total: np.ndarray | None, part: np.ndarray, keep_last: bool = False) -> np.ndarray:
    """total + part for histograms of different lengths (zero-padded; `keep_last`: the last
    column is a separate category, e.g. "none", and stays last)."""
    if total is None:
        return part
    n = max(len(total), len(part))

    def pad(x):
        if keep_last:
            return np.concatenate([x[:-1], np.zeros(n - len(x), x.dtype), x[-1:]])
        return np.concatenate([x, np.zeros(n - len(x), x.dtype)])

    return pad(total) + pad(part)


def fill_spec_metrics(m: Metrics, drafted: int, emitted: int, live_steps: int, accepted: int,
                      hist: np.ndarray, ranks: np.ndarray | None = None) -> None:  # fmt: skip
    """tau = decode tokens per live target step (bonus included); acceptance = accepted drafted
    tokens / drafted tokens (N per live step, summed); per-depth: P(a >= d | a >= d - 1);
    per-rank: P(the rank-k child is accepted) over visited nodes that have children."""
    if ranks is not None and ranks.sum():
        m.per_rank_acceptance = [float(x) for x in ranks[:-1] / ranks.sum()]
    m.tau = emitted / live_steps
    m.acceptance_rate = accepted / drafted if drafted else None
    reach = hist[::-1].cumsum()[::-1]  # reach[d] = steps with a >= d
    m.per_depth_acceptance = [
        float(reach[d] / reach[d - 1]) if reach[d - 1] else 0.0 for d in range(1, len(reach))
    ]
