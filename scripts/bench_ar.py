"""Benchmark: jaxspec autoregressive decoding vs transformers `generate` on the same weights.

Both systems run greedy decoding in fp32 on the CPU over the same prompt token ids (the first
turn of Spec-Bench questions, spread over the categories by taking every k-th line, chat template
applied by jaxspec's tokenizer; checked against transformers' `apply_chat_template`), at each
batch size, in the same process, one after the other. Prompts are split into consecutive batches
of `b` (10 prompts at b = 8 → batches of 8 and 2), the same split for both systems.

Definitions (identical for both systems):
  decode tok/s  = sum over rows of (new tokens − 1) ÷ decode seconds, summed over batches
                  (aggregate over the batch; the first token of each row comes from the prefill).
                  A row's new tokens end at its first EOS, EOS included.
  ms/step       = decode seconds ÷ decode forward passes (one pass advances every live row).
  ttft s        = mean prefill time per batch (prompt forward + first token).
  compile s     = jaxspec's ahead-of-time compilation during the warm-up run (never mixed into
                  the timings above); transformers (eager PyTorch) compiles nothing.
  × floor       = ms/step ÷ floor, floor = parameter bytes ÷ measured read bandwidth (the time to
                  stream the weights once; the KV cache is ignored).
jaxspec: `Runner.run` (prefill and decode timed by the runner), warm-up run first (compiles every
shape bucket), then `--repeats` timed runs. transformers: `model.generate` with left padding; the
prefill/decode boundary is the first call of a logits processor (after the prompt forward), the
end is the return of `generate`; warm-up is one short generate.
Repeats: the run with the median decode tok/s is reported.

Threads: torch uses `--threads` (torch.set_num_threads). XLA's CPU backend sizes its thread pool
from the visible cores and has no reliable knob; run on a machine (or `taskset`) with that many
cores — the reference machine has 2.

The result is printed as markdown and written to `--out` between the markers
`<!-- bench_ar:start -->` / `<!-- bench_ar:end -->` (replacing a previous section).

Example (the full benchmark):
    python scripts/bench_ar.py --out BENCHMARKS.md
A quick check:
    python scripts/bench_ar.py --num-prompts 2 --max-new-tokens 16 --batch-sizes 1,2 \\
        --out /tmp/bench_test.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PROMPTS = REPO.parent / "shared" / "data" / "spec_bench" / "question.jsonl"
START, END = "<!-- bench_ar:start -->", "<!-- bench_ar:end -->"
# goals of the benchmark (speedup of jaxspec over transformers per batch size; step vs floor)
SPEEDUP_GOALS = {1: 1.5, 8: 3.0}
FLOOR_GOAL = 2.0  # jaxspec ms/step at batch 1 within this factor of the bandwidth floor


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="See the module docstring for the exact definitions of every column.",
    )
    p.add_argument("--model", default="smollm2-135m", help="registered name or HF checkpoint dir")
    p.add_argument(
        "--prompts-file",
        type=Path,
        default=DEFAULT_PROMPTS,
        help="JSONL with 'turns' (first turn used) or 'prompt' per line (default: %(default)s)",
    )
    p.add_argument("--num-prompts", type=int, default=10, help="taken every len/N-th line")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per system and batch size")
    p.add_argument("--skip-transformers", action="store_true", help="time jaxspec only")
    p.add_argument(
        "--hf-attn",
        default="sdpa",
        choices=("sdpa", "eager"),
        help="transformers attention implementation (default: %(default)s)",
    )
    p.add_argument("--bw-mib", type=int, default=512, help="array size for the bandwidth test")
    p.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=None,
        help="use this read bandwidth (GB/s) for the floor instead of the measured one",
    )
    p.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md", help="markdown file")
    args = p.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--batch-sizes needs at least one size >= 1")
    for name in ("num_prompts", "max_new_tokens", "threads", "repeats", "bw_mib"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------
# inputs and machine


def load_prompts(path: Path, n: int) -> tuple[list[tuple[str, str]], int]:
    """(category, text) of n records spread evenly over the file (every len // n-th line), and
    that stride."""
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except OSError as e:
        sys.exit(f"error: {path}: cannot read prompts file ({e})")
    if len(lines) < n:
        sys.exit(f"error: {path} has {len(lines)} prompts, fewer than --num-prompts {n}")
    stride = len(lines) // n
    out = []
    for i in range(n):
        rec = json.loads(lines[i * stride])
        text = rec["turns"][0] if rec.get("turns") else rec.get("prompt")
        if not isinstance(text, str):
            sys.exit(f"error: {path}:{i * stride + 1}: no 'turns' or 'prompt'")
        out.append((str(rec.get("category", "?")), text))
    return out, stride


def machine_info() -> str:
    from jaxspec.bench import machine_info as info

    m = info()
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{m['cpu']}, {m['cores']} logical cores ({m['usable_cores']} usable){mem}"


def cpu_busy(seconds: float = 2.0) -> str:
    """Share of all cores busy over `seconds` (from /proc/stat) while this process sleeps."""

    def sample():
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return "unknown"
    busy = 1 - (i1 - i0) / max(t1 - t0, 1)
    if busy > 0.1:
        print(f"warning: the CPU is {busy:.0%} busy: timings will be distorted", file=sys.stderr)
    return f"{busy:.0%}"


def measure_bandwidth(mib: int) -> dict:
    """Read bandwidth (GB/s): best of 10 of jitted reductions over a `mib` MiB fp32 array (XLA's
    own threads), plus a single-threaded numpy copy (informative)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = mib * 2**20 // 4 // 576 * 576
    x = jnp.ones((n // 576, 576), jnp.float32)
    v = jnp.ones((576,), jnp.float32)
    kernels = {
        "sum": (jax.jit(lambda x: x.sum()), (x,)),
        "row sums": (jax.jit(lambda x: x.sum(axis=1)), (x,)),
        "matvec": (jax.jit(lambda x, v: x @ v), (x, v)),
    }
    res = {}
    for name, (fn, a) in kernels.items():
        jax.block_until_ready(fn(*a))
        best = float("inf")
        for _ in range(10):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            best = min(best, time.perf_counter() - t0)
        res[name] = x.nbytes / best / 1e9
    del x
    a = np.ones(n, np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    numpy_read = a.nbytes / best / 1e9
    best_kernel = max(res, key=res.get)
    return {"read_gbs": res[best_kernel], "kernel": best_kernel, "kernels": res,
            "numpy_copy_read_gbs": numpy_read}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the two systems


@dataclasses.dataclass
class Result:
    system: str
    batch: int
    tok_s: float
    step_ms: float
    ttft_s: float
    compile_s: float | None
    new_tokens: int
    steps: int
    decode_s: float
    outputs: list[list[int]]
    runs_tok_s: list[float]


def median_run(runs: list[dict]) -> dict:
    ordered = sorted(runs, key=lambda r: r["tok_s"])
    return ordered[(len(ordered) - 1) // 2]


def bench_jaxspec(model, ids: list[list[int]], b: int, args) -> Result:
    from jaxspec.runner import GenerateOptions, Runner

    opts = GenerateOptions(max_new_tokens=args.max_new_tokens, batch_size=b)
    runner = Runner(model.params, model.cfg)  # fresh: compile_s covers every bucket of this b
    _, warm = runner.run(ids, opts)
    runs = []
    for _ in range(args.repeats):
        outs, m = runner.run(ids, opts)
        if m.compile_s:
            print(f"  warning: timed jaxspec run compiled ({m.compile_s:.1f}s)", file=sys.stderr)
        runs.append({"tok_s": m.tokens_per_s, "m": m, "outs": outs})
    r = median_run(runs)
    m = r["m"]
    return Result(
        system="jaxspec",
        batch=b,
        tok_s=m.tokens_per_s,
        step_ms=1e3 * m.decode_s / max(m.target_steps, 1),
        ttft_s=m.ttft_s,
        compile_s=warm.compile_s,
        new_tokens=m.new_tokens,
        steps=m.target_steps,
        decode_s=m.decode_s,
        outputs=r["outs"],
        runs_tok_s=[x["tok_s"] for x in runs],
    )


def load_transformers(path: Path, attn: str):
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    return hf.eval()


def _hf_generate(hf, batch: list[list[int]], max_new: int, pad_id: int, eos_ids: list[int]):
    """One left-padded generate; returns (rows' new tokens up to their first EOS, prefill s,
    decode s, decode forward passes)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):  # called once per forward pass, right after it
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    L = max(map(len, batch))
    input_ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.long)
    for i, row in enumerate(batch):
        input_ids[i, L - len(row) :] = torch.tensor(row)
        mask[i, L - len(row) :] = 1
    clock = Clock()
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=eos_ids,
            logits_processor=LogitsProcessorList([clock]),
        )
        t1 = time.perf_counter()
    rows = []
    for r in out[:, L:].tolist():
        n = next((j + 1 for j, t in enumerate(r) if t in eos_ids), len(r))
        rows.append(r[:n])
    return rows, clock.times[0] - t0, t1 - clock.times[0], len(clock.times) - 1


def bench_transformers(hf, ids: list[list[int]], b: int, args, pad_id, eos_ids) -> Result:
    batches = [ids[s : s + b] for s in range(0, len(ids), b)]
    _hf_generate(hf, batches[0], min(8, args.max_new_tokens), pad_id, eos_ids)  # warm-up
    runs = []
    for _ in range(args.repeats):
        outs, prefill_s, decode_s, steps = [], 0.0, 0.0, 0
        for batch in batches:
            rows, p, d, s = _hf_generate(hf, batch, args.max_new_tokens, pad_id, eos_ids)
            outs += rows
            prefill_s, decode_s, steps = prefill_s + p, decode_s + d, steps + s
        new = sum(map(len, outs))
        tok_s = (new - len(outs)) / decode_s if decode_s > 0 else 0.0
        runs.append({"tok_s": tok_s, "outs": outs, "prefill_s": prefill_s,
                     "decode_s": decode_s, "steps": steps, "new": new})  # fmt: skip
    r = median_run(runs)
    return Result(
        system="transformers",
        batch=b,
        tok_s=r["tok_s"],
        step_ms=1e3 * r["decode_s"] / max(r["steps"], 1),
        ttft_s=r["prefill_s"] / len(batches),
        compile_s=None,
        new_tokens=r["new"],
        steps=r["steps"],
        decode_s=r["decode_s"],
        outputs=r["outs"],
        runs_tok_s=[x["tok_s"] for x in runs],
    )


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, list[str]]:
    """Number of identical token sequences, and 'prompt i: first divergence at token j' notes."""
    same, notes = 0, []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x == y:
            same += 1
            continue
        j = next((k for k, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), None)
        if j is None:
            notes.append(f"prompt {i}: one output is a prefix of the other ({len(x)} vs {len(y)})")
        else:
            notes.append(f"prompt {i}: first divergence at token {j}")
    return same, notes


# ---------------------------------------------------------------------------------------------
# report


def _f(x, fmt):
    return "—" if x is None else format(x, fmt)


def build_report(args, info: dict, results: list[Result], bw: dict, param_bytes: int) -> str:
    bw_used = args.bandwidth_gbs or bw["read_gbs"]
    floor_ms = 1e3 * param_bytes / (bw_used * 1e9)
    hf_by_b = {r.batch: r for r in results if r.system == "transformers"}
    lines = [
        "## Autoregressive decoding: jaxspec vs transformers (`scripts/bench_ar.py`)",
        "",
        f"- Date (UTC): {info['date']}",
        f"- Machine: {info['machine']}",
        f"- Versions: Python {platform.python_version()}, JAX {info['jax']} "
        f"(backend {info['backend']}), transformers {info['transformers']}, "
        f"torch {info['torch']}",
        f"- Threads: torch {'—' if args.skip_transformers else args.threads} "
        "(`torch.set_num_threads`); XLA uses its default pool "
        f"over the {info['usable_cores']} usable cores",
        f"- Command: `{info['command']}`",
        f"- CPU busy while this script idled, at start / end: {info['busy_start']} / "
        f"{info['busy_end']} (other processes distort every number here; want ≈ 0 %)",
        f"- Workload: `{args.model}` fp32, greedy, {len(info['ids'])} prompts = every "
        f"{info['stride']}th line of `{info['prompts_file']}` (first turn, chat template; "
        f"categories: {', '.join(info['categories'])}), prompt lengths "
        f"{min(map(len, info['ids']))}–{max(map(len, info['ids']))} tokens, up to "
        f"{args.max_new_tokens} new tokens per row (rows stop at EOS), "
        + ("" if args.skip_transformers else f"transformers attention `{args.hf_attn}`, ")
        + f"{args.repeats} timed run(s) after a warm-up (median reported)",
        f"- Prompt ids equal to transformers' `apply_chat_template`: {info['tok_match']}",
        "",
        "| system | batch | decode tok/s | ms/step | × floor | ttft s | compile s "
        "| speedup vs transformers | new tokens | decode steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        hf = hf_by_b.get(r.batch)
        speed = f"{r.tok_s / hf.tok_s:.2f}×" if r.system == "jaxspec" and hf and hf.tok_s else "—"
        lines.append(
            f"| {r.system} | {r.batch} | {r.tok_s:.1f} | {r.step_ms:.1f} | "
            f"{r.step_ms / floor_ms:.2f} | {r.ttft_s:.3f} | {_f(r.compile_s, '.1f')} | {speed} | "
            f"{r.new_tokens} | {r.steps} |"
        )
    kern = ", ".join(f"{k} {v:.1f}" for k, v in bw["kernels"].items())
    src = (
        f"given with --bandwidth-gbs (measured: {bw['read_gbs']:.1f})"
        if args.bandwidth_gbs
        else f"measured, best jitted reduction over {args.bw_mib} MiB: {kern} GB/s"
    )
    lines += [
        "",
        f"Floor: {param_bytes / 1e6:.1f} MB of parameters ÷ {bw_used:.1f} GB/s read bandwidth "
        f"({src}; single-threaded numpy copy reads {bw['numpy_copy_read_gbs']:.1f} GB/s) = "
        f"**{floor_ms:.2f} ms per decode step** ({1e3 / floor_ms:.1f} tokens/s per row).",
        "",
        "Goals:",
    ]
    js = {r.batch: r for r in results if r.system == "jaxspec"}
    for b, goal in SPEEDUP_GOALS.items():
        if b not in js:
            lines.append(f"- jaxspec ≥ {goal}× transformers at batch {b}: not run")
        elif b not in hf_by_b:
            lines.append(f"- jaxspec ≥ {goal}× transformers at batch {b}: transformers not run")
        else:
            s = js[b].tok_s / hf_by_b[b].tok_s
            ok = "**met**" if s >= goal else "**not met**"
            lines.append(f"- jaxspec ≥ {goal}× transformers at batch {b}: {s:.2f}× — {ok}")
    if 1 in js:
        ratio = js[1].step_ms / floor_ms
        ok = "**met**" if ratio <= FLOOR_GOAL else "**not met**"
        lines.append(
            f"- jaxspec batch-1 step within {FLOOR_GOAL}× of the floor: {ratio:.2f}× — {ok}"
        )
    else:
        lines.append(f"- jaxspec batch-1 step within {FLOOR_GOAL}× of the floor: batch 1 not run")
    if info["agreement"]:
        lines += ["", "Greedy token agreement, jaxspec vs transformers (informative):"]
        for b, (same, n, notes) in info["agreement"].items():
            extra = f" ({'; '.join(notes)})" if notes else ""
            lines.append(f"- batch {b}: {same}/{n} prompts identical{extra}")
    if args.repeats > 1:
        lines += ["", "Decode tok/s of every timed run:"]
        for r in results:
            runs = ", ".join(f"{x:.1f}" for x in r.runs_tok_s)
            lines.append(f"- {r.system}, batch {r.batch}: {runs}")
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str):
    from jaxspec.bench import write_section as write

    write(path, section, START, END)


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python " + shlex.join(sys.argv if argv is None else ["scripts/bench_ar.py", *argv])
    prompts, stride = load_prompts(args.prompts_file, args.num_prompts)

    import jax

    from jaxspec.models import load_model

    info = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "transformers": "not used",
        "torch": "not used",
        "command": command,
        "prompts_file": os.path.relpath(args.prompts_file.resolve(), REPO),
        "stride": stride,
        "categories": list(dict.fromkeys(c for c, _ in prompts)),
        "tok_match": "not checked (--skip-transformers)",
        "agreement": {},
        "busy_start": cpu_busy(),
    }
    print(f"CPU busy (other processes): {info['busy_start']}", file=sys.stderr)
    print(f"machine: {info['machine']}", file=sys.stderr)
    print(f"measuring read bandwidth ({args.bw_mib} MiB) ...", file=sys.stderr)
    bw = measure_bandwidth(args.bw_mib)
    print(f"  {bw['read_gbs']:.1f} GB/s ({bw['kernel']})", file=sys.stderr)

    model = load_model(args.model, "float32", progress=True)
    if model.tokenizer is None:
        sys.exit(f"error: {model.path} has no tokenizer")
    ids = [model.tokenizer.encode(text, chat=True) for _, text in prompts]
    info["ids"] = ids
    param_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params))

    hf = None
    if not args.skip_transformers:
        import torch
        import transformers
        from transformers import AutoTokenizer

        torch.set_num_threads(args.threads)
        info["torch"], info["transformers"] = torch.__version__, transformers.__version__
        hf_tok = AutoTokenizer.from_pretrained(model.path)
        same = 0
        for (_, text), mine in zip(prompts, ids, strict=True):
            ref = hf_tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            ref = ref["input_ids"] if hasattr(ref, "keys") else ref
            same += list(ref) == mine
        info["tok_match"] = f"{same}/{len(ids)}"
        hf = load_transformers(model.path, args.hf_attn)
        eos_ids = list(model.cfg.eos_token_ids) or [hf_tok.eos_token_id]
        pad_id = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else eos_ids[0]

    results: list[Result] = []
    for b in args.batch_sizes:
        print(f"batch {b}: jaxspec (warm-up + {args.repeats} timed) ...", file=sys.stderr)
        j = bench_jaxspec(model, ids, b, args)
        results.append(j)
        print(f"  {j.tok_s:.1f} tok/s, {j.step_ms:.1f} ms/step", file=sys.stderr)
        if hf is not None:
            print(f"batch {b}: transformers (warm-up + {args.repeats} timed) ...", file=sys.stderr)
            t = bench_transformers(hf, ids, b, args, pad_id, eos_ids)
            results.append(t)
            print(f"  {t.tok_s:.1f} tok/s, {t.step_ms:.1f} ms/step", file=sys.stderr)
            same, notes = agreement(j.outputs, t.outputs)
            info["agreement"][b] = (same, len(ids), notes)

    info["busy_end"] = cpu_busy()
    section = build_report(args, info, results, bw, param_bytes)
    print(section)
    write_section(args.out, section)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
