"""Sequoia's DP (ALGORITHMS.md §4(b)): optimal against brute-force enumeration of every ordered
tree up to 9 nodes, its reconstruction has the value it claims, the value is the expected tokens
per step (Monte-Carlo), and the worked example of the spec is reproduced."""

import functools

import numpy as np
import pytest

from jaxspec.errors import ConfigError
from jaxspec.trees import chain
from jaxspec.trees.sequoia import SequoiaDP, best_tree, tree_value


@functools.cache
def ordered_trees(m: int, levels: int, width: int) -> tuple:
    """Every ordered tree of exactly m nodes and at most `levels` levels, fan-out <= width, as
    nested tuples of child subtrees."""
    if m == 1:
        return ((),)
    if levels < 2:
        return ()
    return tuple(f for f in forests(m - 1, levels - 1, width) if len(f) <= width)


@functools.cache
def forests(m: int, levels: int, width: int) -> tuple:
    if m == 0:
        return ((),)
    out = []
    for first in range(1, m + 1):
        for t in ordered_trees(first, levels, width):
            for rest in forests(m - first, levels, width):
                out.append((t, *rest))
    return tuple(out)


def nested_value(children, p) -> float:
    return 1.0 + sum(p[k] * nested_value(c, p) for k, c in enumerate(children) if k < len(p))


VECTORS = [
    (0.6, 0.15, 0.07, 0.03),
    (0.634, 0.108, 0.057, 0.022),
    (0.3, 0.3, 0.2),  # ties
    (0.1, 0.5, 0.3),  # not decreasing: the DP is exact for any vector
    (0.9,),
]


@pytest.mark.parametrize("p", VECTORS)
@pytest.mark.parametrize("width", [None, 2])
def test_dp_equals_brute_force(p, width):
    w = width or len(p)
    dp = SequoiaDP(p, 9, 5, w)
    for n in range(1, 10):
        for d in range(1, 6):
            trees = ordered_trees(n, d, w)
            if not trees:
                assert dp.value(n, d) == -np.inf
                continue
            brute = max(nested_value(t, p) for t in trees)
            assert dp.value(n, d) == pytest.approx(brute, abs=1e-12), (n, d)
            tree = dp.tree(n, d)
            assert tree.num_nodes == n and tree.max_depth <= d - 1
            assert (tree.num_children <= w).all()
            assert tree_value(tree, p) == pytest.approx(brute, abs=1e-12)


def test_spec_worked_example():
    dp = SequoiaDP((0.6, 0.15, 0.07, 0.03), 9, 5, 4)
    got = [round(dp.value(n, 5), 2) for n in range(1, 10)]
    assert got == [1, 1.6, 1.96, 2.18, 2.33, 2.46, 2.55, 2.64, 2.71]


def test_chain_value_and_depth_one():
    p = (0.7, 0.1)
    assert tree_value(chain(3), p) == pytest.approx(1 + 0.7 + 0.49 + 0.343)
    dp = SequoiaDP(p, 6, 2, 3)
    assert dp.value(3, 2) == pytest.approx(1.8)  # root + 2 children, one level
    assert dp.value(4, 2) == pytest.approx(1.8)  # a third child (p = 0) adds nothing


@pytest.mark.parametrize("p", VECTORS[:2])
def test_value_is_expected_tokens_per_step(p):
    """Simulate the walk: at each node accept child k with probability p_k (exclusive), else
    stop; tokens = accepted + 1 bonus. The mean matches G within 5 standard errors."""
    tree = best_tree(p, 16, 6)
    rng = np.random.default_rng(0)
    n = 200_000
    probs = np.append(np.asarray(p), 1 - sum(p))
    tokens = np.ones(n)
    cur = np.zeros(n, int)
    alive = np.ones(n, bool)
    for _ in range(tree.max_depth):
        k = rng.choice(len(probs), size=n, p=probs)  # the accepted rank (len(p): none)
        kids = tree.children[cur]  # [n, W] (-1 padded)
        ok = alive & (k < kids.shape[1])
        child = np.where(ok, kids[np.arange(n), np.minimum(k, kids.shape[1] - 1)], -1)
        took = ok & (child >= 0)
        tokens += took
        cur = np.where(took, child, cur)
        alive = took
    g = tree_value(tree, p)
    assert abs(tokens.mean() - g) < 5 * tokens.std() / np.sqrt(n), (tokens.mean(), g)


def test_bad_inputs():
    with pytest.raises(ConfigError, match="sum"):
        SequoiaDP((0.8, 0.5), 4, 3, 2)
    with pytest.raises(ConfigError, match="outside"):
        SequoiaDP((0.5,), 4, 3, 1).tree(5, 3)


# ----------------------------------------------------------------------------- SpecHub's DP

from jaxspec.trees.sequoia import HubDP, hub_tree_value  # noqa: E402


def hub_nested_value(children, s, h1, h2) -> float:
    rates = (s,) if len(children) == 1 else (h1, h2)
    return 1.0 + sum(
        r * hub_nested_value(c, s, h1, h2) for r, c in zip(rates, children, strict=False)
    )


@pytest.mark.parametrize("s,h1,h2", [(0.55, 0.5, 0.17), (0.3, 0.25, 0.2), (0.9, 0.6, 0.3),
                                     (0.5, 0.5, 0.0)])  # fmt: skip
def test_hub_dp_equals_brute_force(s, h1, h2):
    """Every ordered binary tree up to 9 nodes, valued with the lone-child rate s and the pair
    rates (h1, h2): the DP finds the best, and its tree has that value."""
    dp = HubDP(s, h1, h2, 9, 5)
    for n in range(1, 10):
        for d in range(1, 6):
            trees = ordered_trees(n, d, 2)
            if not trees:
                assert dp.value(n, d) == -np.inf
                continue
            brute = max(hub_nested_value(t, s, h1, h2) for t in trees)
            assert dp.value(n, d) == pytest.approx(brute, abs=1e-12), (n, d)
            tree = dp.tree(n, d)
            assert tree.num_nodes == n and tree.max_depth <= d - 1
            assert hub_tree_value(tree, s, h1, h2) == pytest.approx(brute, abs=1e-12)


def test_hub_dp_is_the_plain_dp_when_siblings_do_not_matter():
    """With h1 = s the pair's first child accepts as a lone child does: the plain fan-out-2 DP."""
    plain, hub = SequoiaDP((0.55, 0.17), 12, 6, 2), HubDP(0.55, 0.55, 0.17, 12, 6)
    assert np.allclose(plain.values()[1:, 1:], hub._solved[0][1:, 1:])


def test_hub_dp_values_a_lone_child_by_s():
    """ALGORITHMS.md §3(b): the plain DP undervalues one-child nodes under SpecHub. With a lone
    child rate well above the pair's first, the 4-node optimum is a chain, not a pair."""
    dp = HubDP(0.8, 0.5, 0.2, 4, 4)
    assert dp.tree(4, 4).max_width == 1
    assert dp.value(4, 4) == pytest.approx(1 + 0.8 + 0.64 + 0.512)
    with pytest.raises(ConfigError, match="h1 \\+ h2"):
        HubDP(0.5, 0.7, 0.4, 4, 4)
    with pytest.raises(ConfigError, match="fan-out"):
        hub_tree_value(SequoiaDP((0.5, 0.2, 0.1), 5, 3, 3).tree(4, 2), 0.5, 0.4, 0.2)


# ----------------------------------------------------------------------------- the optimiser

from jaxspec.trees.sequoia import choose_tree, topology_table  # noqa: E402

P = (0.6, 0.15, 0.07, 0.03)


def test_optimiser_matches_exhaustive_search():
    """The repo's sample config (ALGORITHMS.md §4(b)): draft 0.3, target 10..18 for n = 1..32."""
    tokens = [1, 2, 4, 8, 16, 32]
    tt = [10, 10, 10, 12, 14, 18]
    td = [0.3] * 6
    dp = SequoiaDP(P, 32, 8, 4)
    got = choose_tree(dp, tokens, tt, td)
    best = max((dp.value(n, d) * 10 / (d * 0.3 + t), n, d)
               for n, t in zip(tokens, tt, strict=True) for d in range(2, 9) if n > 1)  # fmt: skip
    assert got.speedup == pytest.approx(best[0]) and (got.nodes, got.depth) == best[1:]
    assert got.tree.num_nodes == got.nodes and got.tree.max_depth <= got.depth - 1
    assert got.expected_tokens == pytest.approx(tree_value(got.tree, P))


def test_optimiser_falls_back_to_ar_when_nothing_pays():
    dp = SequoiaDP(P, 8, 4, 4)
    got = choose_tree(dp, [1, 2, 4, 8], [10, 20, 40, 80], [10, 10, 10, 10])  # verify not free
    assert got.tree is None and got.nodes == 1 and got.speedup == 1.0


def test_topology_table_per_bucket():
    device = {"batches": [1, 8], "contexts": [256], "tokens": [1, 4, 16],
              "target_s": [[[0.01, 0.011, 0.02]], [[0.02, 0.06, 0.2]]],
              "draft_s": [[[0.001, 0.001, 0.002]], [[0.002, 0.004, 0.02]]]}  # fmt: skip
    table = topology_table(P, device, max_depth=6)
    assert [(b, c) for b, c, _ in table] == [(1, 256), (8, 256)]
    dp = SequoiaDP(P, 16, 6, 4)
    for bi, (_, _, choice) in enumerate(table):
        tt, td = device["target_s"][bi][0], device["draft_s"][bi][0]
        best = max(dp.value(n, d) * tt[0] / (d * td[i] + tt[i])
                   for i, n in enumerate([1, 4, 16]) if n > 1 for d in range(2, 7))  # fmt: skip
        assert choice.speedup == pytest.approx(max(best, 1.0))
    small, big = table[0][2], table[1][2]
    assert small.nodes == 4 and big.tree is None  # verification is expensive at batch 8
    with pytest.raises(ConfigError, match="draft"):
        topology_table(P, {k: v for k, v in device.items() if k != "draft_s"})
    with pytest.raises(ConfigError, match="n = 1"):
        choose_tree(SequoiaDP(P, 4, 3, 4), [2, 4], [1, 1], [0, 0])


# ----------------------------------------------------------------------------- --tree auto


def test_auto_tree_bucket_lookup():
    from jaxspec.trees.sequoia import AutoTree

    t4, t8 = chain(3), chain(7)
    auto = AutoTree(((1, 256, t4), (1, 1024, t8), (8, 256, None), (8, 1024, t4)))
    assert auto.tree_for(1, 100) == t4 and auto.tree_for(1, 300) == t8
    assert auto.tree_for(1, 5000) == t8  # past the largest context: the largest
    assert auto.tree_for(2, 100) is None and auto.tree_for(64, 1000) == t4


# slow (43 s): per-bucket specs are also run by test_sssd_auto and test_profiling's tree auto
@pytest.mark.slow
def test_runner_with_a_per_bucket_spec_equals_ar():
    """A runner whose configuration depends on the bucket (tree at batch 1, AR at batch 2)."""
    import dataclasses

    import jax

    from jaxspec.model import init_params
    from jaxspec.runner import GenerateOptions, Runner
    from jaxspec.speculative import SpecConfig
    from jaxspec.testing import TINY

    cfg = dataclasses.replace(TINY, num_layers=2)
    params = init_params(cfg, jax.random.key(0), scale=0.5)
    prompts = [[5, 9, 11, 4], [7, 7, 30, 21, 2, 8], [12, 13]]
    want, _ = Runner(params, cfg).run(prompts, GenerateOptions(max_new_tokens=20, batch_size=2))
    seen = []

    def spec_for(batch, context):
        seen.append((batch, context))
        return SpecConfig(cfg, cfg, chain(2)) if batch == 1 else None

    runner = Runner(params, cfg, spec_for, params)
    taus = []
    for b in (1, 2):  # batch size 2: a batch of 2 (AR) and a last batch of 1 (tree)
        outs, m = runner.run(prompts, GenerateOptions(max_new_tokens=20, batch_size=b))
        assert outs == want
        taus.append(m.tau)
    assert {b for b, _ in seen} == {1, 2}
    assert taus[0] > taus[1] > 1.0  # the AR bucket's steps count with tau 1
