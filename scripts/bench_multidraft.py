"""Multi-draft verification study (issue 4, part 5; ALGORITHMS.md §3): tokens per step of RRS
(SpecInfer, i.i.d. children), SWOR (Sequoia, RRS without replacement) and SpecHub on binary
trees, at T = 0.6 and 1.0, on Spec-Bench prompts.

Set-up, close to SpecHub's reference (§3(d), prompts cut to 128 tokens): each prompt's text cut
to its first `--prompt-tokens` tokens and asked as one chat turn (the instruct model answers at
length; raw text made most rows stop at EOS early), `--max-new-tokens` sampled tokens,
batch `--batch-size`, fresh randomness every step, the same seed for every configuration (so
all prompts share one prompt bucket and one compile per configuration).

Per temperature:
  1. Acceptance vectors on `--tuning-prompts` (disjoint from the evaluation prompts), from
     one-level trees of two children: RRS (p1, p2), SWOR (p1, p2) and SpecHub's pair (h1, h2).
  2. Trees: complete binary trees of 7 and 31 nodes (`kary(2, 2)`, `kary(2, 4)`), Sequoia's DP
     tree with fan-out 2 of `--dp-nodes` nodes for the SWOR vector (`SequoiaDP(max_width=2)`),
     and SpecHub's own DP tree (`HubDP`: a lone child accepts with SWOR's p1, a pair with
     (h1, h2); ALGORITHMS.md §3(b)).
  3. Each tree verified with RRS, SWOR, SpecHub at every 2-child node (`hub_threshold` 0) and
     the per-node switch (SpecHub where the draft's q(argmax) >= `--hub-threshold`, else SWOR).

Reported: tau = tokens per target step of live rows (bonus included; `jaxspec.metrics`), its
standard error over prompts, the DP-predicted value G of each tree under the verifier's tuning
vector, and the gains SpecHub − RRS and SpecHub − SWOR. Speed is not the point here (the study
is about tokens per step); see `jaxspec bench` for wall-clock speedups.

Usage (the recorded study; ~40 min on the 2-core reference machine):
    python scripts/bench_multidraft.py --out-md BENCHMARKS.md --json /tmp/md.json
A quick check:
    python scripts/bench_multidraft.py --per-category 1 --max-new-tokens 8 --temperatures 1.0
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
START, END = "<!-- multidraft:start -->", "<!-- multidraft:end -->"
VERIFIERS = ("rrs", "swor", "spechub", "switch")  # switch: spechub with --hub-threshold


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--drafter", choices=("layerskip", "model"), default="layerskip")
    p.add_argument("--draft", help="draft checkpoint (name or dir) for --drafter model")
    p.add_argument("--draft-layers", default="0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,20,21,22,23,24,25,"
                   "26,27,28,29", help="layer-skip draft: target layers kept (default: the best "
                   "of scripts/search_layerskip.py)")  # fmt: skip
    p.add_argument("--prompts-file", type=Path, default=DATA / "spec_bench" / "question.jsonl")
    p.add_argument("--per-category", type=int, default=8)
    p.add_argument("--tuning-prompts", type=Path, default=REPO / "configs/prompts/tuning.jsonl")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompts cut to this length")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--temperatures", default="0.6,1.0")
    p.add_argument("--dp-nodes", type=int, default=16, help="node budget of the DP trees")
    p.add_argument("--max-depth", type=int, default=6, help="DP trees: levels, root included")
    p.add_argument("--hub-threshold", type=float, default=0.3,
                   help="the per-node switch: SpecHub where q(argmax) >= this")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results as JSON")
    p.add_argument("--out-md", type=Path, help="write the section between markers in FILE")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    for name in ("per_category", "prompt_tokens", "max_new_tokens", "batch_size", "dp_nodes"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_depth < 2:
        raise SystemExit("--max-depth must be >= 2 (root + one level)")
    if args.drafter == "model" and not args.draft:
        raise SystemExit("--drafter model needs --draft NAME|DIR")
    return args


def load_ids(model, path: Path, per_category: int | None, prompt_tokens: int):
    from jaxspec.bench import select_prompts
    from jaxspec.cli import read_prompt_records

    prompts = select_prompts(read_prompt_records(path), per_category=per_category)
    tok = model.tokenizer
    # the text cut to its first prompt_tokens tokens, then asked as one chat turn
    ids = [tok.encode(tok.decode(tok.encode(t, chat=False)[:prompt_tokens])) for t, _ in prompts]
    return ids, [c for _, c in prompts]


def run(model, dcfg, dparams, tree, verifier: str, threshold: float, ids, opts):
    """(tau, its standard error over prompts, per-prompt tau, summed rank histogram, seconds)."""
    from jaxspec.runner import Runner
    from jaxspec.speculative import SpecConfig

    spec = SpecConfig(model.cfg, dcfg, tree, verifier, hub_threshold=threshold)
    runner = Runner(model.params, model.cfg, spec, dparams, time_phases=False)
    t0 = time.perf_counter()
    _, m = runner.run(ids, opts)
    # per prompt: tokens after the first ÷ its live steps (a step emits accepted + 1)
    per = np.array([(r["new_tokens"] - 1) / r["steps"] for r in runner.last_rows if r["steps"]])
    se = float(per.std(ddof=1) / np.sqrt(len(per))) if len(per) > 1 else float("nan")
    return m.tau, se, per, runner.last_rank_hist, time.perf_counter() - t0


def study(args) -> dict:
    from jaxspec.cli import build_draft
    from jaxspec.models import load_model
    from jaxspec.profiling import rank_profile
    from jaxspec.runner import GenerateOptions
    from jaxspec.trees import kary
    from jaxspec.trees.sequoia import HubDP, SequoiaDP, hub_tree_value, tree_value

    model = load_model(args.model, "float32", progress=True)
    ns = argparse.Namespace(drafter=args.drafter, draft=args.draft, draft_layers=args.draft_layers,
                            dtype="float32", json=True, attention="auto")  # fmt: skip
    dcfg, dparams, dname = build_draft(ns, model)
    ids, cats = load_ids(model, args.prompts_file, args.per_category, args.prompt_tokens)
    tune, _ = load_ids(model, args.tuning_prompts, None, args.prompt_tokens)
    out = {"draft": dname, "prompts": len(ids), "tuning_prompts": len(tune), "temps": {}}
    for T in [float(x) for x in args.temperatures.split(",")]:
        opts = GenerateOptions(max_new_tokens=args.max_new_tokens, temperature=T,
                               seed=args.seed, batch_size=args.batch_size)  # fmt: skip
        vec = {}
        for v, thr in (("rrs", 0.0), ("swor", 0.0), ("spechub", 0.0)):
            *_, hist, _ = run(model, dcfg, dparams, kary(2, 1), v, thr, tune, opts)
            p, none, steps = rank_profile(hist)
            vec[v] = {"p": p[:2], "none": none, "steps": steps}
            print(f"T={T} {v} one-level acceptance {p[:2]} (none {none:.3f}, {steps} steps)",
                  flush=True)  # fmt: skip
        s, (h1, h2) = vec["swor"]["p"][0], vec["spechub"]["p"]
        n, d = args.dp_nodes, args.max_depth
        trees = {
            "binary 7": kary(2, 2),
            "binary 31": kary(2, 4),
            f"DP fan-out 2, {n}": SequoiaDP(tuple(vec["swor"]["p"]), n, d, 2).tree(n, d),
            f"SpecHub DP, {n}": HubDP(s, h1, h2, n, d).tree(n, d),
        }
        rows = []
        for tname, tree in trees.items():
            row = {"tree": tname, "parents": list(tree.parents), "results": {}}
            for v in VERIFIERS:
                if tname.startswith("SpecHub DP") and v in ("rrs", "switch"):
                    continue  # its tree is built for SpecHub; SWOR is kept as the control
                verifier, thr = ("spechub", args.hub_threshold) if v == "switch" else (v, 0.0)
                if v == "spechub":
                    pred = hub_tree_value(tree, s, h1, h2)
                elif v == "switch":
                    pred = None  # a mixture per node: no single vector predicts it
                else:
                    pred = tree_value(tree, vec[v]["p"])
                tau, se, per, _, secs = run(model, dcfg, dparams, tree, verifier, thr, ids, opts)
                row["results"][v] = {"tau": tau, "se": se, "predicted": pred, "seconds": secs,
                                     "per_prompt": per.tolist()}  # fmt: skip
                print(f"T={T} {tname:>20} {v:>8}: tau {tau:.3f} ± {se:.3f} "
                      f"(predicted {pred if pred is None else round(pred, 3)}) {secs:.0f} s",
                      flush=True)  # fmt: skip
            rows.append(row)
        out["temps"][str(T)] = {"vectors": vec, "rows": rows}
    return out


def _f(x, fmt=".3f"):
    return "—" if x is None else format(x, fmt)


def _cell(x: dict, k: str) -> str:
    """tau ± se (predicted) of verifier k in a row's results."""
    if k not in x:
        return "—"
    e = x[k]
    pred = "" if e["predicted"] is None else f" ({_f(e['predicted'], '.2f')})"
    return f"{_f(e['tau'])} ± {_f(e['se'], '.3f')}{pred}"


def _gain(x: dict, k: str) -> str:
    """SpecHub's tau − verifier k's, ± the paired standard error over prompts."""
    if k not in x:
        return "—"
    a, b = np.asarray(x["spechub"]["per_prompt"]), np.asarray(x[k]["per_prompt"])
    se = (a - b).std(ddof=1) / np.sqrt(len(a)) if len(a) > 1 else float("nan")
    return f"{x['spechub']['tau'] - x[k]['tau']:+.3f} ± {se:.3f}"


def markdown(args, res: dict, meta: dict) -> str:
    thr = args.hub_threshold
    lines = [
        "## Multi-draft verification: RRS vs SWOR vs SpecHub on binary trees "
        "(`scripts/bench_multidraft.py`, issue 4)",
        "",
        f"- Date (UTC): {meta['date']}; {meta['machine']}; JAX {meta['jax']}",
        f"- Command: `python scripts/bench_multidraft.py {shlex.join(args.argv)}`",
        f"- `{args.model}` float32 target, draft `{res['draft']}`; {res['prompts']} prompts of "
        f"`{args.prompts_file.name}` ({args.per_category} per category), the text cut to its "
        f"first {args.prompt_tokens} tokens (as SpecHub's set-up) and asked as a chat turn, "
        f"{args.max_new_tokens} new tokens, "
        f"batch {args.batch_size}, seed {args.seed}; total {meta['minutes']:.1f} min",
        "- tau: tokens per target step (bonus included) ± its standard error over prompts (gains: "
        "± the paired standard error of the per-prompt differences); "
        "predicted: the tree's value G under the verifier's acceptance vector measured on "
        f"{res['tuning_prompts']} tuning prompts (`HubDP` values for SpecHub). `switch`: SpecHub "
        f"where the draft's q(argmax) ≥ {thr}, SWOR elsewhere.",
        "",
    ]
    for T, r in res["temps"].items():
        v = r["vectors"]
        lines += [
            f"### T = {T}",
            "",
            "One-level acceptance of two children (tuning prompts): "
            + "; ".join(
                f"{k} ({', '.join(_f(x) for x in v[k]['p'])})" for k in ("rrs", "swor", "spechub")
            ),
            "",
            "| tree | RRS tau (pred) | SWOR tau (pred) | SpecHub tau (pred) | "
            f"switch ≥ {thr} tau | SpecHub − RRS | SpecHub − SWOR |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            x = row["results"]

            cells = " | ".join(_cell(x, k) for k in VERIFIERS)
            lines.append(f"| {row['tree']} | {cells} | {_gain(x, 'rrs')} | {_gain(x, 'swor')} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from jaxspec.bench import machine_info, machine_line, write_section

    t0 = time.perf_counter()
    res = study(args)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "machine": machine_line(machine_info()),
        "jax": jax.__version__,
        "minutes": (time.perf_counter() - t0) / 60,
    }
    md = markdown(args, res, meta)
    print(md)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, **res}, indent=1), encoding="utf-8")
    if args.out_md:
        write_section(args.out_md, md, START, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
