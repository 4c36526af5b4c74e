"""Benchmark: AR decode steps over a stacked vs a per-layer KV cache (`KVCache.layered`).

    python scripts/bench_cache_layout.py [--cases 8x896x700,4x4096x4000] [--steps 16]
        [--rounds 5] [--out BENCHMARKS.md]

A case `BxSxC` is batch B, a cache of S slots, C committed tokens per row. For each case the
default model's unrolled weights (what decoding on one CPU device uses) decode `--steps` greedy
tokens in one jitted `fori_loop` (forward + commit, the cache donated) over a slot-last K cache
held two ways: stacked `[L, B, K, ...]` (each layer's slice is a copy on XLA:CPU) and per layer (a
tuple of L buffers read in place). Both programs are compiled ahead of time (compile seconds
reported), then timed alternately for `--rounds` rounds (the first dropped), which cancels most
of this machine's drift; the median ms per step is reported with the stacked/per-layer ratio and
the largest logit difference between the two after one step. The section is written between
`<!-- bench_cache_layout:start -->` and `<!-- bench_cache_layout:end -->` of `--out`.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

START, END = "<!-- bench_cache_layout:start -->", "<!-- bench_cache_layout:end -->"


def parse_cases(text: str) -> list[tuple[int, int, int]]:
    cases = []
    for part in text.split(","):
        try:
            b, s, c = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"error: --cases wants BxSxC items, got {part!r}") from None
        if b < 1 or c < 1 or s <= c:
            raise SystemExit(f"error: case {part!r}: need B >= 1, C >= 1 and S > C")
        cases.append((b, s, c))
    return cases


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--cases", default="1x4096x4000,4x4096x4000,8x896x700,16x1024x900")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, help="write the markdown section into this file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 2:
        p.error("--steps must be >= 1 and --rounds >= 2 (the first round is dropped)")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    cases = parse_cases(args.cases)
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from jaxspec.bench import machine_info, machine_line
    from jaxspec.kv_cache import advance, init_cache
    from jaxspec.model import forward, unrolled
    from jaxspec.models import load_model

    model = load_model(args.model)
    cfg, params = model.cfg, unrolled(model.params)
    n = args.steps

    @functools.partial(jax.jit, donate_argnums=(1,))
    def loop(p, cache, tok):
        def body(_, carry):
            cache, tok = carry
            logits, cache = forward(p, cfg, tok, cache.lengths[:, None], cache)
            cache = advance(cache, jnp.ones(tok.shape[:1], jnp.int32))
            return cache, jnp.argmax(logits, -1).astype(jnp.int32)

        return jax.lax.fori_loop(0, n, body, (cache, tok))

    one = jax.jit(lambda p, c, t: forward(p, cfg, t, c.lengths[:, None], c)[0])
    rows = []
    for B, S, C in tqdm(cases, desc="cases"):
        rng = np.random.default_rng(0)
        base = init_cache(cfg, B, S, params.embed.dtype, k_slot_last=True)
        k = jnp.asarray(rng.normal(size=base.k.shape) * 0.5, base.dtype)
        v = jnp.asarray(rng.normal(size=base.v.shape) * 0.5, base.dtype)
        lengths = jnp.full((B,), C, jnp.int32)
        caches = {"stacked": base.replace(k=k, v=v, lengths=lengths)}
        caches["per-layer"] = caches["stacked"].layered()
        del k, v
        tok = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, 1)), jnp.int32)
        diff = float(
            np.abs(
                np.asarray(one(params, caches["stacked"], tok))
                - np.asarray(one(params, caches["per-layer"], tok))
            ).max()
        )
        exe, comp = {}, {}
        for name, c in caches.items():
            t0 = time.perf_counter()
            exe[name] = loop.lower(params, c, tok).compile()
            comp[name] = time.perf_counter() - t0
        times: dict[str, list[float]] = {name: [] for name in caches}
        for r in range(args.rounds):
            order = list(caches) if r % 2 == 0 else list(caches)[::-1]
            for name in order:
                c = caches[name].replace(lengths=jnp.full((B,), C, jnp.int32))  # donated
                t0 = time.perf_counter()
                c, out = exe[name](params, c, tok)
                jax.block_until_ready(out)
                times[name].append((time.perf_counter() - t0) / n * 1e3)
                caches[name] = c
        med = {name: float(np.median(ts[1:])) for name, ts in times.items()}
        rows.append((B, S, C, med, comp, diff))
        del caches, exe

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    given = sys.argv[1:] if argv is None else argv
    cmd = "python scripts/bench_cache_layout.py " + shlex.join(given)
    lines = [
        START,
        "## Stacked vs per-layer KV cache, AR decode steps (`scripts/bench_cache_layout.py`)",
        "",
        f"- Date (UTC): {now}; machine: {machine_line(machine_info())}; JAX {jax.__version__}",
        f"- Command: `{cmd.strip()}`",
        f"- `{args.model}` float32, unrolled weights, slot-last K; {n} greedy steps per jitted "
        f"loop (cache donated); median over rounds {args.rounds - 1} of {args.rounds} (first "
        "dropped), stacked and per-layer alternated; compile time excluded",
        "",
        "| batch | slots | committed | stacked ms/step | per-layer ms/step | stacked / per-layer "
        "| compile s (stacked / per-layer) | max logit diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for B, S, C, med, comp, diff in rows:
        lines.append(
            f"| {B} | {S} | {C} | {med['stacked']:.1f} | {med['per-layer']:.1f} | "
            f"{med['stacked'] / med['per-layer']:.2f}× | {comp['stacked']:.1f} / "
            f"{comp['per-layer']:.1f} | {diff:.1e} |"
        )
    lines.append(END)
    section = "\n".join(lines)
    if args.out:
        text = args.out.read_text() if args.out.exists() else ""
        if START in text and END in text:
            i, j = text.index(START), text.index(END) + len(END)
            text = text[:i] + section + text[j:]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        args.out.write_text(text)
    print(section)
    return section


if __name__ == "__main__":
    main()
