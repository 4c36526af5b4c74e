"""The distillation recipe: one frozen dataclass, stored with every run and checked on resume.

Teacher fields (`prompts` … `gen_batch`) decide the generated data; changing one of them in a
work directory that already holds shards is an error (the data would no longer match). Draft
fields decide the architecture: `layers` are the target layers the draft starts from (kept at
the target's width), `draft_vocab` the number of tokens its head scores (the most frequent
tokens of the teacher's own continuations; 0 = the full vocabulary). Training fields are the
optax schedule; `steps` may grow on resume (continue training), nothing else may change.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxspec.errors import ConfigError

TEACHER_FIELDS = ("prompts", "num_prompts", "new_tokens", "topk", "temperatures", "gen_batch",
                  "seed")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    # teacher data
    prompts: str = "configs/prompts/distill.jsonl"  # JSONL of {"prompt": ...} (chat template)
    num_prompts: int = 1280  # first N of the seeded shuffle of the file
    new_tokens: int = 128  # continuation length per prompt (cut at EOS)
    topk: int = 16  # teacher log-probs stored per position
    temperatures: tuple[float, ...] = (0.0, 0.7)  # row r draws at temperatures[r % len]
    gen_batch: int = 32  # prompts per teacher shard
    # draft
    layers: tuple[int, ...] = (0, 10, 20, 29)  # target layers the draft is initialised from
    draft_vocab: int = 8192  # head tokens (0: the full vocabulary)
    # training
    steps: int = 360
    batch_size: int = 16  # sequences per step
    max_len: int = 384  # sequence length (prompt + continuation), longer ones are cut
    lr: float = 1e-3
    warmup: int = 30
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self):
        for name in ("num_prompts", "new_tokens", "topk", "gen_batch", "steps", "batch_size",
                     "max_len", "checkpoint_every"):  # fmt: skip
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"distill config: {name} must be >= 1, got {getattr(self, name)}")
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ConfigError(f"distill config: layers must be distinct and increasing, "
                              f"got {self.layers}")  # fmt: skip
        if self.draft_vocab < 0 or not self.temperatures or min(self.temperatures) < 0:
            raise ConfigError("distill config: draft_vocab must be >= 0 and temperatures >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> DistillConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ConfigError(f"{source}: unknown distill config keys {bad}")
        d = dict(d)
        for k in ("temperatures", "layers"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def check_resume(saved_path: Path, cfg: DistillConfig, fields: tuple[str, ...]) -> None:
    """Raise if the run stored at `saved_path` differs from `cfg` in any of `fields`."""
    try:
        saved = DistillConfig.from_dict(json.loads(Path(saved_path).read_text()), str(saved_path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{saved_path}: unreadable run config ({e})") from None
    diff = [f for f in fields if getattr(saved, f) != getattr(cfg, f)]
    if diff:
        pairs = ", ".join(f"{f}: {getattr(saved, f)!r} -> {getattr(cfg, f)!r}" for f in diff)
        raise ConfigError(f"{saved_path}: this work directory was made with other settings "
                          f"({pairs}); use a fresh --work-dir or the same settings")  # fmt: skip
