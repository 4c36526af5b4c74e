"""Draft distillation: a small draft model trained on the target's own outputs.

Pipeline (`build_draft`, the `jaxspec train-draft` command, `scripts/train_draft.py`):
  1. teacher  the target generates continuations of a project-written prompt corpus
              (`configs/prompts/distill.jsonl`) with jaxspec's model and KV cache, recording its
              top-k next-token log-probs at every step (`teacher`, `data`);
  2. vocab    the draft's head scores the most frequent tokens of those continuations
              (`train.choose_vocab`; decoding with it stays lossless, see
              `jaxspec.drafting.vocab`);
  3. train    a few target layers at the target's width, trained with optax on KL(teacher ‖
              draft), orbax checkpoints, resumable (`train`);
  4. export   a normal jaxspec checkpoint + `draft_vocab.npy` (`pipeline`).
The recipe is one frozen `DistillConfig` (`config`).
"""

from jaxspec.distill.config import DistillConfig
from jaxspec.distill.pipeline import build_draft, default_out

__all__ = ["DistillConfig", "build_draft", "default_out"]
