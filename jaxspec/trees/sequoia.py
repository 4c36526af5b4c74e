"""Sequoia's dynamic program: the token tree of at most n nodes and d levels that maximises the
expected tokens per step under a positional acceptance vector (ALGORITHMS.md §4(b)).

Conventions:
  * `p[k-1]` = P(the rank-k child is the one accepted), for k = 1..W (measured with one-level
    trees of width W; the "none" mass is 1 − Σ p). A node with b children accepts child k ≤ b
    with probability p_k, none otherwise, independently at every node.
  * Tree value G(T) = Σ_{v ∈ T} Π_{edges root→v} p_rank(edge) (the root counts 1) = the
    expected tokens emitted per step: accepted tokens plus the bonus.
  * Sizes count the root: a tree of m nodes speculates m − 1 tokens. Levels count the root too:
    depth bound d allows d − 1 speculated levels.
  * DP table `best[m, l, b]` = the best value of a tree of exactly m nodes, at most l levels,
    whose root has exactly b children (−inf if impossible):
      best[1, l, 0] = 1
      best[m, l, 1] = 1 + p_1 · max_b' best[m − 1, l − 1, b']
      best[m, l, b] = max_{1 ≤ y < m} best[y, l, b − 1] + p_b · max_b' best[m − y, l − 1, b']
    (the b-th child, acceptance p_b, roots a subtree of m − y nodes; the first b − 1 children
    share the other y nodes with the root). G*(m, l) = max_b best[m, l, b]. An optional fan-out
    cap limits b (e.g. 2 for SpecHub's binary trees). Ranks past the vector have p = 0, so every
    size fits (such nodes add nothing). O(M² · D · W).
  * Reconstruction lists children in rank order and numbers nodes level by level, so the result
    is a canonical `TreeSpec`.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jaxspec.errors import ConfigError
from jaxspec.trees.spec import TreeSpec

NEG = -np.inf


def tree_value(tree: TreeSpec, p) -> float:
    """G(T) for a positional acceptance vector p (ranks beyond len(p) accept with 0)."""
    p = np.asarray(p, np.float64)
    val = np.ones(tree.num_nodes)
    for i in range(1, tree.num_nodes):
        r = int(tree.rank[i])
        val[i] = val[tree.parents[i]] * (p[r] if r < len(p) else 0.0)
    return float(val.sum())


@dataclasses.dataclass(frozen=True)
class SequoiaDP:
    """The solved table for one acceptance vector (see the module docstring)."""

    p: tuple[float, ...]
    max_nodes: int
    max_depth: int
    max_width: int

    def __post_init__(self):
        if self.max_nodes < 1 or self.max_depth < 1 or self.max_width < 1:
            raise ConfigError(
                f"Sequoia DP needs max_nodes, max_depth, max_width >= 1, got "
                f"{self.max_nodes}, {self.max_depth}, {self.max_width}"
            )
        p = np.asarray(self.p, np.float64)
        if p.ndim != 1 or len(p) == 0 or np.any(p < 0) or p.sum() > 1 + 1e-6:
            raise ConfigError(
                f"acceptance vector must be non-negative with sum <= 1, got {list(self.p)}"
            )

    @functools.cached_property
    def _solved(self):
        M, D = self.max_nodes, self.max_depth
        W = min(self.max_width, M - 1)
        p = np.zeros(max(W, len(self.p)))  # ranks past the vector accept with probability 0
        p[: len(self.p)] = self.p
        best = np.full((M + 1, D + 1, W + 1), NEG)
        arg_y = np.zeros((M + 1, D + 1, W + 1), np.int64)  # b >= 2: nodes kept by children 1..b-1
        sub_b = np.zeros((M + 1, D + 1, W + 1), np.int64)  # root fan-out of the b-th child's tree
        best[1, 1:, 0] = 1.0
        top = np.full((M + 1, D + 1), NEG)  # max_b best[m, lv, b]
        top_b = np.zeros((M + 1, D + 1), np.int64)
        for lv in range(1, D + 1):
            top[1, lv] = 1.0
            for m in range(2, M + 1):
                if lv >= 2 and W >= 1 and top[m - 1, lv - 1] > NEG:
                    best[m, lv, 1] = 1.0 + p[0] * top[m - 1, lv - 1]
                    sub_b[m, lv, 1] = top_b[m - 1, lv - 1]
                for b in range(2, W + 1):
                    if lv < 2:
                        break
                    for y in range(1, m):
                        left, right = best[y, lv, b - 1], top[m - y, lv - 1]
                        if left == NEG or right == NEG:
                            continue
                        v = left + p[b - 1] * right
                        if v > best[m, lv, b] + 1e-15:
                            best[m, lv, b] = v
                            arg_y[m, lv, b] = y
                            sub_b[m, lv, b] = top_b[m - y, lv - 1]
                top_b[m, lv] = int(np.argmax(best[m, lv]))
                top[m, lv] = best[m, lv, top_b[m, lv]]
        return best, arg_y, sub_b, top, top_b

    def value(self, n: int, d: int) -> float:
        """G*(n, d): the best expected tokens per step with n nodes (root included), d levels."""
        self._check(n, d)
        return float(self._solved[3][n, d])

    def values(self) -> np.ndarray:
        """G*[m, l] for m = 0..max_nodes, l = 0..max_depth (−inf where impossible)."""
        return self._solved[3].copy()

    def tree(self, n: int, d: int) -> TreeSpec:
        """The optimal tree of n nodes and at most d levels."""
        self._check(n, d)
        best, arg_y, sub_b, top, top_b = self._solved

        def children(m: int, lv: int, b: int) -> list:
            """Subtrees (as nested child lists) of a tree (m, l) with root fan-out b."""
            if b == 0:
                return []
            if b == 1:
                return [children(m - 1, lv - 1, int(sub_b[m, lv, 1]))]
            y = int(arg_y[m, lv, b])
            return children(y, lv, b - 1) + [children(m - y, lv - 1, int(sub_b[m, lv, b]))]

        return _level_order(children(n, d, int(top_b[n, d])))

    def _check(self, n: int, d: int):
        _check_size(n, d, self.max_nodes, self.max_depth)


def best_tree(p, n: int, d: int, max_width: int | None = None) -> TreeSpec:
    """The DP-optimal tree of n nodes (root included) and at most d levels for acceptance p."""
    dp = SequoiaDP(tuple(float(x) for x in p), n, d, max_width or len(p))
    return dp.tree(n, d)


def hub_tree_value(tree: TreeSpec, s: float, h1: float, h2: float) -> float:
    """G(T) of a tree with fan-out <= 2 under SpecHub verification: a lone child is accepted with
    the single-draft rate s, the children of a 2-child node (a hub pair) with h1 and h2."""
    if tree.max_width > 2:
        raise ConfigError(f"SpecHub trees have fan-out <= 2, got {tree.max_width}")
    val = np.ones(tree.num_nodes)
    for i in range(1, tree.num_nodes):
        par = tree.parents[i]
        rate = s if tree.num_children[par] == 1 else (h1, h2)[int(tree.rank[i])]
        val[i] = val[par] * rate
    return float(val.sum())


@dataclasses.dataclass(frozen=True)
class HubDP:
    """Sequoia's DP for binary SpecHub trees (ALGORITHMS.md §3(b)). The plain DP assumes a
    child's acceptance does not depend on its siblings; under SpecHub a lone child is verified by
    the single-draft rule (rate s = SWOR's p_1) while a hub pair's children accept with (h1, h2):

        G(1, l) = 1
        G(m, l) = max(1 + s · G(m − 1, l − 1),
                      max_{1 ≤ y ≤ m − 2} 1 + h1 · G(y, l − 1) + h2 · G(m − 1 − y, l − 1))

    Sizes and levels count the root, as in `SequoiaDP`."""

    s: float
    h1: float
    h2: float
    max_nodes: int
    max_depth: int

    def __post_init__(self):
        if self.max_nodes < 1 or self.max_depth < 1:
            raise ConfigError(f"HubDP needs max_nodes, max_depth >= 1, got {self.max_nodes}, "
                              f"{self.max_depth}")  # fmt: skip
        rates = (self.s, self.h1, self.h2)
        if min(rates) < 0 or self.s > 1 + 1e-9 or self.h1 + self.h2 > 1 + 1e-6:
            raise ConfigError(f"acceptance rates must be >= 0 with s <= 1 and h1 + h2 <= 1, got "
                              f"s = {self.s}, h1 = {self.h1}, h2 = {self.h2}")  # fmt: skip

    @functools.cached_property
    def _solved(self):
        M, D = self.max_nodes, self.max_depth
        g = np.full((M + 1, D + 1), NEG)
        split = np.full((M + 1, D + 1), -1, np.int64)  # 0: a lone child; y >= 1: a pair (y, rest)
        g[1, 1:] = 1.0
        for lv in range(2, D + 1):
            for m in range(2, M + 1):
                if g[m - 1, lv - 1] > NEG:
                    g[m, lv], split[m, lv] = 1.0 + self.s * g[m - 1, lv - 1], 0
                for y in range(1, m - 1):
                    a, b = g[y, lv - 1], g[m - 1 - y, lv - 1]
                    if a == NEG or b == NEG:
                        continue
                    v = 1.0 + self.h1 * a + self.h2 * b
                    if v > g[m, lv] + 1e-15:
                        g[m, lv], split[m, lv] = v, y
        return g, split

    def value(self, n: int, d: int) -> float:
        """G*(n, d) under SpecHub verification."""
        _check_size(n, d, self.max_nodes, self.max_depth)
        return float(self._solved[0][n, d])

    def tree(self, n: int, d: int) -> TreeSpec:
        """The optimal binary tree of n nodes and at most d levels."""
        _check_size(n, d, self.max_nodes, self.max_depth)
        g, split = self._solved
        if g[n, d] == NEG:
            raise ConfigError(f"no tree of {n} nodes fits in {d} levels")

        def children(m: int, lv: int) -> list:
            if m == 1:
                return []
            y = int(split[m, lv])
            if y == 0:
                return [children(m - 1, lv - 1)]
            return [children(y, lv - 1), children(m - 1 - y, lv - 1)]

        return _level_order(children(n, d))


def _level_order(nested: list) -> TreeSpec:
    """A `TreeSpec` from nested child lists, nodes numbered breadth-first (canonical)."""
    parents, queue = [-1], [(0, nested)]
    while queue:
        nxt = []
        for node, kids in queue:
            for sub in kids:
                parents.append(node)
                nxt.append((len(parents) - 1, sub))
        queue = nxt
    return TreeSpec(tuple(parents))


def _check_size(n: int, d: int, max_nodes: int, max_depth: int):
    if not (1 <= n <= max_nodes and 1 <= d <= max_depth):
        raise ConfigError(f"tree size {n} / depth {d} outside the solved table "
                          f"(1..{max_nodes} nodes, 1..{max_depth} levels)")  # fmt: skip


# ---- the hardware-aware optimiser --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TreeChoice:
    """The tree chosen for one (batch, context) bucket (`tree` None: decode autoregressively)."""

    nodes: int  # in-flight tokens per row (root included); 1 = AR
    depth: int  # levels (root included)
    tree: TreeSpec | None
    expected_tokens: float  # G*(nodes, depth)
    step_s: float  # predicted seconds per step: depth · t_draft(nodes) + t_target(nodes)
    speedup: float  # predicted: G* · t_target(1) / step_s


def choose_tree(dp: SequoiaDP, tokens, t_target, t_draft, max_depth: int | None = None
                ) -> TreeChoice:  # fmt: skip
    """Sequoia's optimiser for one bucket: over the measured budgets n (`tokens`, with target and
    draft forward seconds `t_target[i]`, `t_draft[i]` at n = tokens[i]) and depths d, minimise
    (d · t_draft(n) + t_target(n)) / G*(n, d) — our step runs d draft passes over the whole tree
    (d − 1 levels + the pass that leaves KV for every node) and one target pass. AR (n = 1)
    costs t_target(1) per token; a tree is chosen only if its predicted speedup exceeds 1."""
    tokens = list(tokens)
    if 1 not in tokens:
        raise ConfigError("the timing table needs n = 1 (the autoregressive step) to compare with")
    t1 = t_target[tokens.index(1)]
    best = TreeChoice(1, 1, None, 1.0, t1, 1.0)
    D = min(max_depth or dp.max_depth, dp.max_depth)
    for i, n in enumerate(tokens):
        if n < 2 or n > dp.max_nodes:
            continue
        for d in range(2, D + 1):
            g = dp.value(n, d)
            if not np.isfinite(g):
                continue
            step = d * t_draft[i] + t_target[i]
            if g * t1 / step > best.speedup * (1 + 1e-9):
                best = TreeChoice(n, d, None, g, step, g * t1 / step)
    if best.nodes > 1:
        best = dataclasses.replace(best, tree=dp.tree(best.nodes, best.depth))
    return best


def topology_table(p, device: dict, max_depth: int = 8, max_width: int | None = None) -> list:
    """A `TreeChoice` per (batch, context) bucket of a device timing table (`jaxspec profile
    device`: batches, contexts, tokens, target_s[b][c][n], draft_s[b][c][n]) for acceptance p:
    [(batch, context, TreeChoice)]."""
    if "draft_s" not in device:
        raise ConfigError("the device timing table has no draft times (profile it with a draft)")
    tokens = list(device["tokens"])
    dp = SequoiaDP(tuple(float(x) for x in p), max(tokens), max_depth, max_width or len(p))
    out = []
    for bi, b in enumerate(device["batches"]):
        for ci, c in enumerate(device["contexts"]):
            choice = choose_tree(dp, tokens, device["target_s"][bi][ci], device["draft_s"][bi][ci])
            out.append((b, c, choice))
    return out


@dataclasses.dataclass(frozen=True)
class AutoTree:
    """`--tree auto`: the topology table as a lookup. A run's (batch, context) uses the table row
    of the smallest profiled batch >= it (else the largest) and likewise for the context."""

    table: tuple  # ((batch, context, TreeSpec | None), ...)

    @classmethod
    def from_choices(cls, choices) -> AutoTree:
        return cls(tuple((b, c, ch.tree) for b, c, ch in choices))

    def tree_for(self, batch: int, context: int) -> TreeSpec | None:
        def bucket(values, x):
            values = sorted(set(values))
            return next((v for v in values if v >= x), values[-1])

        b = bucket([r[0] for r in self.table], batch)
        c = bucket([r[1] for r in self.table if r[0] == b], context)
        return next(t for bb, cc, t in self.table if bb == b and cc == c)
