"""`jaxspec bench --long-context`: MagicDec's batch × context sweep (ALGORITHMS.md §1(e)).

For each context length n (`--context-lengths`) the prompts are n-token windows of the books in
`--prompts-file` (JSONL records with a `text` field; tokenized without the chat template; window
i comes from book i mod #books, at offset `--skip` + (i div #books)·n tokens). Per context:

  1. Prefill `--distinct-rows` D windows once (dense, timed: TTFT). Every batch size B reuses
     this prefill: the state for B rows is gathered from the D prefilled rows (row r = window
     r mod D). Rows are real text, but a batch of B > D rows holds only D distinct windows:
     throughput is honest (no row shares work with another), acceptance is measured on D windows.
  2. Acceptance vs budget: at B = D, self-speculation (`--draft-builder`) with a chain of γ_ref =
     max(--gammas) for each budget K in `--budgets`: α(K) = Σ_d reach_d ÷ Σ_d reach_{d−1}
     (the per-token acceptance that fits a geometric chain; reach_d = steps accepting ≥ d).
  3. For each batch size B: the timing table t(B, n, s) (target forward of s tokens per row over
     the n-token cache, s = 1 … max γ + 1) and t(B, K, 1) (a draft step over a K-slot cache),
     medians of a few runs after a warm-up; the whole-step times T_step(γ) of one `spec_step`
     on a fresh decode state for γ = 0 (AR) and every γ in `--gammas` at `--draft-budget` K0,
     and T_step(γ_max, K) for the largest γ at every other budget K, in 3 interleaved rounds
     relative to AR's step (`LongBench.step_times`); then AR decoding and MagicDec for every γ in
     `--gammas` at K0, plus the chooser's pick if it is not among them, in `--rounds`
     interleaved rounds (each round decodes AR and every configuration once, in an order
     rotated per round). Each run decodes `--max-new-tokens` tokens per row (the first comes
     from the prefill) and covers every base window: a batch of B < D rows decodes ceil(D / B)
     batches (so B = 1 measures all D windows, as the acceptance profile does, not window 0
     alone). Every configuration's tokens must equal AR's, row for row, or the run stops with
     an error.
  4. Predicted speedup of every configuration = E(γ, K) · T_step(0) / (T_step(γ) + γ·δ(K)),
     T_step(γ ≥ 1) read through the least-squares line over γ (`StepTiming.t_step_fit`),
     δ(K) = (T_step(γ_max, K) − T_step(γ_max, K0)) / γ_max: one draft step's cost change from K0
     to K, measured inside whole steps (or the isolated forwards' change where that is larger;
     `costmodel.predict_by_steps`; E from the accepted-length
     histogram of step 2, as the tokens per step of a static batch of B rows that each decode
     `--max-new-tokens` − 1 tokens: the batch steps until its slowest row is done,
     `costmodel.batch_tokens_per_step`),
     shown beside the forward-only Ω(γ, α(K)) · t(B,n,1) / (γ·t(B,K,1) + t(B,n,γ+1))
     (`costmodel.speedup_chain`); measured speedup = median over rounds of MagicDec decode
     tokens/s ÷ AR decode tokens/s of the same round. The chooser
     (`costmodel.choose_speculation` with the step table) picks (γ, K) or AR; its pick's
     measured speedup is compared with the best measured configuration.
Compile time is excluded from every timing. Results go to stdout as Markdown, `--json`, the
`--out-md` section (markers `<!-- bench-long:start/end -->`) and the MagicDec profile TOML that
`--gamma auto` reads (`--profile-out`, default configs/profiles/magicdec__<device>__<model>.toml).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shlex
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.errors import InputError

START, END = "<!-- bench-long:start -->", "<!-- bench-long:end -->"


def log(msg: str):
    from jaxspec.bench import log as _log

    _log(msg)


def book_windows(path: Path, tokenizer, n: int, count: int, skip: int) -> list[list[int]]:
    """`count` windows of n tokens (see the module docstring)."""
    from jaxspec.fsutil import iter_jsonl

    books = []
    need = (skip + n * count) * 6  # characters: plenty for the windows (≈ 4 per token)
    for line, rec in iter_jsonl(path, "books file"):
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise InputError(f"{path}:{line}: expected an object with a 'text' string")
        books.append(tokenizer.encode(rec["text"][:need], chat=False))
    if not books:
        raise InputError(f"{path}: no records")
    out = []
    for i in range(count):
        ids = books[i % len(books)]
        off = skip + (i // len(books)) * n
        if off + n > len(ids):
            raise InputError(f"{path}: book {i % len(books)} has {len(ids)} tokens, too few for "
                             f"a window of {n} at offset {off}")  # fmt: skip
        out.append(ids[off : off + n])
    return out


def geometric_alpha(accept_hist: np.ndarray) -> float:
    """Per-token acceptance of a chain from its accepted-length histogram [γ + 1]."""
    reach = accept_hist[::-1].cumsum()[::-1]  # reach[d] = steps accepting >= d
    den = reach[:-1].sum()
    return float(reach[1:].sum() / den) if den else 0.0


def _median_time(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


class LongBench:
    """One model, one context length: the prefilled base rows and the runs gathered from them."""

    def __init__(self, model, n: int, rows: list[list[int]], slots: int):
        from jaxspec.prefill import prefill_cache
        from jaxspec.runner import prompt_bucket

        self.model, self.n = model, n
        self.P = prompt_bucket(n)
        D = len(rows)
        arr = np.zeros((D, self.P), np.int32)
        for i, ids in enumerate(rows):
            arr[i, : len(ids)] = ids
        self.prompts = jnp.asarray(arr)
        lengths = jnp.full((D,), n, jnp.int32)
        chunk = min(256, self.P & -self.P)
        self.chunk = chunk
        pre = jax.jit(prefill_cache, static_argnames=("cfg", "slots", "chunk"))
        kw = dict(slots=slots, chunk=chunk)
        t0 = time.perf_counter()
        exe = pre.lower(model.params, model.cfg, self.prompts, lengths, **kw).compile()
        self.compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.cache, self.last_h = jax.block_until_ready(exe(model.params, self.prompts, lengths))
        self.prefill_s = time.perf_counter() - t0
        self._start = jax.jit(_start_gathered, static_argnames=("spec", "max_new_tokens", "chunk"))
        self._dec: dict = {}  # (spec, B, max_new_tokens) -> compiled decode loop

    def drop_compiled(self) -> None:
        """Release every compiled program: the decode loops this object holds (`jax.clear_caches`
        alone keeps them alive) and JAX's caches. Compiled unrolled programs map memory regions
        by the thousand (~110 per forward); a sweep that kept each bucket's decode loops
        crashed at 1K × 32 on the kernel's map-count limit (vm.max_map_count, 65 530 here)."""
        self._dec.clear()
        jax.clear_caches()

    def state(self, spec, B: int, max_new_tokens: int, offset: int = 0):
        """A fresh decode state of B rows: row r is base window (offset + r) mod D."""
        from jaxspec.sampling import SamplingParams

        idx = (jnp.arange(B) + offset) % self.prompts.shape[0]
        max_new = jnp.full((B,), max_new_tokens, jnp.int32)
        return self._start(self.model.params, self.model.params, self.cache, self.last_h,
                           self.prompts, idx, jax.random.key(0), SamplingParams.make(B),
                           max_new, spec=spec, max_new_tokens=max_new_tokens,
                           chunk=self.chunk)  # fmt: skip

    def offsets(self, B: int) -> list[int]:
        """First base windows of the batches one pass decodes: a batch of B < D rows cannot
        hold every window, so a pass decodes ceil(D / B) batches (offsets 0, B, 2B, …) and
        covers all D windows, as larger batches do; B >= D: one batch."""
        D = self.prompts.shape[0]
        return list(range(0, D, B)) if B < D else [0]

    def run(self, spec, B: int, max_new_tokens: int, max_runs: int = 3,
            min_s: float = 10.0) -> dict:  # fmt: skip
        """Decode with `spec` (chain(0) = AR) at batch B: tokens/s, tau, α, compile seconds and
        every row's tokens. One run is one pass over `offsets(B)` (every base window at least
        once); runs are repeated on fresh states until `max_runs` runs or `min_s` seconds of
        decoding, and the median run time is kept. The compiled decode loop is cached per
        (spec, B), so interleaved rounds compile each configuration once."""
        from jaxspec.speculative import spec_decode

        p = self.model.params
        key = (spec, B, max_new_tokens)
        compile_s = 0.0
        if key not in self._dec:
            state = self.state(spec, B, max_new_tokens)
            t0 = time.perf_counter()
            self._dec[key] = spec_decode.lower(p, p, state, spec).compile()
            compile_s = time.perf_counter() - t0
            del state
        dec = self._dec[key]
        times = []
        while True:
            run_s, toks_out, hist, emitted, live, steps = 0.0, [], 0, 0, 0, 0
            for off in self.offsets(B):
                state = jax.block_until_ready(self.state(spec, B, max_new_tokens, off))
                t0 = time.perf_counter()
                state = jax.block_until_ready(dec(p, p, state))
                run_s += time.perf_counter() - t0
                n_out = np.asarray(state.n_out)
                toks = np.asarray(state.tokens)
                hist = hist + np.asarray(state.accept_hist).sum(0)
                emitted += int(n_out.sum()) - B
                live += int(np.asarray(state.live_steps).sum())
                steps += int(state.steps)
                toks_out += [toks[i, : n_out[i]].tolist() for i in range(B)]
                del state
            times.append(run_s)
            if len(times) >= max_runs or sum(times) >= min_s:
                break
        decode_s = float(np.median(times))
        return {"tokens_per_s": emitted / decode_s, "decode_s": decode_s, "compile_s": compile_s,
                "decode_runs": len(times), "tau": emitted / live if live else 0.0,
                "steps": steps, "alpha": geometric_alpha(hist) if spec.num_speculated else None,
                "accept_hist": np.asarray(hist).tolist(), "tokens": toks_out}  # fmt: skip

    def step_times(self, specs: dict, B: int, max_new_tokens: int, reps: int,
                   rounds: int = 3, ref=0) -> dict:  # fmt: skip
        """{key: seconds of one whole `spec_step`} for each {key: spec} (`ref` must be among the
        keys: the AR step), timed on fresh decode states of B rows (compile and one warm-up step
        excluded).

        This VM's speed drifts by up to 2× over minutes, and a γ timed alone once read 2.5× slow.
        So the configurations are timed in `rounds` interleaved rounds (each round: every γ, in
        an order rotated per round, `reps` steps each, one state at a time so that memory stays
        at one decode state). Within a round each γ's median step is divided by the AR median of
        the same round; the ratio kept is the median over rounds, and the seconds returned are
        that ratio × the median AR step over all rounds. Step cost is fixed by the shapes, so a
        few steps time it; acceptance is not involved."""
        from jaxspec.speculative import spec_step

        if ref not in specs:
            raise ValueError(f"step_times needs the AR step ({ref!r}) as its reference")
        p = self.model.params
        exes = {}
        gs = list(specs)
        per_round: list[dict] = []
        for r in range(max(rounds, 1)):
            order = gs[r % len(gs) :] + gs[: r % len(gs)]
            got = {}
            for g in order:
                state = self.state(specs[g], B, max_new_tokens)
                if g not in exes:
                    exes[g] = spec_step.lower(p, p, state, specs[g]).compile()
                state = jax.block_until_ready(exes[g](p, p, state))  # warm-up
                ts = []
                for _ in range(max(reps, 3)):
                    t0 = time.perf_counter()
                    state = jax.block_until_ready(exes[g](p, p, state))
                    ts.append(time.perf_counter() - t0)
                got[g] = ts
                del state
            per_round.append(got)
        ar_all = float(np.median([t for got in per_round for t in got[ref]]))
        out = {}
        for g in gs:
            ratios = [np.median(got[g]) / np.median(got[ref]) for got in per_round]
            out[g] = float(np.median(ratios)) * ar_all
        return out

    def timings(self, B: int, tokens: list[int], budgets: list[int], reps: int) -> dict:
        """t(B, n, s) for s in `tokens` and t(B, K, 1) for K in `budgets` (seconds)."""
        from jaxspec.kv_cache import init_cache
        from jaxspec.model import forward
        from jaxspec.model.params import is_unrolled

        cfg = self.model.cfg
        idx = jnp.arange(B) % self.prompts.shape[0]

        @jax.jit
        def fwd(params, cache, toks):
            pos = cache.lengths[:, None] + jnp.arange(toks.shape[1])[None]
            return forward(params, cfg, toks, pos, cache)[0]  # the cache writes are dead code

        @jax.jit
        def gathered(cache):  # held per layer for unrolled weights, as decoding holds it
            cache = cache.replace(k=cache.k[:, idx], v=cache.v[:, idx], lengths=cache.lengths[idx])
            return cache.layered() if is_unrolled(self.model.params) else cache

        cache = gathered(self.cache)
        t = {}
        for s in tokens:
            t[(self.n, s)] = _median_time(fwd, self.model.params, cache,
                                          jnp.ones((B, s), jnp.int32), reps=reps)  # fmt: skip
        del cache
        for K in budgets:
            small = init_cache(cfg, B, K + 1, self.cache.k.dtype, self.cache.k_slot_last)
            small = small.replace(lengths=jnp.full((B,), K, jnp.int32))
            if is_unrolled(self.model.params):  # per layer, as decoding holds MagicDec's cache
                small = small.layered()
            t[(K, 1)] = _median_time(fwd, self.model.params, small, jnp.ones((B, 1), jnp.int32),
                                     reps=reps)  # fmt: skip
        return t


def _start_gathered(params_t, params_d, cache, last_h, prompts, idx, key, sampling, max_new, *,
                    spec, max_new_tokens, chunk):  # fmt: skip
    """`spec_start` for B rows gathered (row r = base row idx[r]) from the prefilled base rows."""
    from jaxspec.speculative import decode_layout, spec_start

    cache = cache.replace(k=cache.k[:, idx], v=cache.v[:, idx], lengths=cache.lengths[idx])
    state = spec_start(params_t, params_d, cache, last_h[idx], prompts[idx], key, sampling,
                       max_new, spec=spec, max_new_tokens=max_new_tokens, chunk=chunk)  # fmt: skip
    return decode_layout(params_t, params_d, spec, state)  # per-layer caches, as `spec_prefill`


def step_table(steps: dict, batches: list[int], contexts: list[int], budget: int,
               budget_steps: dict | None = None) -> dict:  # fmt: skip
    """A `costmodel.StepTiming` table from {context: {batch: {γ: seconds}}} and, optionally, the
    largest γ's steps at every budget {context: {batch: {K: seconds}}}."""
    gammas = sorted(steps[contexts[0]][batches[0]])
    grid = [[[steps[c][b][g] for g in gammas] for c in contexts] for b in batches]
    out = {"step_batches": batches, "step_contexts": contexts, "step_gammas": gammas,
           "step_budget": budget, "step_s": grid}  # fmt: skip
    if budget_steps:
        ks = sorted(budget_steps[contexts[0]][batches[0]])
        out |= {"step_budgets": ks, "budget_gamma": gammas[-1],
                "budget_step_s": [[[budget_steps[c][b][k] for k in ks] for c in contexts]
                                  for b in batches]}  # fmt: skip
    return out


def measured_table(timings: dict, batches: list[int], contexts: list[int], tokens: list[int]):
    """A `jaxspec profile device`-style table {batches, contexts, tokens, target_s} from the
    measured points (t(B, n, s) at the bench contexts, t(B, K, 1) at the budgets: missing
    (context, s) points of budget contexts are filled from s = 1 scaled by the context's own
    s-profile, which the chooser never reads for drafts)."""
    target = []
    for b in batches:
        tb = timings[b]
        rows = []
        for c in contexts:
            if (c, tokens[-1]) in tb:
                rows.append([tb[(c, s)] for s in tokens])
            else:  # a budget context: only s = 1 is measured (a draft step)
                rows.append([tb[(c, 1)]] * len(tokens))
        target.append(rows)
    return {"batches": batches, "contexts": contexts, "tokens": tokens, "target_s": target}


def cmd_bench_long(args) -> int:
    from jaxspec import costmodel
    from jaxspec.bench import machine_info, machine_line, write_section
    from jaxspec.cli import _int_list, build_magicdec_config
    from jaxspec.drafting.vocab import in_layout
    from jaxspec.kv_cache import check_fits
    from jaxspec.models import load_model
    from jaxspec.runner import resolve_layout
    from jaxspec.speculative import SpecConfig
    from jaxspec.trees import chain

    if args.prompts_file is None:
        raise InputError("--long-context needs --prompts-file (a JSONL of books with 'text', "
                         "e.g. long_context/books.jsonl)")  # fmt: skip
    batches = _int_list(args.batch_sizes, "--batch-sizes")
    contexts = _int_list(args.context_lengths, "--context-lengths")
    budgets = _int_list(args.budgets, "--budgets")
    gammas = _int_list(args.gammas, "--gammas")
    if args.rounds < 1:
        raise InputError(f"--rounds must be >= 1, got {args.rounds}")
    if args.distinct_rows < 1:
        raise InputError(f"--distinct-rows must be >= 1, got {args.distinct_rows}")
    if args.temperature != 0:
        raise InputError("--long-context measures greedy decoding: use --temperature 0")
    md0 = build_magicdec_config(args)
    model = load_model(args.model, args.dtype, progress=True, attention=args.attention)
    layout = resolve_layout(args.layout)  # what a `Runner` decodes with (unrolled on one CPU)
    model = dataclasses.replace(model, params=in_layout(model.params, layout))
    cfg = model.cfg
    out_len = args.max_new_tokens
    n1 = max(gammas) + 1
    for n in contexts:
        if n + out_len + n1 > cfg.max_position_embeddings:
            raise InputError(f"context {n} + {out_len} new tokens exceeds the model's "
                             f"{cfg.max_position_embeddings} positions")  # fmt: skip
    if model.tokenizer is None:
        raise InputError(f"{model.path}: no tokenizer.json")
    itemsize = np.dtype(model.params.embed.dtype).itemsize
    tokens = list(range(1, n1 + 1))
    ref_gamma = max(gammas)
    results, alphas_by_ctx, timings_by_ctx, hists_by_ctx, steps_by_ctx = [], {}, {}, {}, {}
    bsteps_by_ctx: dict = {}
    t_all = time.perf_counter()

    def check(r: dict, ref: dict, where: str) -> None:
        """Record the fraction of rows whose tokens equal AR's; raise on a difference unless
        --on-mismatch report."""
        same = [a == b for a, b in zip(r["tokens"], ref["tokens"], strict=True)]
        r["rows_identical"] = sum(same) / len(same)
        if all(same):
            return
        if args.on_mismatch == "raise":
            raise RuntimeError(f"MagicDec output differs from AR {where} (--on-mismatch report "
                               "records it and goes on)")  # fmt: skip
        log(f"{where}: {sum(same)}/{len(same)} rows identical to AR")

    def spec_of(g, K):
        if g == 0:
            return SpecConfig(cfg, cfg, chain(0))
        md = dataclasses.replace(md0, budget=K)
        return SpecConfig(cfg, cfg, chain(g), "greedy", magicdec=md)

    for n in contexts:
        from jaxspec.runner import prompt_bucket

        D = min(args.distinct_rows, max(batches))
        slots = prompt_bucket(n) + out_len + n1
        rows = book_windows(args.prompts_file, model.tokenizer, n, D, args.skip)
        bench = LongBench(model, n, rows, slots)
        log(f"context {n}: prefilled {D} windows in {bench.prefill_s:.1f} s "
            f"(compile {bench.compile_s:.1f} s)")  # fmt: skip
        ar_ref = bench.run(spec_of(0, 0), D, out_len)
        alphas, hists = {}, {}
        for K in budgets:
            r = bench.run(spec_of(ref_gamma, K), D, out_len)
            check(r, ar_ref, f"at context {n}, budget {K}")
            alphas[K], hists[K] = r["alpha"], r["accept_hist"]
            log(f"context {n}: budget {K}: alpha {r['alpha']:.3f}, tau {r['tau']:.2f} "
                f"(γ = {ref_gamma})")  # fmt: skip
        alphas_by_ctx[n], hists_by_ctx[n] = alphas, hists
        bench.drop_compiled()  # the acceptance runs' programs (see the end of a batch bucket)
        for B in batches:
            try:
                # the gathered cache, XLA's working copy of it in the decode loop and the
                # prefilled base rows: a batch at 8K × 32 rows was OOM-killed at 1.1 copies
                check_fits(cfg, B, slots, itemsize, "target KV cache", copies=2.2)
            except InputError as e:
                log(f"context {n}, batch {B}: skipped: {e}")
                results.append({"context": n, "batch": B, "skipped": str(e)})
                continue
            t = bench.timings(B, tokens, budgets, args.reps)
            timings_by_ctx.setdefault(n, {})[B] = t
            # whole steps: AR, every γ at the reference budget K0 and the largest γ at every
            # other budget (the draft's cost per budget, measured inside the step)
            K0, gmax = md0.budget, max(gammas)
            keys = [(0, 0), *[(g, K0) for g in gammas],
                    *[(gmax, K) for K in sorted(set(budgets) - {K0})]]  # fmt: skip
            st_all = bench.step_times({k: spec_of(*k) for k in keys}, B, out_len, args.reps,
                                      ref=(0, 0))  # fmt: skip
            step = {g: st_all[(g, K0) if g else (0, 0)] for g in [0, *gammas]}
            bstep = {K: st_all[(gmax, K)] for K in sorted(set(budgets) | {K0})}
            steps_by_ctx.setdefault(n, {})[B] = step
            bsteps_by_ctx.setdefault(n, {})[B] = bstep
            table = measured_table({B: t}, [B], sorted(set(budgets) | {n}), tokens)
            timing = costmodel.MeasuredTiming.from_table(table, source="bench")
            st = step_table({n: {B: step}}, [B], [n], K0, {n: {B: bstep}})
            steps = costmodel.StepTiming.from_table(st, source="bench")
            # a static batch of B rows each decoding out_len - 1 tokens (the first comes from
            # the prefill): it steps until its slowest row is done
            per_row = max(out_len - 1, 1)
            pick = costmodel.choose_speculation(alphas, timing, B, n, gammas=gammas, steps=steps,
                                                hists=hists, tokens_per_row=per_row)  # fmt: skip
            configs = [(g, md0.budget) for g in gammas]
            if pick is not None and (pick.gamma, pick.budget) not in configs:
                configs.append((pick.gamma, pick.budget))
            # Measured decoding in interleaved rounds: each round decodes AR and every
            # configuration once (one pass over the windows), in an order rotated per round, and
            # each configuration's speedup is its tokens/s over AR's in the same round, median
            # over rounds. This VM's speed drifts by 10-30% over minutes, so a configuration
            # compared with an AR run minutes apart could gain or lose that much.
            runs: dict = {k: [] for k in [(0, 0), *configs]}
            names = list(runs)
            for rnd in range(args.rounds):
                for k in names[rnd % len(names) :] + names[: rnd % len(names)]:
                    r = bench.run(spec_of(*k), B, out_len, max_runs=1)
                    if k != (0, 0):  # round 1 starts with AR: its tokens are the reference
                        check(r, runs[(0, 0)][0],
                              f"at context {n}, batch {B}, γ = {k[0]}, budget {k[1]}")  # fmt: skip
                    runs[k].append(r)
                    log(f"context {n}, batch {B}, round {rnd + 1}: "
                        + ("AR" if k == (0, 0) else f"γ={k[0]} K={k[1]}")
                        + f": {r['tokens_per_s']:.1f} tok/s, tau {r['tau']:.2f}")  # fmt: skip
            ar_tps = [r["tokens_per_s"] for r in runs[(0, 0)]]
            ar_ref_tps = float(np.median(ar_tps))
            row = {"context": n, "batch": B, "ar_tokens_per_s": ar_ref_tps,
                   "ar_tokens_per_s_runs": ar_tps, "rounds": len(ar_tps),
                   "ar_compile_s": runs[(0, 0)][0]["compile_s"],
                   "prefill_s_per_row": bench.prefill_s / D,
                   "pick": None if pick is None else [pick.gamma, pick.budget],
                   "pick_predicted": None if pick is None else pick.speedup,
                   "t_ar_step_s": t[(n, 1)], "step_s": {str(g): v for g, v in step.items()},
                   "budget_step_s": {str(k): v for k, v in bstep.items()},
                   "configs": []}  # fmt: skip
            for g, K in configs:
                K_eff = min(K, n)
                pred_fwd = costmodel.speedup_chain(
                    alphas[K],
                    g,
                    t[(n, 1)],
                    t[(K_eff, 1)] if (K_eff, 1) in t else t[(K, 1)],
                    t[(n, g + 1)],
                )
                pred = costmodel.predict_by_steps(alphas[K], hists[K], timing, steps, B, n, g,
                                                  K, per_row)[0]  # fmt: skip
                rs = runs[(g, K)]
                ratios = [r["tokens_per_s"] / a for r, a in zip(rs, ar_tps, strict=True)]
                c = {"gamma": g, "budget": K, "predicted": pred, "predicted_forward": pred_fwd,
                     "tau": rs[0]["tau"], "alpha": rs[0]["alpha"],
                     "tokens_per_s": float(np.median([r["tokens_per_s"] for r in rs])),
                     "tokens_per_s_runs": [r["tokens_per_s"] for r in rs],
                     "measured_runs": ratios, "measured": float(np.median(ratios)),
                     "rows_identical": min(r["rows_identical"] for r in rs),
                     "compile_s": rs[0]["compile_s"]}  # fmt: skip
                row["configs"].append(c)
                log(f"context {n}, batch {B}: γ={g} K={K}: {c['measured']:.2f}× measured "
                    f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)}), {pred:.2f}× "
                    "predicted")  # fmt: skip
            best = max(row["configs"], key=lambda c: c["measured"])
            row["best"] = [best["gamma"], best["budget"], best["measured"]]
            if pick is None:
                row["pick_measured"] = 1.0
            else:
                chosen = (pick.gamma, pick.budget)
                row["pick_measured"] = next(
                    c["measured"] for c in row["configs"] if (c["gamma"], c["budget"]) == chosen
                )
            results.append(row)
            # drop this bucket's compiled programs (the next bucket's shapes differ): compiled
            # unrolled programs map memory regions by the thousand (~110 per forward, ~15 000
            # per batch bucket at 1K), and the 8K sweep in the runner's layout aborted in its
            # second batch when mmap hit the kernel's map-count limit (65 530 here; "LLVM
            # ERROR: Unable to allocate section memory")
            bench.drop_compiled()
            if args.json is not None:  # partial results survive a crash of a later bucket
                args.json.write_text(json.dumps({"partial": True, "alphas": {
                    str(k): {str(b): a for b, a in v.items()} for k, v in alphas_by_ctx.items()},
                    "accept_hists": {str(k): {str(b): h for b, h in v.items()}
                                     for k, v in hists_by_ctx.items()},
                    "forward_s": {str(c): {str(b): {f"{k[0]},{k[1]}": v for k, v in tb.items()}
                                           for b, tb in tc.items()}
                                  for c, tc in timings_by_ctx.items()},
                    "results": results}, indent=1) + "\n")  # fmt: skip
        del bench
        jax.clear_caches()  # a long sweep's compiled programs add up (8K × 16 ran out of memory)
    total_s = time.perf_counter() - t_all
    report = {
        "model": str(model.name), "dtype": args.dtype, "layout": layout,
        "builder": md0.builder, "sink": md0.sink,
        "budget": md0.budget, "gammas": gammas, "budgets": budgets, "batches": batches,
        "contexts": contexts, "max_new_tokens": out_len, "distinct_rows": args.distinct_rows,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "jax_version": jax.__version__, "machine": machine_info(),
        "command": "jaxspec " + shlex.join(getattr(args, "argv", []) or ["bench"]),
        "alphas": {str(n): {str(k): a for k, a in al.items()} for n, al in alphas_by_ctx.items()},
        "accept_hists": {str(n): {str(k): h for k, h in hs.items()}
                         for n, hs in hists_by_ctx.items()},
        "results": results, "total_s": total_s,
    }  # fmt: skip
    from jaxspec.hardware import measure_roofline

    add_analytic(report, cfg, measure_roofline(args.dtype))
    md = report_markdown(report, machine_line(report["machine"]))
    print(md)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.out_md is not None:
        write_section(args.out_md, md, START, END)
    prof = args.profile_out or magicdec_profile_path(Path(str(model.name)).name)
    write_profile(prof, report, timings_by_ctx, steps_by_ctx, budgets, tokens, bsteps_by_ctx)
    log(f"wrote the MagicDec profile {prof}")
    return 0


def magicdec_profile_path(model_name: str) -> Path:
    """configs/profiles/magicdec__<platform>-<device kind>__<model>.toml (default device)."""
    from jaxspec.profiling import device_profile_path

    dev = device_profile_path(model_name)
    return dev.with_name(dev.name.replace("device__", "magicdec__", 1))


def add_analytic(report: dict, cfg, roofline) -> None:
    """Add the analytic cost model's view (`costmodel.step_time` with the measured roofline,
    itemsize 4) to a report: per configuration the predicted speedup from FLOPs/bytes alone,
    and the critical context length per batch (s = 1 and s = γ + 1 of the largest γ)."""
    from jaxspec import costmodel

    def t(b, n, s):
        return costmodel.step_time(cfg, roofline, b, n, s, 4)

    for row in report["results"]:
        if "skipped" in row:
            continue
        b, n = row["batch"], row["context"]
        for c in row["configs"]:
            a = report["alphas"][str(n)][str(c["budget"])]
            g, K = c["gamma"], min(c["budget"], n)
            c["analytic"] = costmodel.speedup_chain(a, g, t(b, n, 1), t(b, K, 1), t(b, n, g + 1))
    s_max = max(report["gammas"]) + 1
    report["critical_length"] = {
        str(b): [costmodel.critical_length(cfg, roofline, b, s, 4) for s in (1, s_max)]
        for b in report["batches"]
    }
    report["roofline"] = roofline.to_dict()


def write_profile(path: Path, report: dict, timings_by_ctx: dict, steps_by_ctx: dict, budgets,
                  tokens, bsteps_by_ctx: dict | None = None):  # fmt: skip
    """The MagicDec profile `--gamma auto` reads: α and the accepted-length histogram per
    (context, budget), the measured forward table per batch over the union of bench contexts
    and budgets, the whole-step table step_s[batch][context][γ] at the bench's budget and, when
    timed, the largest γ's steps at every budget budget_step_s[batch][context][budget]."""
    from jaxspec.profiling import write_toml

    contexts = sorted({int(n) for n in timings_by_ctx})
    batches = sorted({b for t in timings_by_ctx.values() for b in t})
    batches = [b for b in batches if all(b in timings_by_ctx[n] for n in contexts)]
    merged = {b: {k: v for n in contexts for k, v in timings_by_ctx[n][b].items()}
              for b in batches}  # fmt: skip
    table = measured_table(merged, batches, sorted(set(budgets) | set(contexts)), tokens)
    body = {"model": report["model"], "command": report["command"], "date": report["date"],
            "builder": report["builder"], "sink": report["sink"], "budgets": list(budgets),
            "alpha_contexts": contexts,
            "alpha": [[report["alphas"][str(n)][str(k)] for k in budgets] for n in contexts],
            "accept_hist": [[report["accept_hists"][str(n)][str(k)] for k in budgets]
                            for n in contexts],
            **table, **step_table(steps_by_ctx, batches, contexts, report["budget"],
                                  bsteps_by_ctx)}  # fmt: skip
    write_toml(path, body, ["MagicDec profile (jaxspec bench --long-context): greedy "
                            "self-speculation acceptance alpha[context][budget] and measured "
                            "target forward seconds target_s[batch][context][tokens]; "
                            "accept_hist[context][budget] counts steps by accepted drafts (chain "
                            "of len - 1); step_s[batch][context][gamma]: one whole spec_step "
                            "(gamma 0 = AR) at step_budget; budget_step_s[batch][context]"
                            "[budget]: one whole spec_step of budget_gamma drafts at each of "
                            "step_budgets"])  # fmt: skip


def _rounds(r: dict) -> str:
    n = sorted({row.get("rounds", 2) for row in r["results"] if "skipped" not in row})
    return "/".join(map(str, n)) or "0"


def _identity_line(r: dict) -> str:
    worst = min(
        (c.get("rows_identical", 1.0) for row in r["results"] for c in row.get("configs", [])),
        default=1.0,
    )
    if worst == 1.0:
        return "every configuration's output equals AR's, row for row (checked)"
    return (f"outputs checked against AR row for row: in the worst configuration "
            f"{worst:.0%} of the rows are identical (--on-mismatch report)")  # fmt: skip


def report_markdown(r: dict, machine: str) -> str:
    lines = [
        "## MagicDec: speedup vs batch size and context (`jaxspec bench --long-context`)",
        "",
        f"- Date (UTC): {r['date']}; machine: {machine}; JAX {r['jax_version']}",
        f"- Command: `{r['command']}`",
        f"- `{r['model']}` {r['dtype']}, {r.get('layout', 'input')}-layout weights"
        + (" (per-layer target KV cache)" if r.get("layout") == "unrolled" else "")
        + f", greedy self-speculation, draft cache builder "
        f"`{r['builder']}`"
        + (
            " (the target's sink/window KV rows copied, not the reference's streaming re-prefill)"
            if r["builder"] == "copy"
            else ""
        )
        + f", sink {r['sink']}; {r['max_new_tokens']} new tokens per row; book windows, "
        f"{r['distinct_rows']} distinct per context (larger batches repeat them); "
        f"speedup = median over {_rounds(r)} interleaved rounds (AR and every configuration "
        f"once per round, order rotated) of decode tokens/s ÷ the same round's AR decode "
        f"tokens/s; batches smaller than {r['distinct_rows']} decode every window (several "
        f"batches per run); predicted = "
        f"E(γ)·T_step(AR) ÷ T_step(γ, K): whole `spec_step`s timed per (B, n, γ) at K = "
        f"{r['budget']} in interleaved rounds, each γ's step time relative to AR's in the same "
        f"round (other K: + γ·(T_step(γ_max, K) − T_step(γ_max, {r['budget']}))/γ_max, "
        f"the largest γ's whole step timed at each budget in the same rounds), E(γ) = "
        f"expected tokens per step from the accepted-length histogram "
        f"measured at each K; forward-only = Ω(γ, α)·t(B,n,1) ÷ (γ·t(B,K,1) + t(B,n,γ+1)) from "
        f"isolated forward times; "
        f"compile time excluded; {_identity_line(r)}; "
        f"total run {r['total_s'] / 60:.1f} min",
        "",
        "Acceptance α (per token, greedy) vs draft budget K:",
        "",
        "| context | " + " | ".join(f"K = {k}" for k in r["budgets"]) + " |",
        "|---|" + "---|" * len(r["budgets"]),
    ]
    for n, al in r["alphas"].items():
        lines.append(f"| {n} | " + " | ".join(f"{al[str(k)]:.3f}" for k in r["budgets"]) + " |")
    cols = [f"γ={g}" for g in r["gammas"]]
    lines += [
        "",
        "Speedup over AR, measured (predicted from timed steps / forward-only"
        + (" / analytic" if "critical_length" in r else "")
        + f"), budget K = {r['budget']}; chooser's pick (γ, K) with its measured speedup vs the "
        "best measured:",
        "",
        "| context | batch | AR tok/s | " + " | ".join(cols) + " | pick | pick / best |",
        "|---|---|---|" + "---|" * len(cols) + "---|---|",
    ]
    for row in r["results"]:
        if "skipped" in row:
            lines.append(f"| {row['context']} | {row['batch']} | skipped: {row['skipped']} |")
            continue
        cells = []
        for g in r["gammas"]:
            c = next(c for c in row["configs"] if c["gamma"] == g and c["budget"] == r["budget"])
            analytic = f" / {c['analytic']:.2f}×" if "analytic" in c else ""
            fwd = f" / {c['predicted_forward']:.2f}×" if "predicted_forward" in c else ""
            cells.append(f"{c['measured']:.2f}× ({c['predicted']:.2f}×{fwd}{analytic})")
        pick = "AR" if row["pick"] is None else f"γ={row['pick'][0]}, K={row['pick'][1]}"
        pick += f": {row['pick_measured']:.2f}×"
        ratio = row["pick_measured"] / max(row["best"][2], 1.0)
        lines.append(f"| {row['context']} | {row['batch']} | {row['ar_tokens_per_s']:.1f} | "
                     + " | ".join(cells) + f" | {pick} | {ratio:.2f} |")  # fmt: skip
    if "critical_length" in r:
        rf = r["roofline"]
        lines += [
            "",
            f"Analytic column: `costmodel.step_time` with this machine's measured roofline "
            f"({rf['flops_per_s'] / 1e9:.0f} GFLOP/s GEMM, {rf['bytes_per_s'] / 1e9:.1f} GB/s "
            f"AXPY). Critical context (KV time = parameter time per layer), s = 1 / s = "
            f"{max(r['gammas']) + 1}: "
            + "; ".join(f"B = {b}: {v[0]:.0f} / {v[1]:.0f}" for b, v in
                        r["critical_length"].items()) + " tokens.",
        ]  # fmt: skip
    return "\n".join(lines) + "\n"
