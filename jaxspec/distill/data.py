"""Prompt corpus → teacher shards (see `jaxspec.distill.teacher`), resumable.

The corpus is a JSONL file of prompts written for this project (`configs/prompts/distill.jsonl`,
made by `scripts/make_distill_prompts.py`), never the evaluation prompts of `../shared/data/`.
Selection: a seeded shuffle of the file, its first `num_prompts`, chat template applied, then
sorted by token length so each shard pads to a tight prompt bucket; shards are generated in a
seeded random order, so a partial run is a representative sample.
Layout of `<work>/teacher/`: `config.json` (the teacher fields), `shard-XXXXX.npz`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from jaxspec.distill.config import TEACHER_FIELDS, DistillConfig, check_resume
from jaxspec.errors import InputError

_REPO = Path(__file__).resolve().parent.parent.parent


def resolve_prompts(path: str) -> Path:
    p = Path(path)
    if not p.is_file() and (_REPO / p).is_file():
        p = _REPO / p
    if not p.is_file():
        raise InputError(f"{path}: no such prompt corpus (make it with "
                         "scripts/make_distill_prompts.py)")  # fmt: skip
    return p


def select_prompts(cfg: DistillConfig, tokenizer) -> list[list[int]]:
    """Token ids of the selected prompts, sorted by length (see module docstring)."""
    from jaxspec.cli import read_prompts_file

    texts = read_prompts_file(resolve_prompts(cfg.prompts))
    random.Random(cfg.seed).shuffle(texts)
    ids = [tokenizer.encode(t) for t in texts[: cfg.num_prompts]]
    return sorted(ids, key=len)


def teacher_shards(model, cfg: DistillConfig, work: Path, progress: bool = True) -> list[Path]:
    """Generate (or finish generating) the teacher shards of `cfg` under `work/teacher`."""
    from jaxspec.distill.teacher import generate_shards

    tdir = Path(work) / "teacher"
    tdir.mkdir(parents=True, exist_ok=True)
    meta = tdir / "config.json"
    if meta.is_file():
        check_resume(meta, cfg, TEACHER_FIELDS)
    else:
        meta.write_text(json.dumps(cfg.to_dict(), indent=1))
    if model.tokenizer is None:
        raise InputError(f"{model.path}: no tokenizer.json: cannot encode the prompt corpus")
    ids = select_prompts(cfg, model.tokenizer)
    order = list(range(-(-len(ids) // cfg.gen_batch)))
    random.Random(cfg.seed + 1).shuffle(order)
    shards = [ids[s * cfg.gen_batch : (s + 1) * cfg.gen_batch] for s in order]
    flat = [p for s in shards for p in s]
    return generate_shards(model.params, model.cfg, flat, tdir, batch=cfg.gen_batch,
                           new_tokens=cfg.new_tokens, topk=cfg.topk,
                           temperatures=cfg.temperatures, seed=cfg.seed,
                           progress=progress)  # fmt: skip
