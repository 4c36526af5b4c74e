"""`jaxspec train-draft`: build the distilled draft of a target (see `jaxspec.distill`).

    jaxspec train-draft [--model NAME|DIR] [--out DIR] [--work-dir DIR] [--overwrite]
                        [--<field> VALUE ...]     # any DistillConfig field, e.g. --steps 2000

Without --out the draft goes to `<cache>/<model>/draft` (the `<model>-draft` name of
`--draft`); an existing draft is kept (a no-op) unless --overwrite. Interrupted runs resume:
run the same command again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxspec.distill.config import DistillConfig
from jaxspec.errors import InputError


def _tuple_of(kind):
    def parse(text: str):
        try:
            return tuple(kind(x) for x in str(text).split(",") if x.strip())
        except ValueError:
            raise InputError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    return parse


def add_parser(sub, add_common) -> None:
    from jaxspec.models import DEFAULT_MODEL

    t = sub.add_parser("train-draft", help="distil a small draft model from the target")
    t.add_argument("--model", default=DEFAULT_MODEL, help="registered name or checkpoint dir")
    t.add_argument("--out", type=Path, help="default: <cache>/<model>/draft")
    t.add_argument("--work-dir", type=Path, help="default: <out>.work")
    t.add_argument("--overwrite", action="store_true", help="rebuild an existing draft")
    defaults = DistillConfig()
    for f in dataclasses.fields(DistillConfig):
        val = getattr(defaults, f.name)
        kind = _tuple_of(type(val[0])) if isinstance(val, tuple) else type(val)
        shown = ",".join(map(str, val)) if isinstance(val, tuple) else val
        t.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=val,
                       help=f"(default: {shown})")  # fmt: skip
    add_common(t)


def run(args) -> int:
    from jaxspec.distill.pipeline import build_draft
    from jaxspec.models import load_model

    cfg = DistillConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig)}
    )
    model = load_model(args.model, "float32", progress=True)
    if max(cfg.layers) >= model.cfg.num_layers:
        raise InputError(f"--layers {cfg.layers}: the target has {model.cfg.num_layers} layers")
    out = build_draft(model, cfg, args.out, args.work_dir, overwrite=args.overwrite)
    meta = out / "distill.json"
    summary = json.loads(meta.read_text()) if meta.is_file() else {}
    print(f"draft: {out}")
    for k in ("teacher_tokens", "draft_vocab", "vocab_coverage_of_teacher_tokens", "final"):
        if k in summary:
            print(f"  {k}: {summary[k]}")
    return 0
