"""`build_draft`: teacher data → draft vocabulary → training → a jaxspec draft checkpoint.

Directories (defaults under the model cache, `jaxspec.models.cache_root()`):
  <cache>/<model>/draft          the result: a normal jaxspec checkpoint (`jaxspec.json`,
                                 `params/`), `draft_vocab.npy` (the head's token ids) and
                                 `distill.json` (recipe, data size, times, final metrics);
                                 use it with `--drafter model --draft <that dir>` or by name
                                 `--draft <model>-draft`
  <cache>/<model>/draft.work     teacher shards, vocabulary, orbax training checkpoints, logs
Every stage resumes: existing shards are kept, training restarts from its latest checkpoint, and
an existing result is returned as is unless `overwrite`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxspec.distill.config import DistillConfig
from jaxspec.errors import CheckpointError


def default_out(model_name: str) -> Path:
    from jaxspec.models import cache_root

    return cache_root() / model_name / "draft"


def draft_vocab(data, cfg: DistillConfig, target_cfg, work: Path) -> np.ndarray:
    """The draft vocabulary, chosen once per work directory (`<work>/draft_vocab.npy`)."""
    from jaxspec.distill.train import choose_vocab
    from jaxspec.drafting.vocab import check_ids

    f = Path(work) / "draft_vocab.npy"
    if f.is_file():
        ids = check_ids(np.load(f), target_cfg.vocab_size, str(f))
        want = cfg.draft_vocab if 0 < cfg.draft_vocab < target_cfg.vocab_size else None
        if len(ids) != (want or target_cfg.vocab_size):
            raise CheckpointError(f"{f}: {len(ids)} tokens, but draft_vocab={cfg.draft_vocab}; "
                                  "use a fresh work directory")  # fmt: skip
        return ids
    ids = choose_vocab(data, cfg.draft_vocab, target_cfg)
    np.save(f, ids)
    return ids


def build_draft(model, cfg: DistillConfig, out: Path | None = None, work: Path | None = None,
                *, overwrite: bool = False, progress: bool = True) -> Path:  # fmt: skip
    """Build (or finish building) the distilled draft of `model` (a `LoadedModel`)."""
    from jaxspec.convert.checkpoint import is_checkpoint, save_params
    from jaxspec.distill.data import teacher_shards
    from jaxspec.distill.teacher import load_shards
    from jaxspec.distill.train import export_params, train
    from jaxspec.drafting.vocab import VOCAB_FILE
    from jaxspec.fsutil import move_into_place

    name = Path(str(model.name)).name
    out = Path(out) if out is not None else default_out(name)
    work = Path(work) if work is not None else out.with_name(out.name + ".work")
    if is_checkpoint(out) and not overwrite:
        return out
    t0 = time.perf_counter()
    shards = teacher_shards(model, cfg, work, progress=progress)
    t_gen = time.perf_counter() - t0
    data = load_shards(shards, max_len=cfg.max_len)
    ids = draft_vocab(data, cfg, model.cfg, work)
    res = train(model.params, model.cfg, data, ids, cfg, work, progress=progress)
    if res.steps < cfg.steps:
        raise CheckpointError(f"{work}: training stopped at step {res.steps} of {cfg.steps}")
    gen_tokens = data.num_target_tokens
    covered = np.isin(np.concatenate([data.tokens[i, data.prompt_len[i] : data.length[i]]
                                      for i in range(len(data.length))]), ids).mean()  # fmt: skip
    meta = {
        "target": name,
        "recipe": cfg.to_dict(),
        "teacher_sequences": int(len(data.length)),
        "teacher_tokens": int(gen_tokens),
        "draft_vocab": int(len(ids)),
        "vocab_coverage_of_teacher_tokens": float(covered),
        "teacher_seconds_this_call": round(t_gen, 1),
        "train_seconds_this_call": round(res.seconds, 1),
        "final": {"step": res.history[-1][0], "kl": res.history[-1][1],
                  "agree": res.history[-1][2]} if res.history else None,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        ckpt = save_params(tmp / "ckpt", res.dcfg, export_params(res))
        np.save(ckpt / VOCAB_FILE, ids)
        (ckpt / "distill.json").write_text(json.dumps(meta, indent=1))
        move_into_place(ckpt, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
