"""Batch inference over a JSONL file on every local device (any method), resumable.

    python scripts/batch_infer.py --input requests.jsonl --output results.jsonl \
        [--mesh DATA,MODEL] [--method ar|chain|tree|sssd|magicdec ...] [generate's options]

Input: one JSON object per line with "prompt" (or "turns") and optionally "id" (default: the
line number). Output: one JSON object per request, appended as each batch finishes:
{"id", "prompt", "text", "token_ids", "metrics": {"prompt_tokens", "new_tokens", "steps",
"accepted", "tau", "batch_size", "batch_decode_s"}}. Ids already in the output are skipped, so an
interrupted run continues where it stopped. The params are sharded over the mesh's `model` axis
and each batch's rows over `data` (`jaxspec.sharding`); the default mesh puts every local device
on `data`. On CPU, simulate devices with JAX_NUM_CPU_DEVICES=N. The method options are those of
`jaxspec generate`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxspec.errors import InputError, JaxspecError  # noqa: E402


def parse_args(argv):
    from jaxspec import cli
    from jaxspec.models import DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=Path, required=True, help="requests, JSONL")
    p.add_argument("--output", type=Path, required=True, help="results, JSONL (appended)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="registered name or checkpoint dir")
    p.add_argument("--method", default="ar", choices=cli.METHODS)
    p.add_argument("--mesh", metavar="DATA,MODEL", help="mesh shape (default: all devices on data)")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    cli._add_decoding_args(p, batch_size=8, gamma_help="chain length", tree_help="tree name")
    return p.parse_args(argv)


def read_requests(path: Path) -> list[tuple[str, str]]:
    """(id, prompt) per line; ids must be unique."""
    from jaxspec.cli import read_prompt_records

    out, seen = [], set()
    for n, (text, rec) in enumerate(read_prompt_records(path), start=1):
        rid = str(rec.get("id", n))
        if rid in seen:
            raise InputError(f"{path}: id {rid!r} appears twice")
        if not text.strip():
            raise InputError(f"{path}: request {rid!r} has an empty prompt")
        seen.add(rid)
        out.append((rid, text))
    return out


def done_ids(path: Path) -> set[str]:
    """Ids already written to the output (a torn last line from a crash is ignored)."""
    if not path.is_file():
        return set()
    ids = set()
    for line in path.read_text().splitlines():
        try:
            ids.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return ids


def make_mesh(spec: str | None):
    import jax

    from jaxspec import sharding

    if spec is None:
        return sharding.make_mesh(jax.device_count(), 1)
    try:
        data, model = (int(x) for x in spec.split(","))
    except ValueError:
        raise InputError(f"--mesh must be DATA,MODEL (two integers), got {spec!r}") from None
    return sharding.make_mesh(data, model)


def main(argv=None) -> int:
    from tqdm import tqdm

    from jaxspec.cli import build_prefill, build_spec, check_sssd_args
    from jaxspec.models import load_model
    from jaxspec.runner import GenerateOptions, Runner

    args = parse_args(argv)
    requests = read_requests(args.input)
    done = done_ids(args.output)
    todo = [(rid, t) for rid, t in requests if rid not in done]
    opts = GenerateOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           batch_size=args.batch_size)  # fmt: skip
    opts.validate()
    if args.method == "sssd":
        check_sssd_args(args)
    mesh = make_mesh(args.mesh)
    shape = dict(mesh.shape)
    print(f"{len(requests)} requests, {len(requests) - len(todo)} already done; mesh {shape}",
          file=sys.stderr)  # fmt: skip
    if not todo:
        return 0
    model = load_model(args.model, args.dtype, attention=args.attention,
                       prefill=build_prefill(args))  # fmt: skip
    if model.tokenizer is None:
        raise InputError(f"{model.path}: no tokenizer.json, cannot encode text prompts")
    spec, draft_params = build_spec(args, model)
    runner = Runner(model.params, model.cfg, spec, draft_params, mesh=mesh)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("a") as f, tqdm(total=len(todo), unit="req", file=sys.stderr) as bar:
        for start in range(0, len(todo), opts.batch_size):
            part = todo[start : start + opts.batch_size]
            ids = [model.tokenizer.encode(t, chat=not args.no_chat) for _, t in part]
            outs, _ = runner.run(ids, opts)
            for (rid, text), prompt_ids, out, row in zip(part, ids, outs, runner.last_rows,
                                                          strict=True):  # fmt: skip
                tau = (row["new_tokens"] - 1) / row["steps"] if row["steps"] else 0.0
                metrics = {"prompt_tokens": len(prompt_ids), **row, "tau": tau}
                f.write(json.dumps({"id": rid, "prompt": text, "text": model.tokenizer.decode(out),
                                    "token_ids": out, "metrics": metrics},
                                   ensure_ascii=False) + "\n")  # fmt: skip
            f.flush()  # a finished batch survives an interruption of the next
            bar.update(len(part))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except JaxspecError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
