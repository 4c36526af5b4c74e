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
