"""`jaxspec bench`: every method on the same prompts in one process, speedups against its AR run.

Methods (`--methods`, a comma list): `ar`, `chain` (γ = `--gamma`), `chain:G`, `tree` (`--tree`),
`tree:NAME|FILE`, `sssd` (n-gram drafts from each row's own prompt and output; N speculated
tokens = `--draft-tokens`), `sssd:N`, `sssd:adaptive` (the verify width chosen every step,
`--draft-tokens adaptive`), `sssd-ds`, `sssd-ds:N`, `sssd-ds:adaptive` (also from `--datastore`),
`magicdec` (self-speculation on a sparse draft cache, γ = `--gamma`), `magicdec:G`,
`magicdec:auto`. AR always runs, first: every `speedup_vs_ar` is relative to it.
`--long-context` runs MagicDec's batch × context sweep instead (`jaxspec.bench_long`).

Per method: one `Runner` (its compiled executables are reused across calls); a warm-up run on the
first batch of prompts (compiles that bucket); then each category's prompts as one timed
`Runner.run` call, in order of first appearance in the file (prompts keep their file order).
Compilation is never in the timings: `compile_s` = warm-up + buckets first met in timed runs.

Aggregation over categories (the per-category numbers are the runs' own `Metrics`):
tokens/s = Σ decode tokens ÷ Σ decode seconds (decode tokens = new tokens − one first token per
prompt); tau = Σ decode tokens ÷ Σ live target steps (live steps = decode tokens ÷ tau);
acceptance and per-depth acceptance: category values weighted by their live steps (exact for
acceptance, an approximation for the conditional per-depth figures); ttft = Σ prefill ÷ Σ batches.
speedup_vs_ar = tokens/s ÷ AR's tokens/s, overall and per category. Spec-Bench averages per-prompt
speeds of wall time with prefill; this is decode throughput (prefill is reported as ttft).

Lossless check: at temperature 0 every method's outputs are compared with AR's token for token
(`identical_to_ar` = "k/n"; None at T > 0, where outputs are samples).

Categories: a record's `category` (None if absent). MT-bench's 8 categories are grouped as
`mt_bench`, as Spec-Bench reports them, unless `--raw-categories`.
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

from jaxspec.errors import InputError
from jaxspec.metrics import Metrics

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
MT_BENCH = frozenset(
    ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
)
UNCATEGORIZED = "uncategorized"
METHOD_FORMS = (
    "ar, chain, chain:G, tree, tree:NAME, sssd, sssd:N|adaptive, sssd-ds, sssd-ds:N|adaptive, "
    "magicdec, magicdec:G, magicdec:auto"
)


# ---- inputs -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str  # the label in reports: ar, chain:G, tree:NAME
    method: str  # ar | chain | tree | sssd | magicdec
    gamma: int | str | None = None  # "auto": magicdec's chooser
    tree: str | None = None
    draft_tokens: int | str | None = None  # sssd: None = --draft-tokens; or "adaptive"
    datastore: bool = False  # sssd-ds: drafts from --datastore too


def parse_methods(text: str, gamma: int | str = 4, tree: str | None = None) -> list[MethodSpec]:
    """Parse `--methods`; AR is put first (added if missing). Trees are checked to exist."""
    from jaxspec.cli import DEFAULT_TREE
    from jaxspec.trees import load_tree

    tree = tree or DEFAULT_TREE
    out: list[MethodSpec] = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            raise InputError(f"--methods {text!r}: empty method name (expected {METHOD_FORMS})")
        kind, sep, arg = item.partition(":")
        if sep and not arg:
            raise InputError(f"--methods: {item!r} has nothing after ':'")
        if kind == "ar" and not sep:
            m = MethodSpec("ar", "ar")
        elif kind in ("chain", "magicdec"):
            g = gamma
            if sep and kind == "magicdec" and arg == "auto":
                g = "auto"
            elif sep:
                try:
                    g = int(arg)
                except ValueError:
                    raise InputError(
                        f"--methods: {item!r}: chain length must be an integer"
                    ) from None
            if g == "auto" and kind == "chain":
                raise InputError(f"--methods: {item!r}: --gamma auto is for magicdec only")
            if g != "auto" and g < 1:
                raise InputError(f"--methods: {item!r}: chain length (gamma) must be >= 1, got {g}")
            m = MethodSpec(f"{kind}:{g}", kind, gamma=g)
        elif kind == "tree":
            name = arg if sep else tree
            if name != "auto":  # auto: Sequoia's per-bucket choice from the profiles
                load_tree(name)  # unknown tree / bad file → a clear error before any model load
            m = MethodSpec(f"tree:{name}", "tree", tree=name)
        elif kind in ("sssd", "sssd-ds"):
            n = None
            if sep and arg == "adaptive":
                n = "adaptive"
            elif sep:
                try:
                    n = int(arg)
                except ValueError:
                    raise InputError(
                        f"--methods: {item!r}: draft tokens must be an integer"
                    ) from None
                if n < 1:
                    raise InputError(f"--methods: {item!r}: draft tokens must be >= 1, got {n}")
            m = MethodSpec(item, "sssd", draft_tokens=n, datastore=kind == "sssd-ds")
        else:
            raise InputError(f"--methods: unknown method {item!r} (expected {METHOD_FORMS})")
        if any(o.name == m.name for o in out):
            raise InputError(f"--methods: {m.name!r} is listed twice")
        out.append(m)
    ar = [m for m in out if m.method == "ar"] or [MethodSpec("ar", "ar")]
    return ar + [m for m in out if m.method != "ar"]


def select_prompts(records: list[tuple[str, dict]], limit: int | None = None,
                   per_category: int | None = None,
                   raw_categories: bool = False) -> list[tuple[str, str | None]]:  # fmt: skip
    """(text, category) in file order: up to `per_category` per category, then the first
    `limit`."""
    if limit is not None and limit <= 0:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if per_category is not None and per_category <= 0:
        raise InputError(f"--per-category must be >= 1, got {per_category}")
    out, seen = [], {}
    for text, rec in records:
        cat = rec.get("category")
        cat = None if cat is None else str(cat)
        if cat in MT_BENCH and not raw_categories:
            cat = "mt_bench"
        if per_category is not None:
            if seen.get(cat, 0) >= per_category:
                continue
            seen[cat] = seen.get(cat, 0) + 1
        out.append((text, cat))
    out = out[:limit] if limit is not None else out
    if not out:
        raise InputError("no prompts selected")
    for i, (t, _) in enumerate(out):
        if not t.strip():
            raise InputError(f"prompt {i} is empty")
    return out


def spec_namespace(args, m: MethodSpec) -> argparse.Namespace:
    """The namespace `cli.build_spec` reads, for one method."""
    return argparse.Namespace(
        method=m.method, gamma=m.gamma or args.gamma,
        tree=m.tree or (None if m.method == "magicdec" else args.tree),
        verifier=args.verifier, drafter=args.drafter, draft=args.draft,
        draft_budget=args.draft_budget, sink=args.sink, draft_builder=args.draft_builder,
        magicdec_profile=getattr(args, "magicdec_profile", None),
        draft_layers=args.draft_layers, temperature=args.temperature, dtype=args.dtype,
        json=False, batch_size=args.batch_size,
        acceptance_profile=getattr(args, "acceptance_profile", None),
        device_profile=getattr(args, "device_profile", None),
        draft_tokens=m.draft_tokens if m.draft_tokens is not None else args.draft_tokens,
        datastore=args.datastore if m.datastore else None,
        attention=getattr(args, "attention", "auto"),
    )  # fmt: skip


# ---- aggregation --------------------------------------------------------------------------------


def live_steps(m: Metrics) -> int:
    emitted = m.new_tokens - m.num_prompts
    return round(emitted / m.tau) if emitted > 0 and m.tau > 0 else 0


def aggregate(parts: list[Metrics], method: str, batch_size: int) -> Metrics:
    """One Metrics over several runs (see the module docstring for the rules)."""
    out = Metrics(method=method)
    for f in ("num_prompts", "new_tokens", "target_steps", "prefill_s", "decode_s", "draft_s",
              "verify_s", "other_s", "compile_s"):  # fmt: skip
        setattr(out, f, sum(getattr(p, f) for p in parts))
    emitted = out.new_tokens - out.num_prompts
    out.tokens_per_s = emitted / out.decode_s if out.decode_s > 0 else 0.0
    batches = sum(-(-p.num_prompts // batch_size) for p in parts)
    out.ttft_s = out.prefill_s / batches if batches else 0.0
    live = [live_steps(p) for p in parts]
    out.tau = emitted / sum(live) if sum(live) else 1.0

    def weighted(values: list, weights: list[int]):
        pairs = [(v, w) for v, w in zip(values, weights, strict=True) if v is not None and w]
        total = sum(w for _, w in pairs)
        return sum(v * w for v, w in pairs) / total if total else None

    out.acceptance_rate = weighted([p.acceptance_rate for p in parts], live)
    for f in ("per_depth_acceptance", "per_rank_acceptance"):
        lists = [(getattr(p, f), w) for p, w in zip(parts, live, strict=True) if getattr(p, f)]
        n = max((len(v) for v, _ in lists), default=0)
        setattr(out, f, [weighted([v[d] if d < len(v) else None for v, _ in lists],
                                  [w for _, w in lists]) or 0.0 for d in range(n)])  # fmt: skip
    return out


def speedup(m: Metrics, ar: Metrics) -> float | None:
    return m.tokens_per_s / ar.tokens_per_s if ar.tokens_per_s > 0 else None


# ---- the run ------------------------------------------------------------------------------------


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def log(msg: str):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def run_methods(model, methods: list[MethodSpec], ids: list[list[int]], cats: list[str | None],
                opts, args) -> dict:  # fmt: skip
    """{name: {"overall", "per_category", "identical_to_ar", "outputs"}} (Metrics objects)."""
    import gc

    import jax

    from jaxspec.cli import build_spec
    from jaxspec.runner import Runner

    groups: dict[str | None, list[int]] = {}
    for i, c in enumerate(cats):
        groups.setdefault(c, []).append(i)
    warm = [ids[i] for i in [i for g in groups.values() for i in g][: opts.batch_size]]
    results: dict[str, dict] = {}
    for m in methods:
        spec, draft_params = build_spec(spec_namespace(args, m), model)
        runner = Runner(model.params, model.cfg, spec, draft_params)
        if m.method == "sssd" and callable(spec):
            log(f"{m.name}: {spec.describe()}" + (", with datastore" if draft_params else ""))
        elif m.method == "sssd":
            ng = spec.ngram if spec is not None else None
            what = "the auto rule predicts no gain: autoregressive"
            if ng is not None:
                what = f"{ng.num_nodes} draft tokens, depth <= {ng.max_depth}"
                what += ", with datastore" if draft_params is not None else ""
            log(f"{m.name}: {what}")
        _, wm = runner.run(warm, opts)
        log(f"{m.name}: warm-up on {plural(len(warm), 'prompt')}, compile {wm.compile_s:.1f} s")
        outputs: list[list[int] | None] = [None] * len(ids)
        per_cat: dict[str | None, Metrics] = {}
        nodes: dict[int, int] = {}  # tree nodes per step (1 = AR) -> prompts run with it
        for c, idx in groups.items():
            outs, cm = runner.run([ids[i] for i in idx], opts)
            for row in runner.last_rows:
                nodes[row["tree_nodes"]] = nodes.get(row["tree_nodes"], 0) + 1
            cm.method = m.name
            for i, o in zip(idx, outs, strict=True):
                outputs[i] = o
            per_cat[c] = cm
            log(f"{m.name} · {c or UNCATEGORIZED}: {plural(len(idx), 'prompt')}, "
                f"{cm.new_tokens} tokens, {cm.tokens_per_s:.1f} tok/s, tau {cm.tau:.2f}"
                + (f", compile {cm.compile_s:.1f} s" if cm.compile_s else ""))  # fmt: skip
        overall = aggregate(list(per_cat.values()), m.name, opts.batch_size)
        overall.compile_s += wm.compile_s
        results[m.name] = dict(spec=m, overall=overall, per_category=per_cat, outputs=outputs,
                               nodes=dict(sorted(nodes.items())),
                               per_bucket=callable(spec))  # fmt: skip
        # free this method's compiled programs: a long run of many buckets otherwise exhausts
        # the JIT's memory maps ("LLVM compilation error: Cannot allocate memory")
        del runner
        jax.clear_caches()
        gc.collect()
    ar = results[methods[0].name]
    for r in results.values():
        r["overall"].speedup_vs_ar = speedup(r["overall"], ar["overall"])
        for c, cm in r["per_category"].items():
            cm.speedup_vs_ar = speedup(cm, ar["per_category"][c])
        same = sum(a == b for a, b in zip(r["outputs"], ar["outputs"], strict=True))
        r["identical"] = same
        r["identical_to_ar"] = f"{same}/{len(ids)}" if opts.temperature == 0 else None
    return results


# ---- reporting ----------------------------------------------------------------------------------


def machine_info() -> dict:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    dev = jax.devices()[0]
    return {"cpu": cpu, "cores": cores, "usable_cores": usable, "backend": jax.default_backend(),
            "device": getattr(dev, "device_kind", str(dev))}  # fmt: skip


def machine_line(mi: dict) -> str:
    s = f"{mi['cpu']}, {mi['cores']} logical cores ({mi['usable_cores']} usable)"
    return s + f"; JAX backend {mi['backend']} ({mi['device']})"


def _f(x, fmt: str = ".2f", none: str = "—", unit: str = "") -> str:
    return none if x is None else format(x, fmt) + unit


def method_table(results: dict) -> str:
    rows = ["| method | tau | acceptance | per-depth acceptance (1–4) | tok/s | speedup vs AR "
            "| compile s | identical to AR |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        m = r["overall"]
        depth = ", ".join(f"{a:.2f}" for a in m.per_depth_acceptance[:4]) or "—"
        same = r["identical_to_ar"] or "— (T>0)"
        rows.append(
            f"| {name} | {m.tau:.2f} | {_f(m.acceptance_rate)} | {depth} | {m.tokens_per_s:.1f} "
            f"| {_f(m.speedup_vs_ar, unit='×')} | {m.compile_s:.1f} | {same} |"
        )
    return "\n".join(rows) + "\n"


def category_table(results: dict) -> str:
    """Rows: categories then overall; columns: AR's tok/s, each method's speedup (tau)."""
    names = list(results)
    ar = results[names[0]]
    rows = [
        "| category | prompts | AR tok/s | " + " | ".join(f"{n}: speedup (tau)" for n in names[1:]),
        "|---|---|---|" + "---|" * (len(names) - 1),
    ]
    rows[0] = rows[0].rstrip(" |") + " |"
    picks = [(c or UNCATEGORIZED, lambda r, c=c: r["per_category"][c]) for c in ar["per_category"]]
    picks.append(("**overall**", lambda r: r["overall"]))
    for label, pick in picks:
        a = pick(ar)
        cells = [f"{_f(pick(results[n]).speedup_vs_ar, unit='×')} ({pick(results[n]).tau:.2f})"
                 for n in names[1:]]  # fmt: skip
        rows.append("| " + " | ".join([label, str(a.num_prompts), f"{a.tokens_per_s:.1f}", *cells])
                    + " |")  # fmt: skip
    return "\n".join(rows) + "\n"


def report_markdown(report: dict, results: dict) -> str:
    s = report["settings"]
    cats = ", ".join(f"{c} {n}" for c, n in s["categories"].items())
    lines = [
        "## Speculative decoding vs AR (`jaxspec bench`)",
        "",
        f"- Date (UTC): {report['date']}",
        f"- Machine: {machine_line(report['machine'])}",
        f"- JAX {report['jax_version']}, Python {platform.python_version()}",
        f"- Command: `{report['command']}`",
        f"- Workload: `{report['model']}` {s['dtype']}, {s['num_prompts']} prompts from "
        f"`{s['prompts_file']}` ({cats}; chat template {'on' if s['chat'] else 'off'}), "
        f"prompt lengths {s['prompt_tokens_min']}–{s['prompt_tokens_max']} tokens, up to "
        f"{s['max_new_tokens']} new tokens, batch {s['batch_size']}, temperature "
        f"{s['temperature']}, verifier {s['verifier']}, drafter {s['drafter']}"
        + (f" (layers {s['draft_layers']})" if s["drafter"] == "layerskip" else f" ({s['draft']})"),
        "- tok/s: decode tokens (after each prompt's first) ÷ decode seconds, summed over "
        "categories; compile time excluded (own column); tau: tokens per target step incl. bonus",
        "",
        method_table(results),
    ]
    mixed = {n: r["nodes"] for n, r in results.items() if r.get("per_bucket")}
    if mixed:  # per-bucket choices (--tree auto, sssd auto): which sizes ran, on how many prompts
        lines += ["Per-bucket choices (tokens per row and step, 1 = AR: prompts): " + "; ".join(
            f"{n}: " + ", ".join(f"{k}: {v}" for k, v in d.items()) for n, d in mixed.items()),
            ""]  # fmt: skip
    if any(c is not None for c in next(iter(results.values()))["per_category"]):
        lines += ["Per category: speedup vs AR (tau)", "", category_table(results)]
    return "\n".join(lines)


def write_section(path: Path, section: str, start: str = START, end: str = END):
    """Replace the text between the `start`/`end` markers in `path` (or append it; create the
    file with a `# jaxspec benchmarks` header). Shared by every benchmark script."""
    block = f"{start}\n{section.rstrip()}\n{end}\n"
    try:
        text = path.read_text() if path.is_file() else "# jaxspec benchmarks\n\n"
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    if start in text and end in text and text.index(start) < text.index(end):
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + (("\n" + tail) if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def metrics_dict(m: Metrics) -> dict:
    d = m.to_dict()
    d["live_steps"] = live_steps(m)
    return d


# ---- the command --------------------------------------------------------------------------------


def cmd_bench(args) -> int:
    import jax

    from jaxspec.cli import read_prompt_records
    from jaxspec.models import load_model
    from jaxspec.runner import GenerateOptions

    if args.long_context:
        from jaxspec.bench_long import cmd_bench_long

        return cmd_bench_long(args)
    # every check that needs no model comes first
    if args.prompts_file is None:
        raise InputError("bench needs --prompts-file (or --long-context)")
    from jaxspec.cli import check_gamma

    check_gamma(args.gamma)
    methods = parse_methods(args.methods, args.gamma, args.tree)
    if any(m.method == "magicdec" for m in methods):
        from jaxspec.cli import build_magicdec_config

        build_magicdec_config(args)
    prompts = select_prompts(read_prompt_records(args.prompts_file), args.limit,
                             args.per_category, args.raw_categories)  # fmt: skip
    opts = GenerateOptions(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
    )  # fmt: skip
    opts.validate()
    verifier = args.verifier or ("greedy" if args.temperature == 0 else "swor")
    if verifier == "greedy" and args.temperature > 0 and len(methods) > 1:
        raise InputError(
            "--verifier greedy needs --temperature 0 (use swor/rrs/spechub/point_mass)"
        )
    model_drafted = [m for m in methods if m.method in ("chain", "tree")]
    if args.drafter == "model" and not args.draft and model_drafted:
        raise InputError("--drafter model needs --draft NAME|DIR")
    if any(m.datastore for m in methods) and args.datastore is None:
        raise InputError("sssd-ds needs --datastore DIR (build one with `jaxspec datastore build`)")
    if any(m.method == "sssd" for m in methods):
        from jaxspec.cli import check_sssd_args

        check_sssd_args(args)
    for p in (args.json, args.out_md):
        if p is not None and p.is_dir():
            raise InputError(f"{p}: is a directory, expected a file path")

    from jaxspec.cli import build_prefill

    model = load_model(
        args.model,
        args.dtype,
        progress=True,
        attention=args.attention,
        prefill=build_prefill(args),
    )
    if model.tokenizer is None:
        raise InputError(f"{model.path}: no tokenizer.json, cannot encode text prompts")
    ids = [model.tokenizer.encode(t, chat=not args.no_chat) for t, _ in prompts]
    cats = [c for _, c in prompts]
    counts: dict[str, int] = {}
    for c in cats:
        counts[c or UNCATEGORIZED] = counts.get(c or UNCATEGORIZED, 0) + 1
    log(f"{len(ids)} prompts ({', '.join(f'{c} {n}' for c, n in counts.items())}), "
        f"methods {', '.join(m.name for m in methods)}")  # fmt: skip

    t0 = time.perf_counter()
    results = run_methods(model, methods, ids, cats, opts, args)
    log(f"done in {time.perf_counter() - t0:.0f} s")

    argv = getattr(args, "argv", None)
    report = {
        "model": model.name,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "jax_version": jax.__version__,
        "machine": machine_info(),
        "command": "jaxspec " + shlex.join(argv) if argv is not None else "jaxspec bench",
        "settings": {
            "prompts_file": str(args.prompts_file),
            "num_prompts": len(ids),
            "categories": counts,
            "limit": args.limit,
            "per_category": args.per_category,
            "raw_categories": args.raw_categories,
            "chat": not args.no_chat,
            "prompt_tokens_min": min(map(len, ids)),
            "prompt_tokens_max": max(map(len, ids)),
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "seed": args.seed,
            "dtype": args.dtype,
            "verifier": verifier,
            "drafter": args.drafter or "layerskip",
            "draft": args.draft,
            "draft_layers": args.draft_layers or "default (a band of L/6 layers skipped)",
            "gamma": args.gamma,
            "tree": args.tree or "kary_2x3",
            "datastore": None if args.datastore is None else str(args.datastore),
            "draft_tokens": args.draft_tokens,
        },
        "methods": {
            name: {
                "method": r["spec"].method,
                "gamma": r["spec"].gamma,
                "tree": r["spec"].tree,
                "draft_tokens": r["spec"].draft_tokens,
                "datastore": r["spec"].datastore,
                "overall": metrics_dict(r["overall"]),
                "per_category": {
                    (c or UNCATEGORIZED): metrics_dict(m) for c, m in r["per_category"].items()
                },
                "identical_to_ar": r["identical_to_ar"],
                "tree_nodes": {str(k): v for k, v in r["nodes"].items()},
            }
            for name, r in results.items()
        },
    }
    md = report_markdown(report, results)
    print(md)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        log(f"wrote {args.json}")
    if args.out_md is not None:
        write_section(args.out_md, md)
        log(f"wrote {args.out_md}")
    return 0
