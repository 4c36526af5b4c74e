"""The `jaxspec` command.

  jaxspec generate [--model NAME|DIR] [--prompt TEXT ... | --prompts-file JSONL] [--no-chat]
                   [--method ar|chain|tree] [--drafter layerskip|model] [--draft DIR]
                   [--draft-layers I,J,...] [--gamma K] [--tree NAME|FILE]
                   [--verifier greedy|swor|rrs|spechub|point_mass]
                   [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K]
                   [--batch-size B] [--seed S] [--dtype float32|bfloat16] [--json]
  jaxspec bench --prompts-file JSONL [--methods ar,chain,chain:G,tree,tree:NAME,...]
                [--limit N] [--per-category N] [--raw-categories] [--json OUT] [--out-md FILE]
                [the generate options above, --batch-size defaulting to 1]
  jaxspec convert (--hf DIR | --gguf FILE) --out DIR [--dtype ...]

User errors print one line (`error: ...`) and exit with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxspec.errors import InputError, JaxspecError

METHODS = ("ar", "chain", "tree")
VERIFIERS = ("greedy", "swor", "rrs", "spechub", "point_mass")


def _add_common(p: argparse.ArgumentParser, default=False):
    # accepted before or after the subcommand; SUPPRESS keeps a subparser from resetting it
    p.add_argument("--debug", action="store_true", default=default, help="show tracebacks")


def _add_decoding_args(
    p: argparse.ArgumentParser, batch_size: int, gamma_help: str, tree_help: str
):
    """Draft, tree, verifier and sampling options shared by `generate` and `bench`."""
    p.add_argument("--drafter", default="layerskip", choices=("layerskip", "model"))
    p.add_argument("--draft", help="draft checkpoint (name or dir) for --drafter model")
    p.add_argument("--draft-layers", help="layer-skip draft: target layers kept, e.g. 0,2,4 "
                   "(default: all but a band of L/6 layers from the middle)")  # fmt: skip
    p.add_argument("--gamma", type=int, default=4, help=gamma_help)
    p.add_argument("--tree", default="kary_2x3", help=tree_help)
    p.add_argument("--verifier", choices=VERIFIERS, help="default: greedy at T=0, else swor")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))


def build_parser() -> argparse.ArgumentParser:
    from jaxspec.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="jaxspec", description=__doc__.split("\n")[0])
    _add_common(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text (speculative-decoding-ready)")
    g.add_argument("--model", default=DEFAULT_MODEL, help="registered name or checkpoint dir")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="prompt text (repeat for several)")
    src.add_argument("--prompts-file", type=Path, help="JSONL: 'prompt' or 'turns' per line")
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--method", default="ar", choices=METHODS, help="ar, or speculative")
    _add_decoding_args(g, batch_size=8, gamma_help="chain length for --method chain",
                       tree_help="tree name in configs/trees or a TOML file")  # fmt: skip
    g.add_argument("--json", action="store_true", help="print one JSON object")
    _add_common(g, argparse.SUPPRESS)

    b = sub.add_parser("bench", help="benchmark methods against AR in one process")
    b.add_argument("--model", default=DEFAULT_MODEL, help="registered name or checkpoint dir")
    b.add_argument(
        "--methods",
        default="ar,chain,tree",
        help="comma list of ar, chain (uses --gamma), chain:G, tree (uses --tree), "
        "tree:NAME|FILE; ar is always run (first): speedups are relative to it",
    )
    b.add_argument("--prompts-file", type=Path, required=True,
                   help="JSONL: 'prompt' or 'turns' per line, optional 'category'")  # fmt: skip
    b.add_argument("--limit", type=int, help="use the first N prompts (after --per-category)")
    b.add_argument("--per-category", type=int, help="use up to N prompts per category")
    b.add_argument("--raw-categories", action="store_true",
                   help="keep MT-bench's 8 sub-categories (default: grouped as mt_bench, as "
                   "Spec-Bench reports them)")  # fmt: skip
    b.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    _add_decoding_args(b, batch_size=1, gamma_help="chain length for a plain 'chain'",
                       tree_help="tree for a plain 'tree'")  # fmt: skip
    b.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON to OUT")
    b.add_argument(
        "--out-md",
        type=Path,
        metavar="FILE",
        help="write the report into FILE between <!-- bench:start/end --> markers",
    )
    _add_common(b, argparse.SUPPRESS)

    c = sub.add_parser("convert", help="convert a checkpoint")
    srcs = c.add_mutually_exclusive_group(required=True)
    srcs.add_argument("--hf", type=Path, help="HF checkpoint dir → jaxspec (orbax) checkpoint")
    srcs.add_argument("--gguf", type=Path, help="GGUF file → HF checkpoint dir (no torch)")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    _add_common(c, argparse.SUPPRESS)
    return parser


def read_prompts_file(path: Path) -> list[str]:
    return [text for text, _ in read_prompt_records(path)]


def read_prompt_records(path: Path) -> list[tuple[str, dict]]:
    """(prompt text, the whole JSON record) per non-blank line: 'prompt', else the first of
    'turns'."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(
            f"{path}: cannot read prompts file ({e.__class__.__name__}: {e})"
        ) from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            prompts.append((rec["prompt"], rec))
        elif isinstance(rec, dict) and rec.get("turns") and isinstance(rec["turns"][0], str):
            prompts.append((rec["turns"][0], rec))
        else:
            raise InputError(f"{path}:{n}: expected an object with 'prompt' or 'turns'")
    if not prompts:
        raise InputError(f"{path}: no prompts")
    return prompts


def cmd_generate(args) -> int:
    from jaxspec.models import load_model
    from jaxspec.runner import GenerateOptions, Runner

    texts = args.prompt or (read_prompts_file(args.prompts_file) if args.prompts_file else None)
    if not texts:
        raise InputError("give --prompt TEXT or --prompts-file FILE")
    for i, t in enumerate(texts):
        if not t.strip():
            raise InputError(f"prompt {i} is empty")
    opts = GenerateOptions(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    opts.validate()  # before the (slow) model load
    model = load_model(args.model, args.dtype, progress=not args.json)
    if model.tokenizer is None:
        raise InputError(f"{model.path}: no tokenizer.json, cannot encode text prompts")
    ids = [model.tokenizer.encode(t, chat=not args.no_chat) for t in texts]
    spec, draft_params = build_spec(args, model)
    outs, metrics = Runner(model.params, model.cfg, spec, draft_params).run(ids, opts)
    metrics.method = args.method
    results = [
        {"prompt": t, "token_ids": o, "text": model.tokenizer.decode(o)}
        for t, o in zip(texts, outs, strict=True)
    ]
    if args.json:
        out = {"model": model.name, "method": args.method, "results": results,
               "metrics": metrics.to_dict()}  # fmt: skip
        print(json.dumps(out, ensure_ascii=False))
    else:
        for r in results:
            print(r["text"])
            print()
        print(
            f"[{metrics.new_tokens} tokens, {metrics.tokens_per_s:.1f} tok/s decode, "
            f"ttft {metrics.ttft_s:.3f}s, compile {metrics.compile_s:.1f}s]",
            file=sys.stderr,
        )
    return 0


def build_spec(args, model):
    """(SpecConfig, draft params) for a speculative --method, or (None, None) for ar."""
    if args.method == "ar":
        return None, None
    from jaxspec.drafting import default_skip_layers, layer_skip
    from jaxspec.models import load_model
    from jaxspec.speculative import SpecConfig
    from jaxspec.trees import chain, load_tree

    if args.gamma < 1:
        raise InputError(f"--gamma must be >= 1, got {args.gamma}")
    tree = chain(args.gamma) if args.method == "chain" else load_tree(args.tree)
    verifier = args.verifier or ("greedy" if args.temperature == 0 else "swor")
    if verifier == "greedy" and args.temperature > 0:
        raise InputError(
            "--verifier greedy needs --temperature 0 (use swor/rrs/spechub/point_mass)"
        )
    if args.drafter == "model":
        if not args.draft:
            raise InputError("--drafter model needs --draft NAME|DIR")
        draft = load_model(args.draft, args.dtype, progress=not args.json)
        dcfg, dparams = draft.cfg, draft.params
    else:
        L = model.cfg.num_layers
        try:
            keep = (tuple(int(x) for x in args.draft_layers.split(",")) if args.draft_layers
                    else default_skip_layers(L))  # fmt: skip
        except ValueError:
            raise InputError(
                f"--draft-layers must be comma-separated integers: {args.draft_layers!r}"
            ) from None
        dcfg, dparams = layer_skip(model.params, model.cfg, keep)
    return SpecConfig(model.cfg, dcfg, tree, verifier), dparams


def cmd_bench(args) -> int:
    from jaxspec.bench import cmd_bench as run

    return run(args)


def cmd_convert(args) -> int:
    from jaxspec.convert.checkpoint import save_params
    from jaxspec.convert.hf import load_hf
    from jaxspec.models import DTYPES

    if args.gguf is not None:
        from jaxspec.convert.gguf import gguf_to_hf

        out = gguf_to_hf(args.gguf, args.out, dtype=args.dtype)
    else:
        cfg, params = load_hf(args.hf, DTYPES[args.dtype])
        out = save_params(args.out, cfg, params)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by `bench`
    commands = {"generate": cmd_generate, "bench": cmd_bench, "convert": cmd_convert}
    try:
        return commands[args.command](args)
    except JaxspecError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
