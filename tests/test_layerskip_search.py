"""Layer-skip search: candidates are valid layer subsets; ranking is by tau / modelled cost, and a
draft that equals the target (all layers) reaches tau = γ + 1 (every draft accepted)."""

import dataclasses

import jax
import numpy as np

from jaxspec.drafting import default_candidates, search_layer_skip
from jaxspec.model import init_params
from jaxspec.testing import TINY

CFG = dataclasses.replace(TINY, num_layers=4, eos_token_ids=())
PARAMS = init_params(CFG, jax.random.key(0), scale=0.5)


def test_default_candidates_are_proper_subsets():
    for L in (4, 12, 30):
        for c in default_candidates(L):
            assert 0 < len(c) < L and list(c) == sorted(set(c)) and 0 <= c[0] and c[-1] < L


def test_search_ranks_by_score_and_full_draft_accepts_everything():
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 64, n).tolist() for n in (5, 9)]
    ranked = search_layer_skip(PARAMS, CFG, prompts, candidates=[(0, 1), (0, 1, 2, 3), (0, 3)],
                               gamma=3, max_new_tokens=17)  # fmt: skip
    assert [c.score for c in ranked] == sorted((c.score for c in ranked), reverse=True)
    full = next(c for c in ranked if c.keep == (0, 1, 2, 3))
    assert full.acceptance_rate == 1.0 and full.tau == 4.0  # 16 decode tokens in 4 steps
    assert full.cost == 4 * 4 / 4 + 1


def test_default_skip_band():
    from jaxspec.drafting import default_skip_layers

    assert default_skip_layers(30) == tuple(range(15)) + tuple(range(20, 30))
    assert default_skip_layers(4) == (0, 1, 3)
