"""Benchmark: CritiPrefill vs dense prefill on the CPU — time to first token and needle accuracy.

    python scripts/bench_critiprefill.py [--lengths 2048,4096,8192] [--niah-limit N] [--out FILE]

TTFT: batch 1, a prompt of L tokens cut from a public-domain book (`long_context/books.jsonl`,
raw text, no chat template), greedy first token; prefill time of the second run of each
configuration (the first compiles; compile time is reported apart). Configurations: `dense` and
each `--configs` entry `S,Bk,beta,tau` (segment, block, budget, threshold).
Needle in a haystack: every prompt of `long_context/niah_8k.jsonl` (or the first --niah-limit),
chat template with its system message, 32 greedy tokens; an answer counts when it contains both
"Dolores Park" and "sandwich" (the data's substring score), per context size.
Everything runs in one process on the same weights (fp32); the machine, JAX version, date and
command are printed with the tables (paste them into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import shlex
import sys
from collections import defaultdict
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "long_context"


def configs(spec: str):
    from jaxspec.critiprefill import CritiPrefill

    out = [("dense", None)]
    for item in filter(None, spec.split(";")):
        S, Bk, beta, tau = (int(x) for x in item.split(","))
        out.append((f"cp S={S} Bk={Bk} β={beta} τ={tau}", CritiPrefill(S, Bk, beta, tau)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="2048,4096,8192", help="'' = skip the TTFT part")
    ap.add_argument("--configs", default="512,32,2048,4096;512,32,1024,2048",
                    help="';'-separated S,Bk,beta,tau")  # fmt: skip
    ap.add_argument("--niah", type=Path, default=DATA / "niah_8k.jsonl")
    ap.add_argument("--niah-limit", type=int, default=0, help="0 = all prompts")
    ap.add_argument("--niah-min-chars", type=int, default=0, help="only contexts this long")
    ap.add_argument("--out", type=Path, help="also write the tables (markdown) here")
    args = ap.parse_args(argv)

    from jaxspec.models import load_model
    from jaxspec.runner import GenerateOptions, Runner

    model = load_model(args.model, "float32", progress=True, attention="auto")
    tok = model.tokenizer
    book = json.loads((DATA / "books.jsonl").read_text().splitlines()[0])["text"]
    book_ids = tok.encode(book, chat=False)
    lines = [
        f"- Machine: {platform.machine()} CPU, {jax.device_count()} device(s) "
        f"({jax.devices()[0].device_kind}), JAX {jax.__version__}, "
        f"{datetime.date.today().isoformat()}",
        f"- Command: `python scripts/bench_critiprefill.py {shlex.join(sys.argv[1:])}`",
        "",
        "| prompt tokens | configuration | TTFT (s) | speedup vs dense | compile (s) |",
        "|---|---|---|---|---|",
    ]
    cfgs = configs(args.configs)
    runners = {
        name: Runner(model.params, dataclasses.replace(model.cfg, prefill=cp), None)
        for name, cp in cfgs
    }
    one = GenerateOptions(max_new_tokens=1, batch_size=1, chunk=512)
    for L in (int(x) for x in args.lengths.split(",") if x):
        ids = book_ids[: L - 64]
        base = None
        for name, _ in cfgs:
            r = runners[name]
            _, m0 = r.run([ids], one)  # compiles
            _, m = r.run([ids], one)
            base = base or m.prefill_s
            lines.append(f"| {len(ids)} | {name} | {m.prefill_s:.2f} | "
                         f"{base / m.prefill_s:.2f}x | {m0.compile_s:.1f} |")  # fmt: skip
            print(lines[-1], flush=True)

    recs = [json.loads(x) for x in args.niah.read_text().splitlines() if x.strip()]
    recs = [r for r in recs if r["context_chars"] >= args.niah_min_chars]
    if args.niah_limit:
        recs = recs[: args.niah_limit]
    if recs:
        prompts = []
        for r in recs:
            msgs = [{"role": "user", "content": r["prompt"]}]
            if r.get("system"):
                msgs.insert(0, {"role": "system", "content": r["system"]})
            text = tok.apply_chat_template(msgs)
            prompts.append(tok._tok.encode(text, add_special_tokens=False).ids)
        opts = GenerateOptions(max_new_tokens=32, batch_size=1, chunk=512)
        room = model.cfg.max_position_embeddings - opts.max_new_tokens
        fits = [i for i, ids in enumerate(prompts) if len(ids) <= room]
        if len(fits) < len(prompts):
            skipped = len(prompts) - len(fits)
            print(f"skipping {skipped} needle prompts longer than the model's context "
                  f"({room} + {opts.max_new_tokens} tokens)", flush=True)  # fmt: skip
        recs, prompts = [recs[i] for i in fits], [prompts[i] for i in fits]
        lines.append(f"Needle prompts: {len(prompts)}, {min(map(len, prompts))}–"
                     f"{max(map(len, prompts))} tokens")  # fmt: skip
        lines += ["", "| configuration | " + " | ".join(f"~{c // 1000}K chars" for c in
                  sorted({round(r['context_chars'], -3) for r in recs})) + " | all |"]  # fmt: skip
        lines.append("|---" * (len(lines[-1].split("|")) - 2) + "|")
        for name, _ in cfgs:
            hits, total = defaultdict(int), defaultdict(int)
            for r, ids in zip(recs, prompts, strict=True):
                outs, _ = runners[name].run([ids], opts)
                answer = tok.decode(outs[0]).lower()
                key = round(r["context_chars"], -3)
                total[key] += 1
                hits[key] += "dolores park" in answer and "sandwich" in answer
            cells = [f"{hits[k]}/{total[k]}" for k in sorted(total)]
            lines.append(f"| {name} | " + " | ".join(cells) +
                         f" | {sum(hits.values())}/{sum(total.values())} |")  # fmt: skip
            print(lines[-1], flush=True)
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
