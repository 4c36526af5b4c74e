"""`jaxspec serve`: options, the engine they describe, warm-up, and the server's start.

  jaxspec serve [--model NAME|DIR] [--method sssd|ar|chain|tree] [--datastore DIR]
                [--draft-tokens N|auto|adaptive]
                [--drafter ... --draft ... --gamma G --tree NAME|auto]
                [--max-batch B] [--max-context C] [--max-queue Q] [--host H] [--port P]

Speculation per batch bucket (b = 1, 2, 4, ... up to --max-batch active slots):
  sssd (default)  n-gram drafts with N(b) tokens per row from SSSD's rule s(b) on this device's
                  measured compute/bandwidth ratio (`--draft-tokens N` fixes it; `adaptive`
                  chooses the verify width every step, `ngram.choose_width`); where the rule
                  predicts no gain the bucket decodes autoregressively. Verified with the
                  point-mass rule: lossless for greedy and sampled requests alike.
  chain / tree    a draft model (--drafter / --draft), the same tree at every bucket
                  (`--tree auto`: Sequoia's choice per bucket, AR where it predicts no gain),
                  SWOR verification (lossless at any temperature, token-identical for greedy
                  requests). AR steps keep the draft model's cache in step.
  ar              autoregressive at every bucket.
Warm-up (default on) compiles the prefill of each prompt bucket up to --max-context and the
steps of each batch bucket before the port opens (compile time reported apart), and times them:
the cost model then speculates at a bucket only while tau_est · t_AR / t_spec >= 1
(`--expected-tau` to start, then the tau observed; `--no-gate` turns it off).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SERVE_METHODS = ("sssd", "ar", "chain", "tree")


def add_args(p: argparse.ArgumentParser, default_model: str) -> None:
    from jaxspec.cli import _add_attention_arg, _add_draft_args

    p.add_argument("--model", default=default_model, help="registered name or checkpoint dir")
    p.add_argument("--method", default="sssd", choices=SERVE_METHODS,
                   help="speculation (default sssd: model-free, batch-aware)")  # fmt: skip
    p.add_argument("--datastore", metavar="DIR", help="SSSD token datastore")
    p.add_argument("--draft-tokens", default="auto", metavar="N|auto|adaptive",
                   help="SSSD draft tokens per row (auto: per bucket from `jaxspec profile sssd` "
                   "and `profile device` tables when present, else SSSD's s(b); adaptive: "
                   "up to 15, the verify width chosen every step, costed by the device "
                   "table)")  # fmt: skip
    _add_draft_args(p)
    p.add_argument("--gamma", type=int, default=4, help="chain length for --method chain")
    p.add_argument("--tree", help="tree for --method tree (a name, a file, or auto)")
    p.add_argument("--verifier", choices=("swor", "rrs", "spechub", "point_mass"),
                   help="tree/chain verifier (default swor)")  # fmt: skip
    p.add_argument("--acceptance-profile", metavar="FILE",
                   help="--tree auto: acceptance vector (default: the draft's committed profile "
                   "at --profile-temperature)")  # fmt: skip
    p.add_argument("--profile-temperature", type=float, default=0.0,
                   help="--tree auto: which committed acceptance profile to read")  # fmt: skip
    p.add_argument("--device-profile", type=Path, metavar="FILE",
                   help="--tree auto and --draft-tokens adaptive: device timing table "
                   "(default: this device's)")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=8, help="slots decoded together")
    p.add_argument("--max-context", type=int, default=2048,
                   help="prompt + generated tokens per request")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=64,
                   help="queued requests before 429 Too Many Requests")  # fmt: skip
    p.add_argument("--admit-per-step", type=int, default=4,
                   help="prefills started between two steps")  # fmt: skip
    p.add_argument("--prefill-budget", type=int, default=256,
                   help="prompt tokens prefilled between two decode steps")  # fmt: skip
    p.add_argument(
        "--no-gate",
        action="store_true",
        help="speculate at every bucket, even where the cost model predicts no gain",
    )
    p.add_argument("--expected-tau", type=float, default=1.8,
                   help="cost model: initial tokens per step of speculating buckets")  # fmt: skip
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    _add_attention_arg(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-warmup", action="store_true", help="compile on first use instead")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))  # fmt: skip
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # for build_draft


def spec_for_args(args, model, context: int):
    """(bucket → SpecConfig | None, draft params or datastore) for --method."""
    from jaxspec.cli import build_draft, parse_draft_tokens, sssd_ngram
    from jaxspec.errors import InputError
    from jaxspec.speculative import SpecConfig
    from jaxspec.trees import chain, load_tree

    if args.method == "ar":
        return None, None
    if args.method == "sssd":
        from jaxspec.drafting.datastore import load_datastore

        n = parse_draft_tokens(args.draft_tokens)
        ds = None
        if args.datastore is not None:
            vocab = model.tokenizer.vocab_size if model.tokenizer is not None else None
            ds, _ = load_datastore(args.datastore, expected_vocab=vocab)

        auto = None
        if n == "adaptive":  # the verify width per step, costed by the device timing table
            from jaxspec.cli import device_table_path
            from jaxspec.drafting.sssd_auto import AdaptiveSssdSpecs

            auto = AdaptiveSssdSpecs.load(
                device_table_path(args, model), model.cfg, "point_mass", objective="sum"
            )  # rows are replaced as they finish
        elif n is None:
            from jaxspec.cli import sssd_auto_tables
            from jaxspec.drafting.sssd_auto import AutoSssdSpecs

            args.temperature = args.profile_temperature  # the tau profile's temperature
            tables = sssd_auto_tables(args, model, ds is not None)
            auto = tables and AutoSssdSpecs(model.cfg, tables, "point_mass")

        def sssd(b: int):
            if auto is not None:
                return auto(b, context)
            ngram = sssd_ngram(n, b, args.dtype)
            if ngram is None:
                return None
            return SpecConfig(model.cfg, model.cfg, chain(0), "point_mass", ngram=ngram)

        return sssd, ds
    verifier = args.verifier or "swor"
    dcfg, dparams, dname = build_draft(args, model)
    if args.method == "chain":
        spec = SpecConfig(model.cfg, dcfg, chain(args.gamma), verifier)
        return (lambda b: spec), dparams
    name = args.tree or "kary_2x3"
    if name == "auto":
        from jaxspec.cli import auto_spec

        args.temperature = args.profile_temperature  # the acceptance profile's temperature
        chooser = auto_spec(args, model, dcfg, dname, verifier)
        return (lambda b: chooser(b, context)), dparams
    if args.gamma < 1:
        raise InputError(f"--gamma must be >= 1, got {args.gamma}")
    spec = SpecConfig(model.cfg, dcfg, load_tree(name), verifier)
    return (lambda b: spec), dparams


def build_engine(args, model):
    from jaxspec.errors import InputError
    from jaxspec.serving.engine import Engine, EngineConfig

    if args.expected_tau <= 0:
        raise InputError(f"--expected-tau must be > 0, got {args.expected_tau}")
    config = EngineConfig(max_batch=args.max_batch, max_context=args.max_context,
                          max_queue=args.max_queue, admit_per_step=args.admit_per_step,
                          prefill_budget=args.prefill_budget,
                          gate=not args.no_gate, expected_tau=args.expected_tau)  # fmt: skip
    config.validate(model.cfg)
    spec_for, draft = spec_for_args(args, model, config.max_context)
    return Engine(model.params, model.cfg, config, spec_for=spec_for, draft=draft)


def warmup(engine, progress: bool = True) -> float:
    """Compile every prompt bucket's prefill and every batch bucket's step (seconds taken)."""
    from tqdm import tqdm

    from jaxspec.runner import prompt_bucket
    from jaxspec.serving.engine import Request
    from jaxspec.serving.metrics import EngineMetrics

    t0 = time.perf_counter()
    C = engine.config.max_context
    lengths, n = [], 16
    while n < C:  # the prompt buckets a request can land in (leaving room for one token)
        lengths.append(min(n, C - 1))
        n = prompt_bucket(n + 1)
    tok = 4 % engine.cfg.vocab_size
    for n in tqdm(list(dict.fromkeys(lengths)), desc="warm-up: prefill buckets",
                  disable=not progress, file=sys.stderr):  # fmt: skip
        engine.submit(Request([tok] * n, 1))
        engine.run_until_idle()
    engine.compile_steps()
    compile_s = engine.metrics.compile_s
    engine.metrics = EngineMetrics()  # warm-up requests are not served traffic
    engine.metrics.max_slots, engine.metrics.compile_s = engine.config.max_batch, compile_s
    return time.perf_counter() - t0


def cmd_serve(args) -> int:
    from jaxspec.errors import InputError
    from jaxspec.models import load_model

    try:
        from jaxspec.serving.server import serve
    except ImportError as e:
        raise InputError(f"jaxspec serve needs the serve extra: pip install 'jaxspec[serve]' "
                         f"({e})") from None  # fmt: skip
    model = load_model(args.model, args.dtype, attention=args.attention)
    engine = build_engine(args, model)
    if not args.no_warmup:
        s = warmup(engine)
        print(f"[warm-up: {s:.1f} s, {engine.metrics.compile_s:.1f} s compiling]", file=sys.stderr)
    for b, s in engine.specs.items():
        gain = engine.predicted_speedup(b)
        ar, sp = engine.step_s.get((b, True)), engine.step_s.get((b, False))
        times = "" if ar is None else f", AR step {1000 * ar:.1f} ms"
        times += "" if sp is None else f", speculative step {1000 * sp:.1f} ms"
        pred = "" if gain is None else f", predicted {gain:.2f}× at tau {engine.tau_est[b]:.2f}"
        print(f"[batch bucket {b}: {s.num_speculated if s else 0} draft tokens{times}{pred}]",
              file=sys.stderr)  # fmt: skip
    print(f"[jaxspec serve: {model.name}, method {args.method}, http://{args.host}:{args.port}]",
          file=sys.stderr)  # fmt: skip
    serve(engine, model.tokenizer, model.name, args.host, args.port, args.log_level)
    return 0
