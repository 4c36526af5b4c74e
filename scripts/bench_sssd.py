"""Benchmark: SSSD (model-free n-gram drafting) vs jaxspec AR, and vs transformers' prompt lookup.

Everything runs in one process, greedy fp32 on the CPU, over the same prompt token ids.
Prompt sets:
  * Spec-Bench (`question.jsonl`, first turn, chat template): `--per-category` prompts per
    category (MT-bench's eight grouped as mt_bench).
  * HumanEval (`HumanEval.jsonl`): the first `--humaneval` problems, raw code prompt (completion,
    no chat template), as the category `humaneval`.
Part 1, batch 1: jaxspec `--methods` (default: `ar`, `sssd:6` / `sssd:adaptive` = drafts from
the row's own prompt + output, 6 draft tokens / the verify width chosen every step, and
`sssd-ds:6` / `sssd-ds:adaptive`, also from `--datastore`,
built from a corpus disjoint from these prompts: Python's standard library), through
`jaxspec.bench.run_methods` (the `jaxspec bench` machinery: warm-up compiles
first, compile time never in the timings). Then transformers `generate` on the same weights
(the HF checkpoint jaxspec converted), greedy and with `prompt_lookup_num_tokens=--pld-tokens`.
Part 2, batch sweep (`--batch-sizes`): jaxspec `--sweep-methods` throughput on the Spec-Bench
prompts (aggregate decode tokens/s over the batch); `auto` draft tokens are chosen per (batch,
context) bucket from the measured tau(N) profiles (`jaxspec profile sssd`) and the device timing
table (`jaxspec profile device`, `--device-profile`) — `jaxspec/drafting/sssd_auto.py` —, or
by SSSD's roofline rule s(b) (`jaxspec/hardware.py`) where those files are missing.

Definitions:
  decode tok/s  jaxspec: Σ (new tokens − 1) ÷ Σ decode seconds (prefill excluded; see
                `jaxspec bench`). speedup = ÷ jaxspec AR's decode tok/s, same run.
  e2e tok/s     Σ new tokens ÷ Σ (prefill + decode) seconds: the figure comparable with
                transformers, whose `generate` is timed end to end per prompt (one warm-up call
                first; eager PyTorch compiles nothing). PLD speedup = PLD e2e ÷ greedy e2e.
  tau           decode tokens per target forward of live rows (bonus token included).
  identical     outputs equal to the same system's greedy output, token for token.

Usage (the full benchmark; ~1 h on the 2-core reference machine):
    python scripts/bench_sssd.py --datastore DIR --out BENCHMARKS.md
A quick check:
    python scripts/bench_sssd.py --datastore DIR --per-category 1 --humaneval 1 \\
        --max-new-tokens 16 --batch-sizes 1,2 --out /tmp/sssd.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
START, END = "<!-- bench_sssd:start -->", "<!-- bench_sssd:end -->"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--datastore", type=Path, required=True, help="jaxspec datastore directory")
    p.add_argument("--spec-bench", type=Path, default=DATA / "spec_bench" / "question.jsonl")
    p.add_argument("--humaneval-file", type=Path, default=DATA / "humaneval" / "HumanEval.jsonl")
    p.add_argument("--per-category", type=int, default=10)
    p.add_argument("--humaneval", type=int, default=20, help="HumanEval problems (0 = none)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--methods",
        default="ar,sssd:6,sssd-ds:6,sssd:adaptive,sssd-ds:adaptive",
        help="batch-1 methods (jaxspec bench forms; sssd = auto draft tokens, sssd:adaptive = "
        "the verify width chosen every step)",
    )
    p.add_argument("--sweep-methods", default="ar,sssd-ds:6,sssd:adaptive,sssd-ds:adaptive")
    p.add_argument(
        "--pld-tokens", type=int, default=10, help="transformers prompt_lookup_num_tokens"
    )
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--device-profile", type=Path,
                   help="`auto` draft tokens: the device timing table (default: this device's, "
                   "configs/profiles/device__<device>__<model>.toml)")  # fmt: skip
    p.add_argument("--out", type=Path, help="write the report between the bench_sssd markers")
    return p.parse_args(argv)


def load_sets(args, tokenizer):
    """(ids, categories): Spec-Bench (chat) then HumanEval (raw)."""
    from jaxspec.bench import select_prompts
    from jaxspec.cli import read_prompt_records

    sb = select_prompts(read_prompt_records(args.spec_bench), per_category=args.per_category)
    ids = [tokenizer.encode(t, chat=True) for t, _ in sb]
    cats = [c for _, c in sb]
    if args.humaneval:
        with open(args.humaneval_file, encoding="utf-8") as f:
            recs = [json.loads(line) for line in f if line.strip()][: args.humaneval]
        ids += [tokenizer.encode(r["prompt"], chat=False) for r in recs]
        cats += ["humaneval"] * len(recs)
    return ids, cats


def bench_namespace(args, batch_size: int) -> argparse.Namespace:
    """What `jaxspec.bench.run_methods` / `cli.build_spec` read."""
    return argparse.Namespace(
        gamma=4, tree="kary_2x3", verifier=None, drafter="layerskip", draft=None,
        draft_layers=None, temperature=0.0, dtype="float32", batch_size=batch_size,
        draft_tokens="auto", datastore=args.datastore, acceptance_profile=None,
        device_profile=args.device_profile, draft_budget=None, sink=16, draft_builder="copy",
    )  # fmt: skip


def auto_choices(model, args, b: int) -> str:
    """What `auto` picks at batch b for sssd and sssd-ds: N per context bucket of the measured
    tables (`jaxspec.drafting.sssd_auto`), else SSSD's roofline rule."""
    from jaxspec.cli import sssd_auto_tables, sssd_ngram

    out = []
    for ds in (False, True):
        tables = sssd_auto_tables(bench_namespace(args, b), model, ds)
        if tables is None:
            ng = sssd_ngram(None, b, "float32")
            out.append(f"{ng.num_nodes if ng else 0} (roofline)")
        else:
            cs = [tables.choose(b, c) for c in tables.contexts]
            out.append("/".join(str(c.draft_tokens) for c in cs)
                       + f" (ctx {'/'.join(str(c) for c in tables.contexts)})")  # fmt: skip
    return f"sssd {out[0]}; sssd-ds {out[1]}"


def run_jaxspec(model, ids, cats, args, batch_size: int, methods: str) -> dict:
    from jaxspec.bench import parse_methods, run_methods
    from jaxspec.runner import GenerateOptions

    opts = GenerateOptions(max_new_tokens=args.max_new_tokens, batch_size=batch_size)
    return run_methods(model, parse_methods(methods), ids, cats, opts,
                       bench_namespace(args, batch_size))  # fmt: skip


def run_transformers(model, ids, cats, args) -> dict:
    """{"greedy"|"pld": {"per_category": {c: (new tokens, seconds)}, "outputs": [...]}}."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    hf = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32)
    hf.eval()
    eos = list(model.cfg.eos_token_ids)

    def gen(row, **kw):
        x = torch.tensor([row])
        with torch.no_grad():
            t0 = time.perf_counter()
            out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                              max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                              pad_token_id=eos[0], **kw)  # fmt: skip
            dt = time.perf_counter() - t0
        r = out[0, len(row) :].tolist()
        n = next((j + 1 for j, t in enumerate(r) if t in eos), len(r))
        return r[:n], dt

    res = {}
    for name, kw in (("greedy", {}), ("pld", {"prompt_lookup_num_tokens": args.pld_tokens})):
        gen(ids[0][:32], **kw)  # warm-up
        per_cat, outs = {}, []
        for row, c in zip(ids, cats, strict=True):
            o, dt = gen(row, **kw)
            n, s = per_cat.get(c, (0, 0.0))
            per_cat[c] = (n + len(o), s + dt)
            outs.append(o)
        res[name] = {"per_category": per_cat, "outputs": outs}
        log(f"transformers {name}: " + ", ".join(f"{c} {n / s:.1f} tok/s"
                                                 for c, (n, s) in per_cat.items()))  # fmt: skip
    return res


def log(msg: str):
    print(f"bench_sssd: {msg}", file=sys.stderr, flush=True)


def e2e(m) -> float:
    t = m.prefill_s + m.decode_s
    return m.new_tokens / t if t else 0.0


def report(args, info, part1, hf, sweep, n_prompts) -> str:
    from jaxspec.bench import UNCATEGORIZED

    lines = [
        "## SSSD (model-free n-gram drafting) vs AR and transformers prompt lookup",
        "",
        f"{info['date']} · {info['machine']} · JAX {info['jax']} · command: `{info['command']}`",
        "",
        f"{n_prompts} prompts (Spec-Bench {args.per_category}/category with chat template; "
        f"HumanEval first {args.humaneval}, raw completion), greedy, fp32, "
        f"{args.max_new_tokens} new tokens, datastore `{info['datastore']}` "
        f"({info['ds_tokens']:,} tokens). `sssd:N` = N draft tokens per step; "
        "`sssd:adaptive` = a 15-node tree of which each step verifies the w best, w in "
        "{0, 1, 3, 7, 15} chosen on device from the nodes' calibrated scores and the device "
        "timing table (w = 0: an AR step); plain `sssd`: "
        f"auto draft tokens, at batch 1 {info['draft_tokens']} (0 = AR; from the measured "
        "tau(N) profiles and device timing table where present, else SSSD's roofline rule). "
        "Definitions: the docstring of `scripts/bench_sssd.py`.",
        "",
        "### Batch 1, per category",
        "",
    ]
    names = list(part1)
    head = "| category | AR tok/s | " + " | ".join(f"{n} speedup (tau)" for n in names[1:])
    if hf:
        head += " | transformers tok/s (e2e) | transformers PLD speedup (identical)"
    lines += [head + " |", "|" + "---|" * head.count("|")]
    ar = part1["ar"]
    rows = [(c or UNCATEGORIZED, c) for c in ar["per_category"]] + [("**overall**", None)]
    for label, c in rows:
        pick = (lambda r: r["overall"]) if c is None else (lambda r, c=c: r["per_category"][c])
        cells = [f"{pick(ar).tokens_per_s:.1f}"]
        for n in names[1:]:
            m = pick(part1[n])
            cells.append(f"{m.speedup_vs_ar:.2f}× ({m.tau:.2f})")
        if hf:
            cs = list(hf["greedy"]["per_category"]) if c is None else [c]
            g = [hf["greedy"]["per_category"][k] for k in cs]
            p = [hf["pld"]["per_category"][k] for k in cs]
            g_tps = sum(n for n, _ in g) / sum(s for _, s in g)
            p_tps = sum(n for n, _ in p) / sum(s for _, s in p)
            idx = [i for i, cc in enumerate(info["cats"]) if c is None or cc == c]
            same = sum(hf["pld"]["outputs"][i] == hf["greedy"]["outputs"][i] for i in idx)
            cells += [f"{g_tps:.1f}", f"{p_tps / g_tps:.2f}× ({same}/{len(idx)})"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "End to end (prefill + decode, the transformers-comparable figure), overall: "
        + ", ".join(
            f"{n} {e2e(part1[n]['overall']):.1f} tok/s "
            f"({e2e(part1[n]['overall']) / e2e(ar['overall']):.2f}×)"
            for n in names
        )
        + ".",  # fmt: skip
        "Identical to AR (greedy): "
        + ", ".join(f"{n} {part1[n]['identical_to_ar']}" for n in names[1:])
        + ".",
    ]
    if hf:
        pairs = [
            (
                sum(n for n, _ in hf[k]["per_category"].values()),
                sum(s for _, s in hf[k]["per_category"].values()),
            )
            for k in ("greedy", "pld")
        ]
        lines[-1] += (
            f" transformers overall e2e: greedy {pairs[0][0] / pairs[0][1]:.1f} tok/s, "
            f"PLD {pairs[1][0] / pairs[1][1]:.1f} tok/s "
            f"({pairs[1][0] / pairs[1][1] / (pairs[0][0] / pairs[0][1]):.2f}×)."
        )
    snames = list(next(iter(sweep.values()))[0])
    lines += ["", "### Batch sweep (Spec-Bench prompts; aggregate decode tok/s over the batch)",
              "", "| batch | auto draft tokens | AR tok/s | "
              + " | ".join(f"{n} tok/s (× AR, tau)" for n in snames[1:]) + " |",
              "|---|---|---|" + "---|" * (len(snames) - 1)]  # fmt: skip
    for b, (res, ntok) in sweep.items():
        cells = [str(b), str(ntok), f"{res['ar']['overall'].tokens_per_s:.1f}"]
        for n in snames[1:]:
            m = res[n]["overall"]
            cells.append(f"{m.tokens_per_s:.1f} ({m.speedup_vs_ar:.2f}×, {m.tau:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import jax

    from jaxspec.bench import aggregate, machine_info, machine_line, speedup, write_section
    from jaxspec.drafting.datastore import read_meta
    from jaxspec.models import load_model

    args = parse_args(argv)
    ds_meta = read_meta(args.datastore)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    model = load_model(args.model, "float32", progress=True)
    ids, cats = load_sets(args, model.tokenizer)
    log(f"{len(ids)} prompts; batch 1 part")
    part1 = run_jaxspec(model, ids, cats, args, 1, args.methods)
    hf = None if args.skip_transformers else run_transformers(model, ids, cats, args)
    sweep = {}
    sb = [i for i, c in enumerate(cats) if c != "humaneval"]
    for b in batch_sizes:
        ntok = auto_choices(model, args, b)
        log(f"batch {b}: auto draft tokens {ntok}")
        if b == 1 and set(args.sweep_methods.split(",")) <= set(part1):
            res = {}  # part 1's Spec-Bench categories (HumanEval left out, as at other b)
            for name in args.sweep_methods.split(","):
                r = part1[name]
                parts = [m for c, m in r["per_category"].items() if c != "humaneval"]
                res[name] = {"overall": aggregate(parts, name, 1)}
            for r in res.values():
                r["overall"].speedup_vs_ar = speedup(r["overall"], res["ar"]["overall"])
        else:
            res = run_jaxspec(model, [ids[i] for i in sb], [None] * len(sb), args, b,
                              args.sweep_methods)  # fmt: skip
        sweep[b] = (res, ntok)
    info = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_line(machine_info()),
        "jax": jax.__version__,
        "command": "python scripts/bench_sssd.py " + shlex.join(argv or sys.argv[1:]),
        "datastore": ds_meta.get("corpus", args.datastore),
        "ds_tokens": ds_meta["num_tokens"],
        "draft_tokens": auto_choices(model, args, 1),
        "cats": cats,
    }
    md = report(args, info, part1, hf, sweep, len(ids))
    print(md)
    if args.out:
        write_section(args.out, md, START, END)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
