"""Search the layer-skip self-draft of a model: which layers to keep (jaxspec.drafting.search).

Measures greedy chain speculation (γ = --gamma) on prompts of a JSONL file for every candidate
layer set and ranks them by tau ÷ modelled cost (target-forward equivalents per step). Prints a
markdown table and the best `--draft-layers` value; `--out-md` replaces a section of a markdown
file (BENCHMARKS.md). Tune on prompts disjoint from the evaluation sets:
configs/prompts/tuning.jsonl.

    python scripts/search_layerskip.py --prompts-file configs/prompts/tuning.jsonl \\
        --limit 12 --out-md BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
from pathlib import Path

START, END = "<!-- layerskip:start -->", "<!-- layerskip:end -->"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts-file", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=12)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out-md", type=Path)
    args = ap.parse_args(argv)

    import jax

    from jaxspec.drafting import search_layer_skip
    from jaxspec.models import load_model

    model = load_model(args.model)
    texts = []
    for line in args.prompts_file.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            texts.append(rec.get("prompt") or rec["turns"][0])
        if len(texts) == args.limit:
            break
    ids = [model.tokenizer.encode(t) for t in texts]

    def show(c):
        print(f"kept {len(c.keep):2d}: tau {c.tau:.2f} acc {c.acceptance_rate:.2f} "
              f"cost {c.cost:.2f} score {c.score:.2f}", file=sys.stderr)  # fmt: skip

    ranked = search_layer_skip(model.params, model.cfg, ids, gamma=args.gamma,
                               max_new_tokens=args.max_new_tokens, progress=show)  # fmt: skip
    lines = [
        "## Layer-skip self-draft search (`scripts/search_layerskip.py`)",
        "",
        f"- Date (UTC): {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}; machine: "
        f"{platform.machine()} CPU, JAX {jax.__version__}",
        f"- Command: `python {' '.join(map(shlex.quote, sys.argv))}`",
        f"- Model `{args.model}` ({model.cfg.num_layers} layers), greedy chain γ = {args.gamma}, "
        f"{len(ids)} prompts of `{args.prompts_file.name}`, {args.max_new_tokens} new tokens",
        "- score = tau ÷ cost, cost = (γ + 1) · kept/L + 1 target forwards per step (AR = 1.0)",
        "",
        "| kept layers | tau | acceptance | cost | score |",
        "|---|---|---|---|---|",
    ]
    for c in ranked:
        lines.append(f"| {_ranges(c.keep)} | {c.tau:.2f} | {c.acceptance_rate:.2f} | "
                     f"{c.cost:.2f} | {c.score:.2f} |")  # fmt: skip
    lines += ["", f"Best: `--draft-layers {','.join(map(str, ranked[0].keep))}`"]
    text = "\n".join(lines)
    print(text)
    if args.out_md:
        from jaxspec.bench import write_section

        write_section(args.out_md, text, START, END)
    return 0


def _ranges(keep) -> str:
    out, start = [], keep[0]
    for a, b in zip(keep, keep[1:] + (None,), strict=True):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}–{a}")
            start = b
    return ", ".join(out)


if __name__ == "__main__":
    sys.exit(main())
