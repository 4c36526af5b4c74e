"""The `jaxspec` command.

  jaxspec generate [--model NAME|DIR] [--prompt TEXT ... | --prompts-file JSONL] [--no-chat]
                   [--method ar|chain|tree|sssd|magicdec] [--drafter layerskip|model|self]
                   [--draft DIR] [--datastore DIR] [--draft-tokens N|auto|adaptive]
                   [--draft-layers I,J,...] [--gamma K|auto] [--tree NAME|FILE]
                   [--draft-budget K] [--sink S] [--draft-builder copy|streaming|snapkv]
                   [--verifier greedy|swor|rrs|spechub|point_mass]
                   [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K]
                   [--batch-size B] [--seed S] [--dtype float32|bfloat16] [--json]
  jaxspec bench --prompts-file JSONL [--methods ar,chain,chain:G,tree,tree:NAME,...]
                [--limit N] [--per-category N] [--raw-categories] [--json OUT] [--out-md FILE]
                [the generate options above, --batch-size defaulting to 1]
  jaxspec convert (--hf DIR | --gguf FILE) --out DIR [--dtype ...]
  jaxspec datastore build --corpus PATH [PATH ...] --out DIR [--model NAME|DIR] [--field F]
                          [--exclude GLOB ...] [--overwrite]
  jaxspec datastore info DIR
  jaxspec profile acceptance --prompts-file JSONL [--width W] [--temperature T] [--top-p P]
                             [--drafter ... --draft ... --draft-layers ...] [--out FILE]
  jaxspec profile device [--batches 1,8] [--contexts 256,1024] [--tokens 1,2,4,...,128]
                         [--drafter layerskip|model|none ...] [--reps R] [--out FILE]
  jaxspec profile topology --acceptance FILE --device FILE [--max-depth D] [--max-width W]
                           [--out FILE]
  jaxspec profile sssd --prompts-file JSONL [--draft-tokens 1,2,3,...] [--datastore DIR]
                       [--max-new-tokens N] [--out FILE]
  jaxspec train-draft [--model NAME|DIR] [--out DIR] [--work-dir DIR] [--steps N] ...
  jaxspec serve [--model NAME|DIR] [--method sssd|ar|chain|tree] [--max-batch B]
                [--max-context C] [--max-queue Q] [--host H] [--port P] ...
                (an OpenAI-compatible HTTP server; `jaxspec serve --help`)

User errors print one line (`error: ...`) and exit with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxspec.errors import InputError, JaxspecError

METHODS = ("ar", "chain", "tree", "sssd", "magicdec")
DEFAULT_TREE = "kary_2x3"


def parse_gamma(text) -> int | str:
    """--gamma: an integer >= 1, or `auto` (magicdec: the cost model's choice)."""
    if str(text) == "auto":
        return "auto"
    try:
        return int(text)  # >= 1 is checked with the other options (one clear error line)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def check_gamma(gamma) -> None:
    if gamma != "auto" and gamma < 1:
        raise InputError(f"--gamma must be >= 1, got {gamma}")


VERIFIERS = ("greedy", "swor", "rrs", "spechub", "point_mass")


def _add_common(p: argparse.ArgumentParser, default=False):
    # accepted before or after the subcommand; SUPPRESS keeps a subparser from resetting it
    p.add_argument("--debug", action="store_true", default=default, help="show tracebacks")


def _add_draft_args(p: argparse.ArgumentParser, allow_none: bool = False):
    """--drafter / --draft / --draft-layers (read by `build_draft`)."""
    choices = ("layerskip", "model", "self") + (("none",) if allow_none else ())
    p.add_argument("--drafter", choices=choices,
                   help="default: layerskip (magicdec: self, the target's own weights on the "
                   "sparse draft cache)")  # fmt: skip
    p.add_argument("--draft", help="draft checkpoint (name or dir) for --drafter model")
    p.add_argument("--draft-layers", help="layer-skip draft: target layers kept, e.g. 0,2,4 "
                   "(default: all but a band of L/6 layers from the middle)")  # fmt: skip


def _add_decoding_args(
    p: argparse.ArgumentParser, batch_size: int, gamma_help: str, tree_help: str
):
    """Draft, tree, verifier and sampling options shared by `generate` and `bench`."""
    _add_draft_args(p)
    p.add_argument("--datastore", type=Path, metavar="DIR",
                   help="sssd: token datastore (jaxspec datastore build) drafted from besides "
                   "the row's own prompt and output")  # fmt: skip
    p.add_argument("--draft-tokens", default="auto", metavar="N|auto|adaptive",
                   help="sssd: speculated tokens per row and step; auto = per (batch, context) "
                   "bucket from the measured tau(N) (`jaxspec profile sssd`) and verify times "
                   "(`jaxspec profile device`), else SSSD's roofline rule; adaptive = up to "
                   "15 nodes, each step verifying only as many of the best as pay for their "
                   "measured cost (none when the n-gram matches are weak)")  # fmt: skip
    p.add_argument("--gamma", type=parse_gamma, default=4, metavar="G|auto", help=gamma_help)
    p.add_argument("--tree", help=tree_help + f" (default {DEFAULT_TREE}; magicdec: a chain of "
                   "--gamma unless a tree is named)")  # fmt: skip
    g = p.add_argument_group("magicdec")
    g.add_argument(
        "--draft-budget",
        type=int,
        default=512,
        metavar="K",
        help="committed slots of the sparse draft cache per row (sink + window)",
    )
    g.add_argument("--sink", type=int, default=16, help="attention-sink tokens kept")
    g.add_argument("--draft-builder", default="copy", choices=("copy", "streaming", "snapkv"),
                   help="copy: the sink/window rows of the prompt's dense KV (cheap); streaming: "
                   "a streaming-attention prefill of the prompt (the reference's); snapkv: "
                   "SnapKV's selection over the target's prompt KV")  # fmt: skip
    g.add_argument("--magicdec-profile", type=Path, metavar="FILE",
                   help="--gamma auto: the measured acceptance/timing profile (default: "
                   "configs/profiles/magicdec__<device>__<model>.toml)")  # fmt: skip
    p.add_argument("--acceptance-profile", metavar="FILE",
                   help="--tree auto: acceptance profile (default: configs/profiles/"
                   "<target>__<draft>__T<temperature>.toml); sssd --draft-tokens auto: "
                   "the tau(N) profile (default: <target>__sssd[-ds]__T<temperature>.toml)"
                   )  # fmt: skip
    p.add_argument("--device-profile", type=Path, metavar="FILE",
                   help="--tree auto and sssd --draft-tokens auto: device timing table "
                   "(default: configs/profiles/device__<device>__<model>.toml)")  # fmt: skip
    p.add_argument("--verifier", choices=VERIFIERS,
                   help="default: greedy at T=0, else swor (point_mass for sssd)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    _add_attention_arg(p)
    _add_prefill_args(p)


def _add_prefill_args(p: argparse.ArgumentParser):
    """--prefill and CritiPrefill's hyper-parameters (read by `build_prefill`)."""
    from jaxspec.critiprefill import CritiPrefill

    d = CritiPrefill()
    g = p.add_argument_group("prefill")
    g.add_argument("--prefill", default="dense", choices=("dense", "critiprefill"),
                   help="critiprefill: block-sparse attention for prompt segments past "
                   "--threshold (lossy prefill; decoding after it is exact)")  # fmt: skip
    g.add_argument("--segment", type=int, default=d.segment, help="queries per segment (chunk)")
    g.add_argument("--block", type=int, default=d.block, help="KV block size (slots)")
    g.add_argument("--budget", type=int, default=d.budget, help="tokens of selected blocks")
    g.add_argument("--threshold", type=int, default=d.threshold,
                   help="segments starting before this are dense (>= --budget)")  # fmt: skip
    g.add_argument("--no-layer-fusion", action="store_true",
                   help="score each layer on its own (no 0.25/0.75 fusion)")  # fmt: skip


def build_prefill(args):
    """The target's CritiPrefill config from --prefill ..., or None for dense prefill."""
    from jaxspec.critiprefill import CritiPrefill

    if getattr(args, "prefill", "dense") == "dense":
        return None
    return CritiPrefill(
        segment=args.segment, block=args.block, budget=args.budget, threshold=args.threshold,
        layer_fusion=not args.no_layer_fusion,
    )  # fmt: skip


def _add_attention_arg(p: argparse.ArgumentParser):
    p.add_argument(
        "--attention", default="auto", choices=("auto", "pallas", "reference"),
        help="attention op: auto = the Pallas kernel on a GPU for 16-bit models, else the jnp "
        "reference (the CPU path); pallas forces the kernel (interpret mode off the GPU)",
    )  # fmt: skip


def _add_prompt_set_args(p) -> None:
    """--model and the prompt-set options of the `profile` commands that decode prompts."""
    from jaxspec.models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="registered name or checkpoint dir")
    p.add_argument("--prompts-file", type=Path, required=True,
                   help="JSONL: 'prompt' or 'turns' per line, optional 'category'")  # fmt: skip
    p.add_argument("--per-category", type=int, help="use up to N prompts per category")
    p.add_argument("--limit", type=int, help="use the first N prompts")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")


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
                       tree_help="tree name in configs/trees, a TOML file, or auto (Sequoia: "
                       "the tree of the batch/context bucket from the acceptance and device "
                       "profiles; AR where no tree pays)")  # fmt: skip
    g.add_argument("--json", action="store_true", help="print one JSON object")
    _add_common(g, argparse.SUPPRESS)

    b = sub.add_parser("bench", help="benchmark methods against AR in one process")
    b.add_argument("--model", default=DEFAULT_MODEL, help="registered name or checkpoint dir")
    b.add_argument(
        "--methods",
        default="ar,chain,tree",
        help="comma list of ar, chain (uses --gamma), chain:G, tree (uses --tree), "
        "tree:NAME|FILE, sssd, sssd:N, sssd:adaptive, sssd-ds, sssd-ds:N, sssd-ds:adaptive "
        "(sssd-ds: with --datastore), magicdec, magicdec:G, magicdec:auto; ar is "
        "always run (first): speedups are relative to it",
    )
    b.add_argument("--prompts-file", type=Path,
                   help="JSONL: 'prompt' or 'turns' per line, optional 'category' (required; "
                   "--long-context: books with 'text')")  # fmt: skip
    b.add_argument("--limit", type=int, help="use the first N prompts (after --per-category)")
    b.add_argument("--per-category", type=int, help="use up to N prompts per category")
    b.add_argument("--raw-categories", action="store_true",
                   help="keep MT-bench's 8 sub-categories (default: grouped as mt_bench, as "
                   "Spec-Bench reports them)")  # fmt: skip
    b.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    _add_decoding_args(b, batch_size=1, gamma_help="chain length for a plain 'chain'",
                       tree_help="tree for a plain 'tree'")  # fmt: skip
    lc = b.add_argument_group("long context (MagicDec's batch × context sweep)")
    lc.add_argument("--long-context", action="store_true",
                    help="run the sweep: AR vs MagicDec self-speculation per batch size and "
                    "context length on windows of the --prompts-file books")  # fmt: skip
    lc.add_argument("--batch-sizes", default="1,4,16,32", metavar="B,B,...")
    lc.add_argument("--context-lengths", default="1024,4096,8000", metavar="N,N,...")
    lc.add_argument(
        "--gammas",
        default="2,3,4",
        metavar="G,G,...",
        help="chain lengths run at --draft-budget (the chooser searches these)",
    )
    lc.add_argument(
        "--budgets",
        default="256,512,1024",
        metavar="K,K,...",
        help="draft budgets whose acceptance is measured (the chooser's options)",
    )
    lc.add_argument(
        "--distinct-rows",
        type=int,
        default=4,
        help="distinct book windows prefilled per context (batches repeat them)",
    )
    lc.add_argument("--layout", choices=("auto", "input", "output", "unrolled"), default="auto",
                    help="weight layout the sweep decodes with (default: what `generate` uses: "
                    "unrolled on one CPU device, with per-layer KV caches)")  # fmt: skip
    lc.add_argument("--skip", type=int, default=2000, help="tokens skipped at each book's start")
    lc.add_argument("--reps", type=int, default=3, help="timing repetitions per forward")
    lc.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="interleaved rounds of measured decoding per bucket (each: AR and every "
        "configuration once, order rotated; speedup = median over rounds of the ratio to the "
        "same round's AR)",
    )
    lc.add_argument(
        "--on-mismatch",
        choices=("raise", "report"),
        default="raise",
        help="a configuration whose tokens differ from AR's: stop (default), or record the "
        "fraction of identical rows and go on (e.g. bf16, or GPU matmuls whose summation order "
        "depends on the token count)",
    )
    lc.add_argument(
        "--profile-out",
        type=Path,
        metavar="FILE",
        help="where to write the MagicDec profile for --gamma auto",
    )
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

    d = sub.add_parser("datastore", help="SSSD token datastores")
    dsub = d.add_subparsers(dest="datastore_command", required=True)
    db = dsub.add_parser("build", help="tokenize a corpus into a datastore directory")
    db.add_argument("--corpus", nargs="+", required=True, metavar="PATH",
                    help="a .jsonl file (one document per line), a directory (its *.py, *.txt, "
                    "*.md files) or any text file (one document)")  # fmt: skip
    db.add_argument("--out", type=Path, required=True, metavar="DIR")
    db.add_argument("--model", default=DEFAULT_MODEL,
                    help="registered name or checkpoint dir whose tokenizer to use")  # fmt: skip
    db.add_argument("--field", default="text", help="the text field of .jsonl records")
    db.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                    help="in directories, skip files/dirs whose name or relative path matches "
                    "(repeatable), e.g. --exclude test --exclude site-packages")  # fmt: skip
    db.add_argument("--overwrite", action="store_true", help="replace an existing datastore")
    _add_common(db, argparse.SUPPRESS)
    di = dsub.add_parser("info", help="print a datastore's meta.json")
    di.add_argument("dir", type=Path)
    _add_common(di, argparse.SUPPRESS)
    _add_common(d, argparse.SUPPRESS)

    pr = sub.add_parser("profile", help="measure acceptance vectors (Sequoia)")
    psub = pr.add_subparsers(dest="profile_command", required=True)
    pa = psub.add_parser("acceptance", help="positional acceptance vector from one-level trees")
    _add_prompt_set_args(pa)
    pa.add_argument("--width", type=int, default=8, help="children of the root per step (W)")
    _add_draft_args(pa)
    pa.add_argument("--max-new-tokens", type=int, default=64)
    pa.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (top-W draft)")
    pa.add_argument("--top-p", type=float, default=1.0)
    pa.add_argument("--top-k", type=int, default=0, help="0 = off")
    pa.add_argument("--batch-size", type=int, default=1)
    pa.add_argument("--seed", type=int, default=0)
    pa.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    _add_attention_arg(pa)
    pa.add_argument("--out", type=Path,
                    help="default: configs/profiles/<target>__<draft>__T<temp>.toml")  # fmt: skip
    _add_common(pa, argparse.SUPPRESS)
    pd = psub.add_parser("device", help="time the target (and draft) forward per bucket")
    pd.add_argument("--model", default=DEFAULT_MODEL, help="registered name or checkpoint dir")
    pd.add_argument("--batches", default="1,8", help="batch buckets (comma list)")
    pd.add_argument("--contexts", default="256,1024", help="context buckets (committed tokens)")
    pd.add_argument("--tokens", default="1,2,4,8,16,32,64,128",
                    help="in-flight tokens per row, n (comma list)")  # fmt: skip
    _add_draft_args(pd, allow_none=True)
    pd.add_argument("--reps", type=int, default=3, help="timed runs per point (median)")
    pd.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    _add_attention_arg(pd)
    pd.add_argument("--out", type=Path,
                    help="default: configs/profiles/device__<device>__<model>.toml")  # fmt: skip
    _add_common(pd, argparse.SUPPRESS)
    ps = psub.add_parser("sssd", help="tokens per step tau(N) of SSSD for several N")
    _add_prompt_set_args(ps)
    ps.add_argument("--draft-tokens", default="1,2,3,4,6,8,12,15",
                    help="N values to measure (comma list)")  # fmt: skip
    ps.add_argument("--datastore", type=Path, help="a `jaxspec datastore build` directory")
    ps.add_argument("--max-new-tokens", type=int, default=64)
    ps.add_argument("--temperature", type=float, default=0.0,
                    help="0 = greedy, else the point-mass rule")  # fmt: skip
    ps.add_argument("--batch-size", type=int, default=8, help="rows per batch (tau per row)")
    ps.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ps.add_argument("--out", type=Path,
                    help="default: configs/profiles/<model>__sssd[-ds]__T<temp>.toml")  # fmt: skip
    _add_common(ps, argparse.SUPPRESS)
    pt = psub.add_parser("topology", help="Sequoia's optimal tree per (batch, context) bucket")
    pt.add_argument("--acceptance", required=True, help="acceptance profile TOML (or its name)")
    pt.add_argument("--device", type=Path, required=True, help="device timing table TOML")
    pt.add_argument("--max-depth", type=int, default=8, help="levels, root included")
    pt.add_argument("--max-width", type=int, help="fan-out cap (2: binary trees for SpecHub)")
    pt.add_argument("--out", type=Path, help="write the table as TOML")
    _add_common(pt, argparse.SUPPRESS)
    _add_common(pr, argparse.SUPPRESS)
    from jaxspec.distill.command import add_parser as add_train_draft

    add_train_draft(sub, lambda p: _add_common(p, argparse.SUPPRESS))
    from jaxspec.serving.launch import add_args as add_serve_args

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)")
    add_serve_args(sv, DEFAULT_MODEL)
    _add_common(sv, argparse.SUPPRESS)
    return parser


def read_prompts_file(path: Path) -> list[str]:
    return [text for text, _ in read_prompt_records(path)]


def read_prompt_records(path: Path) -> list[tuple[str, dict]]:
    """(prompt text, the whole JSON record) per non-blank line: 'prompt', else the first of
    'turns'."""
    from jaxspec.fsutil import iter_jsonl

    prompts = []
    for n, rec in iter_jsonl(path, "prompts file"):
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
    if args.method == "sssd":
        check_sssd_args(args)
    model = load_model(
        args.model,
        args.dtype,
        progress=not args.json,
        attention=args.attention,
        prefill=build_prefill(args),
    )
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
    if args.method == "sssd":
        return build_sssd(args, model)
    check_gamma(args.gamma)
    if args.method == "magicdec":
        return build_magicdec(args, model)
    from jaxspec.speculative import SpecConfig
    from jaxspec.trees import chain, load_tree

    if args.gamma == "auto":
        raise InputError("--gamma auto is for --method magicdec (Sequoia's is --tree auto)")
    tree_name = args.tree or DEFAULT_TREE
    auto = args.method == "tree" and tree_name == "auto"
    tree = chain(args.gamma) if args.method == "chain" else None if auto else load_tree(tree_name)
    verifier = spec_verifier(args)
    dcfg, dparams, dname = build_draft(args, model)
    if auto:
        return auto_spec(args, model, dcfg, dname, verifier), dparams
    return SpecConfig(model.cfg, dcfg, tree, verifier), dparams


def spec_verifier(args) -> str:
    verifier = args.verifier or ("greedy" if args.temperature == 0 else "swor")
    if verifier == "greedy" and args.temperature > 0:
        raise InputError(
            "--verifier greedy needs --temperature 0 (use swor/rrs/spechub/point_mass)"
        )
    return verifier


def build_magicdec_config(args):
    """The `MagicDec` config from --draft-budget/--sink/--draft-builder/--drafter (no model)."""
    from jaxspec.errors import ConfigError
    from jaxspec.magicdec import MagicDec

    if args.drafter not in (None, "self", "model"):
        raise InputError(
            f"--method magicdec drafts with the target itself (--drafter self) or a draft model "
            f"(--drafter model --draft DIR), not {args.drafter}"
        )
    try:
        return MagicDec(budget=args.draft_budget, sink=args.sink, builder=args.draft_builder,
                        self_draft=args.drafter != "model")  # fmt: skip
    except ConfigError as e:
        raise InputError(str(e)) from None


def build_magicdec(args, model):
    """(SpecConfig or a per-bucket chooser, draft params) for --method magicdec."""
    from jaxspec.speculative import SpecConfig
    from jaxspec.trees import chain, load_tree

    md = build_magicdec_config(args)
    verifier = spec_verifier(args)
    if md.self_draft:
        dcfg, dparams = model.cfg, model.params
    else:
        dcfg, dparams, _ = build_draft(args, model)
    if args.gamma == "auto":
        if args.tree:
            raise InputError("--gamma auto picks a chain per bucket: do not also name --tree")
        from jaxspec.magicdec_auto import auto_magicdec

        return auto_magicdec(args, model, md, dcfg, verifier), dparams
    tree = load_tree(args.tree) if args.tree else chain(args.gamma)
    return SpecConfig(model.cfg, dcfg, tree, verifier, magicdec=md), dparams


def auto_spec(args, model, dcfg, dname: str, verifier: str):
    """`--tree auto`: a function (batch bucket, context) -> SpecConfig | None (AR) from
    Sequoia's topology table for the acceptance profile and the device timing table."""
    import functools
    import tomllib

    from jaxspec.errors import ConfigError
    from jaxspec.profiling import PROFILE_DIR, profile_name, read_profile
    from jaxspec.speculative import SpecConfig
    from jaxspec.trees.sequoia import AutoTree, topology_table

    mname = Path(str(model.name)).name
    acc = read_profile(
        args.acceptance_profile
        or PROFILE_DIR / f"{profile_name(mname, dname, args.temperature)}.toml"
    )
    dev_path = device_table_path(args, model)
    try:
        device = tomllib.loads(Path(dev_path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{dev_path}: no readable device timing table for --tree auto ({e}); "
                          "make one with `jaxspec profile device`") from None  # fmt: skip
    width = 2 if verifier == "spechub" else None
    auto = AutoTree.from_choices(topology_table(acc["p"], device, max_width=width))

    @functools.cache
    def spec_for(batch: int, context: int):
        tree = auto.tree_for(batch, context)
        return None if tree is None else SpecConfig(model.cfg, dcfg, tree, verifier)

    return spec_for


def build_draft(args, model):
    """(draft config, draft params, a short draft name) from --drafter/--draft/--draft-layers."""
    from jaxspec.drafting import default_skip_layers, layer_skip
    from jaxspec.models import load_model

    if args.drafter == "self":
        return model.cfg, model.params, "self"
    if args.drafter == "model":
        if not args.draft:
            raise InputError("--drafter model needs --draft NAME|DIR")
        from jaxspec.drafting.vocab import load_draft

        draft = load_model(args.draft, args.dtype, progress=not args.json, attention=args.attention)
        dcfg, dparams = load_draft(draft)  # a reduced-vocabulary head when it has one
        return dcfg, dparams, Path(str(draft.name)).name
    from jaxspec.profiling import layerskip_name

    L = model.cfg.num_layers
    try:
        keep = (tuple(int(x) for x in args.draft_layers.split(",")) if args.draft_layers
                else default_skip_layers(L))  # fmt: skip
    except ValueError:
        raise InputError(
            f"--draft-layers must be comma-separated integers: {args.draft_layers!r}"
        ) from None
    dcfg, dparams = layer_skip(model.params, model.cfg, keep)
    return dcfg, dparams, layerskip_name(tuple(sorted(keep)))


def device_table_path(args, model) -> Path:
    """--device-profile, or this device's table for the model (`jaxspec profile device`)."""
    from jaxspec.profiling import device_profile_path

    given = getattr(args, "device_profile", None)
    return Path(given) if given else device_profile_path(Path(str(model.name)).name)


def parse_draft_tokens(text) -> int | str | None:
    """--draft-tokens: an integer >= 1, None for `auto`, or "adaptive"."""
    if text is None or str(text) == "auto":
        return None
    if str(text) == "adaptive":
        return "adaptive"
    try:
        n = int(text)
    except ValueError:
        raise InputError(
            f"--draft-tokens must be an integer, 'auto' or 'adaptive', got {text!r}"
        ) from None
    if n < 1:
        raise InputError(f"--draft-tokens must be >= 1, got {n}")
    return n


def check_sssd_args(args) -> None:
    """Every sssd option check that needs no model (run before loading one)."""
    parse_draft_tokens(args.draft_tokens)
    if args.verifier not in (None, "greedy", "point_mass"):
        raise InputError(
            f"--method sssd drafts deterministic tokens: use --verifier greedy (T = 0) or "
            f"point_mass, not {args.verifier}"
        )
    if args.verifier == "greedy" and args.temperature > 0:
        raise InputError("--verifier greedy needs --temperature 0 (use point_mass)")
    if args.datastore is not None:
        from jaxspec.drafting.datastore import read_meta

        read_meta(args.datastore)  # a bad path or version fails before the model load


def sssd_ngram(draft_tokens: int | None, batch_size: int, dtype: str):
    """The n-gram drafter's config: N given, or SSSD's rule s(b) for this device (None = the rule
    predicts no gain: decode autoregressively)."""
    from jaxspec.drafting.sssd_auto import ngram_config
    from jaxspec.hardware import measure_roofline, speculation_length

    if draft_tokens is None:
        b = 1 << max(batch_size - 1, 0).bit_length()  # the batch bucket (power of two)
        s = speculation_length(b, measure_roofline(dtype).knee_tokens)
        if s <= 1:
            return None
        draft_tokens = s - 1
    return ngram_config(draft_tokens)


def sssd_auto_tables(args, model, with_datastore: bool):
    """`--draft-tokens auto` from measurements (`jaxspec.drafting.sssd_auto`): the SssdAuto of
    the SSSD tau profile (--acceptance-profile, default configs/profiles/<model>__sssd[-ds]__T<T>
    .toml) and the device timing table (--device-profile, default device__<device>__<model>.toml);
    None when the default profile files do not exist (then SSSD's roofline rule applies, and a
    line on stderr says so). Files named explicitly must exist and parse."""
    from jaxspec.drafting.sssd_auto import load_sssd_auto, sssd_profile_name
    from jaxspec.profiling import PROFILE_DIR

    mname = Path(str(model.name)).name
    given = getattr(args, "acceptance_profile", None)
    prof = Path(given) if given else PROFILE_DIR / (
        sssd_profile_name(mname, with_datastore, args.temperature) + ".toml")  # fmt: skip
    dev = device_table_path(args, model)
    if not given and not (prof.is_file() and Path(dev).is_file()):
        missing = prof if not prof.is_file() else dev
        print(f"sssd --draft-tokens auto: {missing} not found (make it with `jaxspec profile "
              f"{'sssd' if missing == prof else 'device'}`); using SSSD's roofline rule",
              file=sys.stderr)  # fmt: skip
        return None
    return load_sssd_auto(prof, dev)


def build_sssd(args, model):
    """(SpecConfig, datastore or None) for --method sssd; (None, None) when `auto` picks AR.
    With `--draft-tokens auto` and measured tables (`sssd_auto_tables`), the first item is an
    `AutoSssdSpecs`: a per-(batch, context) bucket choice the Runner calls."""
    from jaxspec.drafting.datastore import load_datastore
    from jaxspec.speculative import SpecConfig
    from jaxspec.trees import chain

    check_sssd_args(args)
    verifier = args.verifier or ("greedy" if args.temperature == 0 else "point_mass")
    n = parse_draft_tokens(args.draft_tokens)
    ds = None
    if args.datastore is not None:
        vocab = model.tokenizer.vocab_size if model.tokenizer is not None else None
        ds, _ = load_datastore(args.datastore, expected_vocab=vocab)
    if n == "adaptive":  # the verify width per step, costed by the device timing table
        from jaxspec.drafting.sssd_auto import AdaptiveSssdSpecs

        return AdaptiveSssdSpecs.load(device_table_path(args, model), model.cfg, verifier), ds
    if n is None:
        auto = sssd_auto_tables(args, model, ds is not None)
        if auto is not None:
            from jaxspec.drafting.sssd_auto import AutoSssdSpecs

            return AutoSssdSpecs(model.cfg, auto, verifier), ds
    ngram = sssd_ngram(n, args.batch_size, args.dtype)
    if ngram is None:
        return None, None
    return SpecConfig(model.cfg, model.cfg, chain(0), verifier, ngram=ngram), ds


def _int_list(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise InputError(f"{flag} needs integers >= 1, got {text!r}")
    return sorted(set(vals))


def cmd_profile_device(args) -> int:
    import shlex

    import jax

    from jaxspec.hardware import measure_roofline
    from jaxspec.models import load_model
    from jaxspec.profiling import device_profile_path, profile_device, write_device_profile

    batches = _int_list(args.batches, "--batches")
    contexts = _int_list(args.contexts, "--contexts")
    tokens = _int_list(args.tokens, "--tokens")
    if args.reps < 1:
        raise InputError(f"--reps must be >= 1, got {args.reps}")
    if args.drafter == "model" and not args.draft:
        raise InputError("--drafter model needs --draft NAME|DIR")
    args.json = False
    model = load_model(args.model, args.dtype, progress=True, attention=args.attention)
    longest = max(contexts) + max(tokens)
    if longest > model.cfg.max_position_embeddings:
        raise InputError(f"context {max(contexts)} + {max(tokens)} tokens exceeds the model's "
                         f"{model.cfg.max_position_embeddings} positions")  # fmt: skip
    draft, dname = None, None
    if args.drafter != "none":
        dcfg, dparams, dname = build_draft(args, model)
        draft = (dcfg, dparams)
    table = profile_device(model.params, model.cfg, batches, contexts, tokens, draft, args.reps)
    roof = measure_roofline(args.dtype)
    out = args.out or device_profile_path(Path(str(model.name)).name)
    meta = {"model": str(model.name), "draft": dname, "device": roof.device,
            "dtype": args.dtype, "jax_version": jax.__version__,
            "flops_per_s": roof.flops_per_s, "bytes_per_s": roof.bytes_per_s,
            "command": shlex.join(["jaxspec", *args.argv])}  # fmt: skip
    write_device_profile(out, table, meta)
    t = table["target_s"]
    print(f"target t(b={batches[0]}, ctx={contexts[0]}, n): "
          + ", ".join(f"{n}: {t[0][0][i] * 1e3:.1f} ms" for i, n in enumerate(tokens))
          + f" -> {out}")  # fmt: skip
    return 0


def cmd_profile_topology(args) -> int:
    import shlex
    import tomllib

    from jaxspec.errors import ConfigError
    from jaxspec.profiling import read_profile, write_toml
    from jaxspec.trees.sequoia import topology_table

    if args.max_depth < 2:
        raise InputError(f"--max-depth must be >= 2 (root + one level), got {args.max_depth}")
    if args.max_width is not None and args.max_width < 1:
        raise InputError(f"--max-width must be >= 1, got {args.max_width}")
    acc = read_profile(args.acceptance)
    try:
        device = tomllib.loads(args.device.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{args.device}: unreadable device timing table ({e})") from None
    for k in ("batches", "contexts", "tokens", "target_s"):
        if k not in device:
            raise ConfigError(f"{args.device}: no {k!r}: not a `jaxspec profile device` table")
    table = topology_table(acc["p"], device, args.max_depth, args.max_width)
    print(
        "| batch | context | nodes | depth | expected tokens/step | step ms | predicted speedup |"
    )
    print("|---|---|---|---|---|---|---|")
    body = {"acceptance": acc["path"], "device": str(args.device),
            "command": shlex.join(["jaxspec", *args.argv])}  # fmt: skip
    for b, c, ch in table:
        print(f"| {b} | {c} | {ch.nodes} | {ch.depth} | {ch.expected_tokens:.2f} | "
              f"{ch.step_s * 1e3:.1f} | {ch.speedup:.2f}× |")  # fmt: skip
        body[f"b{b}_ctx{c}"] = list(ch.tree.parents) if ch.tree is not None else [-1]
    if args.out is not None:
        write_toml(
            args.out,
            body,
            [
                "Sequoia topology table: parents of the chosen tree per "
                "bucket b<batch>_ctx<context> ([-1]: autoregressive)."
            ],
        )
        print(f"wrote {args.out}")
    return 0


def cmd_profile_sssd(args) -> int:
    import shlex

    from jaxspec.bench import select_prompts
    from jaxspec.drafting.datastore import load_datastore, read_meta
    from jaxspec.drafting.sssd_auto import measure_tau, sssd_profile_name
    from jaxspec.models import load_model
    from jaxspec.profiling import PROFILE_DIR, _now, write_toml
    from jaxspec.runner import GenerateOptions

    ns = _int_list(args.draft_tokens, "--draft-tokens")
    if args.temperature < 0:
        raise InputError(f"--temperature must be >= 0, got {args.temperature}")
    prompts = select_prompts(read_prompt_records(args.prompts_file), args.limit,
                             args.per_category)  # fmt: skip
    opts = GenerateOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           batch_size=args.batch_size)  # fmt: skip
    opts.validate()
    if args.datastore is not None:
        read_meta(args.datastore)  # a bad path or version fails before the model load
    model = load_model(args.model, args.dtype, progress=True)
    if model.tokenizer is None:
        raise InputError(f"{model.path}: no tokenizer.json, cannot encode text prompts")
    ds = None
    if args.datastore is not None:
        ds, _ = load_datastore(args.datastore, expected_vocab=model.tokenizer.vocab_size)
    ids = [model.tokenizer.encode(t, chat=not args.no_chat) for t, _ in prompts]
    tau = measure_tau(model, ids, ns, opts, ds)
    mname = Path(str(model.name)).name
    out = args.out or PROFILE_DIR / (
        sssd_profile_name(mname, ds is not None, args.temperature) + ".toml")  # fmt: skip
    body = {"model": str(model.name), "datastore": str(args.datastore or ""),
            "temperature": args.temperature, "prompts_file": str(args.prompts_file),
            "prompts": len(ids), "max_new_tokens": args.max_new_tokens,
            "command": shlex.join(["jaxspec", *args.argv]), "created": _now(),
            "draft_tokens": ns, "tau": [round(t, 4) for t in tau]}  # fmt: skip
    write_toml(out, body, [
        "SSSD tokens per target step tau(N) for N draft tokens per row (bonus included).",
        "Written by `jaxspec profile sssd`; read by --draft-tokens auto (jaxspec/drafting/"
        "sssd_auto.py).",
    ])  # fmt: skip
    print("tau(N): " + ", ".join(f"{n}: {t:.3f}" for n, t in zip(ns, tau, strict=True))
          + f" -> {out}")  # fmt: skip
    return 0


def cmd_profile(args) -> int:
    import shlex

    if args.profile_command == "device":
        return cmd_profile_device(args)
    if args.profile_command == "topology":
        return cmd_profile_topology(args)
    if args.profile_command == "sssd":
        return cmd_profile_sssd(args)

    from jaxspec.bench import select_prompts
    from jaxspec.models import load_model
    from jaxspec.profiling import PROFILE_DIR, profile_acceptance, profile_name, write_profile
    from jaxspec.runner import GenerateOptions
    from jaxspec.speculative import SpecConfig
    from jaxspec.trees import kary

    if args.width < 1:
        raise InputError(f"--width must be >= 1, got {args.width}")
    prompts = select_prompts(read_prompt_records(args.prompts_file), args.limit,
                             args.per_category)  # fmt: skip
    opts = GenerateOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           batch_size=args.batch_size)  # fmt: skip
    opts.validate()
    if args.drafter == "model" and not args.draft:
        raise InputError("--drafter model needs --draft NAME|DIR")
    args.json = False
    model = load_model(args.model, args.dtype, progress=True, attention=args.attention)
    if model.tokenizer is None:
        raise InputError(f"{model.path}: no tokenizer.json, cannot encode text prompts")
    ids = [model.tokenizer.encode(t, chat=not args.no_chat) for t, _ in prompts]
    dcfg, dparams, dname = build_draft(args, model)
    verifier = "greedy" if args.temperature == 0 else "swor"
    spec = SpecConfig(model.cfg, dcfg, kary(args.width, 1), verifier)
    prof = profile_acceptance(model, spec, dparams, ids, opts)
    name = profile_name(Path(str(model.name)).name, dname, args.temperature)
    out = args.out or PROFILE_DIR / f"{name}.toml"
    meta = {"target": str(model.name), "draft": dname, "temperature": args.temperature,
            "top_p": args.top_p, "top_k": args.top_k, "width": args.width,
            "verifier": verifier, "prompts_file": str(args.prompts_file),
            "max_new_tokens": args.max_new_tokens,
            "command": shlex.join(["jaxspec", *args.argv])}  # fmt: skip
    write_profile(out, prof, meta)
    ps = ", ".join(f"{x:.3f}" for x in prof["p"])
    print(f"p = [{ps}], none = {prof['none']:.3f} over {prof['steps']} steps "
          f"({prof['prompts']} prompts) -> {out}")  # fmt: skip
    return 0


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


def cmd_datastore(args) -> int:
    import shlex
    import time

    from jaxspec.drafting import datastore as dstore

    if args.datastore_command == "info":
        _, _, meta = dstore.load_datastore_np(args.dir)  # checks the files against the meta
        print(json.dumps(meta, indent=2, ensure_ascii=False))
        print(f"[{dstore.disk_size(args.dir) / 2**20:.1f} MiB on disk]", file=sys.stderr)
        return 0
    from jaxspec.errors import CheckpointError
    from jaxspec.models import REGISTRY, ensure_hf
    from jaxspec.tokenizer import Tokenizer

    docs = dstore.read_corpus(args.corpus, field=args.field, exclude=args.exclude)
    t0 = time.perf_counter()
    if args.model in REGISTRY:  # only the tokenizer is needed: the HF dir, params not loaded
        path, name = ensure_hf(args.model), args.model
    elif Path(args.model).is_dir():
        path = Path(args.model)
        name = str(path.resolve())
    else:
        raise CheckpointError(
            f"{args.model}: no such model directory and not a known model "
            f"(known: {', '.join(sorted(REGISTRY))})"
        )
    meta = dstore.build_datastore(
        (text for _, text in docs),
        args.out,
        Tokenizer.from_dir(path),
        corpus_names=args.corpus,
        tokenizer_name=name,
        command=shlex.join(["jaxspec", *args.argv]),
        overwrite=args.overwrite,
    )
    secs = time.perf_counter() - t0
    print(
        f"wrote {args.out}: {meta['num_tokens']:,} tokens, {meta['num_documents']:,} documents, "
        f"{secs:.1f}s, {dstore.disk_size(args.out) / 2**20:.1f} MiB"
    )
    return 0


def cmd_train_draft(args) -> int:
    from jaxspec.distill.command import run

    return run(args)


def cmd_serve(args) -> int:
    from jaxspec.serving.launch import cmd_serve as serve

    return serve(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by `bench`
    commands = {"generate": cmd_generate, "bench": cmd_bench, "convert": cmd_convert,
                "datastore": cmd_datastore, "profile": cmd_profile,
                "train-draft": cmd_train_draft, "serve": cmd_serve}  # fmt: skip
    try:
        return commands[args.command](args)
    except JaxspecError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
