"""Benchmark: one forward of the default model with input-major, output-major and unrolled weights.

    python scripts/bench_layout.py [--batches 1,8] [--tokens 1,2,4,8,16] [--context 256]
        [--reps 15] [--out BENCHMARKS.md]

For each (batch b, in-flight tokens n per row) the three layouts (`jaxspec.model.output_major`,
`jaxspec.model.unrolled`) are compiled ahead of time (compile seconds reported), then timed
alternately, `--reps` calls each (the first two of each dropped), over a cache holding
`--context` committed tokens per row; the median is reported with t(n)/t(1) per layout (the
relative cost of verifying n - 1 speculated tokens per row) and each layout's time over the
input-major one. Alternating cancels most of this machine's drift. Logits of the layouts are
compared once per shape (max |difference| from input-major). The section is written between
`<!-- bench_layout:start -->` and `<!-- bench_layout:end -->` of `--out`.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
import time
from pathlib import Path

START, END = "<!-- bench_layout:start -->", "<!-- bench_layout:end -->"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--tokens", default="1,2,4,8,16")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", type=Path, help="write the markdown section into this file")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from jaxspec.kv_cache import init_cache
    from jaxspec.model import forward, output_major, unrolled
    from jaxspec.models import load_model

    model = load_model(args.model)
    cfg = model.cfg
    layouts = {
        "input": model.params,
        "output": output_major(model.params),
        "unrolled": unrolled(model.params),
    }
    batches = [int(x) for x in args.batches.split(",")]
    tokens = [int(x) for x in args.tokens.split(",")]
    fwd = jax.jit(lambda p, t, q, c: forward(p, cfg, t, q, c)[0])
    times: dict[tuple, float] = {}
    diffs: dict[tuple, float] = {}
    compile_s: dict[tuple, float] = {}
    for b, n in tqdm([(b, n) for b in batches for n in tokens], desc="layouts"):
        cache = init_cache(cfg, b, args.context + n, model.params.embed.dtype)
        cache = cache.replace(lengths=jnp.full((b,), args.context, jnp.int32))
        toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, n)), jnp.int32)
        pos = args.context + jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        exe = {}
        for k, p in layouts.items():
            t0 = time.perf_counter()
            exe[k] = fwd.lower(p, toks, pos, cache).compile()
            compile_s[b, n, k] = time.perf_counter() - t0
        out = {k: np.asarray(exe[k](p, toks, pos, cache)) for k, p in layouts.items()}
        diffs[b, n] = max(float(np.abs(out["input"] - out[k]).max()) for k in layouts)
        ts: dict[str, list[float]] = {k: [] for k in layouts}
        for _ in range(args.reps):
            for k, p in layouts.items():
                t0 = time.perf_counter()
                jax.block_until_ready(exe[k](p, toks, pos, cache))
                ts[k].append(time.perf_counter() - t0)
        for k in layouts:
            times[b, n, k] = float(np.median(ts[k][2:]))
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python scripts/bench_layout.py " + shlex.join(sys.argv[1:])
    lines = [
        START,
        "## Output-major weights: one forward, input-major vs output-major vs unrolled layers "
        "(`scripts/bench_layout.py`)",
        "",
        f"{now} · {platform.processor() or platform.machine()}, {jax.device_count()} "
        f"{jax.default_backend()} device(s), JAX {jax.__version__} · command: `{cmd.strip()}`",
        "",
        f"`{args.model}` float32, cache of {args.context} committed tokens per row, median of "
        f"{args.reps - 2} alternating calls per layout. t(n)/t(1): the cost of a forward of n "
        "tokens per row relative to one token (what verifying n - 1 speculated tokens costs). "
        "Compile: seconds to compile the forward alone.",
        "",
        "| batch | tokens/row | input ms | output ms | unrolled ms | output ÷ input "
        "| unrolled ÷ input | t(n)/t(1) input / output / unrolled | compile s input / output "
        "/ unrolled | max logit diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in batches:
        for n in tokens:
            t = {k: times[b, n, k] for k in layouts}
            r = " / ".join(f"{t[k] / times[b, tokens[0], k]:.2f}" for k in layouts)
            c = " / ".join(f"{compile_s[b, n, k]:.1f}" for k in layouts)
            lines.append(
                f"| {b} | {n} | {t['input'] * 1e3:.1f} | {t['output'] * 1e3:.1f} "
                f"| {t['unrolled'] * 1e3:.1f} | {t['output'] / t['input']:.2f} "
                f"| {t['unrolled'] / t['input']:.2f} | {r} | {c} | {diffs[b, n]:.1e} |"
            )
    lines.append(END)
    md = "\n".join(lines)
    print(md)
    if args.out:
        text = args.out.read_text() if args.out.exists() else ""
        if START in text and END in text:
            text = text[: text.index(START)] + md + text[text.index(END) + len(END) :]
        else:
            text = text.rstrip("\n") + "\n\n" + md + "\n"
        args.out.write_text(text)
    return md


if __name__ == "__main__":
    main()
