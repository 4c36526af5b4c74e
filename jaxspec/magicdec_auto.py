"""`--method magicdec --gamma auto`: γ and the draft budget per (batch, context) bucket.

Reads the MagicDec profile written by `jaxspec bench --long-context` (α[context][budget], greedy
self-speculation, and the measured target forward times target_s[batch][context][tokens]) and
asks `costmodel.choose_speculation` for each bucket the runner meets: the chain length γ and
budget K with the highest predicted speedup, or None (autoregressive decoding) where no
configuration is predicted to beat AR. Off the measured grid: the batch bucket is rounded up to
the next profiled batch (the largest one past the end), the context is clipped to the measured
range, and α is taken at the nearest profiled context. The profile is greedy; at T > 0 the same
α is used as an estimate. Self-speculation only (the table times the target as its own draft).

Profiles that also hold whole-step times (`step_s[batch][context][γ]` at `step_budget`, γ = 0
the AR step) and accepted-length histograms (`accept_hist[context][budget]`) are chosen from
those (`costmodel.StepTiming`): the step's overheads outside the forwards are then measured and
the tokens per step need no i.i.d. assumption. Older profiles fall back to forward times.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import tomllib
from pathlib import Path

from jaxspec.errors import ConfigError, InputError


def read_magicdec_profile(path: Path) -> dict:
    try:
        prof = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: no readable MagicDec profile for --gamma auto ({e}); make "
                          "one with `jaxspec bench --long-context`") from None  # fmt: skip
    for key in ("budgets", "alpha_contexts", "alpha", "batches", "contexts", "tokens", "target_s"):
        if key not in prof:
            raise ConfigError(f"{path}: no {key!r}: not a MagicDec profile")
    if len(prof["alpha"]) != len(prof["alpha_contexts"]) or any(
        len(row) != len(prof["budgets"]) for row in prof["alpha"]
    ):
        raise ConfigError(f"{path}: 'alpha' must be [len(alpha_contexts)][len(budgets)]")
    return prof


class AutoMagicDec:
    """bucket → (γ, budget) or None, from a MagicDec profile."""

    def __init__(self, prof: dict, source: str = "profile"):
        from jaxspec.costmodel import MeasuredTiming

        self.prof = prof
        table = {k: prof[k] for k in ("batches", "contexts", "tokens", "target_s")}
        self.timing = MeasuredTiming.from_table(table, source=source)
        self.gammas = tuple(range(1, max(prof["tokens"])))  # verify needs γ + 1 timed tokens
        self.steps = None
        if "step_s" in prof:
            from jaxspec.costmodel import StepTiming

            self.steps = StepTiming.from_table(prof, source=source)
            if self.steps.batches != self.timing.batches:
                raise ConfigError(f"{source}: step_batches {list(self.steps.batches)} differ "
                                  f"from batches {list(self.timing.batches)}")  # fmt: skip

    def choose(self, batch: int, context: int, tokens_per_row: int | None = None):
        """(γ, K) or None for a bucket; `tokens_per_row`: the tokens each row of a static batch
        decodes (`costmodel.batch_tokens_per_step`), None: the mean row's tokens per step."""
        from jaxspec.costmodel import choose_speculation

        p = self.prof
        batches = p["batches"]
        b = batches[min(bisect.bisect_left(batches, batch), len(batches) - 1)]
        measured = [c for c in p["contexts"] if c in p["alpha_contexts"]] or p["contexts"]
        ctx = min(max(context, min(measured)), max(measured))
        near = min(range(len(p["alpha_contexts"])),
                   key=lambda i: abs(p["alpha_contexts"][i] - context))  # fmt: skip
        alphas = dict(zip(p["budgets"], p["alpha"][near], strict=True))
        if self.steps is None:
            return choose_speculation(alphas, self.timing, b, ctx, gammas=self.gammas,
                                      tokens_per_row=tokens_per_row)  # fmt: skip
        hists = None
        if "accept_hist" in p:
            hists = dict(zip(p["budgets"], p["accept_hist"][near], strict=True))
        sctx = min(max(context, self.steps.contexts[0]), self.steps.contexts[-1])
        return choose_speculation(alphas, self.timing, b, sctx, gammas=self.gammas,
                                  steps=self.steps, hists=hists,
                                  tokens_per_row=tokens_per_row)  # fmt: skip


def auto_magicdec(args, model, md, dcfg, verifier: str):
    """The runner's per-bucket spec function for `--method magicdec --gamma auto`."""
    from jaxspec.bench_long import magicdec_profile_path
    from jaxspec.speculative import SpecConfig
    from jaxspec.trees import chain

    if not md.self_draft:
        raise InputError("--gamma auto is profiled for self-speculation: drop --drafter model")
    path = getattr(args, "magicdec_profile", None) or magicdec_profile_path(
        Path(str(model.name)).name
    )
    auto = AutoMagicDec(read_magicdec_profile(path), source=str(path))
    # the runner's batches are static: a batch steps until its slowest row is done (each row
    # decodes max_new_tokens - 1 tokens after the prefill's; rows ending earlier at EOS are not
    # modelled). Callers without a max_new_tokens get the mean row's tokens per step.
    new = getattr(args, "max_new_tokens", None)
    per_row = max(int(new) - 1, 1) if new is not None else None

    @functools.cache
    def spec_for(batch: int, context: int):
        pick = auto.choose(batch, context, per_row)
        if pick is None:
            return None
        mdk = dataclasses.replace(md, budget=pick.budget)
        return SpecConfig(model.cfg, dcfg, chain(pick.gamma), verifier, magicdec=mdk)

    return spec_for
