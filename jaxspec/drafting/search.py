"""Training-free layer-skip draft search: which target layers should the self-draft keep?

For each candidate set of kept layers, greedy chain speculation (γ tokens) runs on a few
prompts and measures tau (tokens per target step). Its cost per step, in target forward passes,
is modelled as (γ + 1) · kept / L for the draft (γ + 1 passes over the chain) plus 1 for the
verification; the score is tau ÷ cost — expected tokens per target-forward of work, so AR
scores 1.0 and a useful draft scores above 1. Candidates: prefixes of the network (the first k
layers), and the network with a contiguous band of layers removed (keeping the first and last
layers, which layer-skip methods find most important).
"""

from __future__ import annotations

import dataclasses

from jaxspec.config import ModelConfig
from jaxspec.drafting.model import layer_skip
from jaxspec.model.params import Params
from jaxspec.runner import GenerateOptions, Runner
from jaxspec.trees import chain


@dataclasses.dataclass(frozen=True)
class Candidate:
    keep: tuple[int, ...]
    tau: float
    acceptance_rate: float
    cost: float  # target-forward equivalents per step (model above)
    score: float  # tau / cost


def default_candidates(L: int) -> list[tuple[int, ...]]:
    """Prefixes of 1/2, 2/3 and 5/6 of the layers, and bands of L/3 and L/6 removed from the
    middle and from the upper half (first and last layer always kept)."""
    cands = {tuple(range(max(1, round(L * f)))) for f in (1 / 2, 2 / 3, 5 / 6)}
    for width in {max(1, L // 3), max(1, L // 6)}:
        for start in {L // 3, L // 2, L - 1 - width}:
            start = max(1, min(start, L - 1 - width))
            cands.add(tuple(i for i in range(L) if not start <= i < start + width))
    return sorted(c for c in cands if 0 < len(c) < L)


def search_layer_skip(
    params: Params,
    cfg: ModelConfig,
    prompts: list[list[int]],
    candidates: list[tuple[int, ...]] | None = None,
    gamma: int = 4,
    max_new_tokens: int = 32,
    progress=None,
) -> list[Candidate]:
    """Candidates ranked best first (greedy chain of `gamma`, acceptance measured on `prompts`)."""
    from jaxspec.speculative import SpecConfig

    results = []
    opts = GenerateOptions(max_new_tokens=max_new_tokens, batch_size=len(prompts))
    for keep in candidates or default_candidates(cfg.num_layers):
        dcfg, dparams = layer_skip(params, cfg, keep)
        spec = SpecConfig(cfg, dcfg, chain(gamma), "greedy")
        _, m = Runner(params, cfg, spec, dparams).run(prompts, opts)
        cost = (gamma + 1) * len(keep) / cfg.num_layers + 1.0
        results.append(Candidate(keep, m.tau, m.acceptance_rate or 0.0, cost, m.tau / cost))
        if progress:
            progress(results[-1])
    return sorted(results, key=lambda c: -c.score)
