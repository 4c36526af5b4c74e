"""Lossless node rules: the exact output distribution of one tree node's verification.

A node has C drafted children `children: i32[B, C]` in rank order (-1 = invalid: not drawn, a
padding slot, or a removed duplicate). Every rule is a pure, jit-able function vectorised over the
batch that does NOT sample. It returns the exact law of its own accept/reject loop:

  NodeResult.accept[b, j]  = P(child j is the accepted child)       (0 for invalid children)
  NodeResult.residual[b]   = law of the bonus token given no child is accepted (normalised)

For the sequential rules this is accept[j] = a_j * prod_{i<j} (1 - a_i). `sample_node` draws
(child or none, bonus) from a NodeResult with one uniform plus one categorical, which is equal in
distribution to running the sequential loop; exact enumeration in tests needs no sampling at all,
and `accept` is the per-rank acceptance of the node.

Conventions
  Shapes: B batch rows, V vocabulary, C children of the node (K is taken by KV heads in
  `jaxspec.types`). `p: f32[B, V]` is the target's processed distribution
  (`jaxspec.sampling.probs`); `draft_logits: f32[B, V]` are the draft's logits after its own
  temperature / top-k / top-p (-inf for removed tokens); q = softmax(draft_logits).
  Everything is float32. Restricted proposals are renormalised from MASKED LOGITS
  (softmax with the removed tokens at -inf), never by dividing by 1 - sum(q removed): in float32
  that difference is exactly 0 for a confident draft. A residual that sums to 0 falls back to the
  current p_j (never the original p, which could re-emit a rejected sibling).
  Accept ratios min(1, p/q) take the q -> 0 limit where q underflowed: 1 if p > 0, else 0.

Rules (ALGORITHMS.md §0.3, §3(b), §4(b), §6.3; DESIGN.md §4)
  greedy      accept the first child equal to argmax p               (T = 0, any drafter)
  rrs         sequential rule, q_j = q, children i.i.d. from q       (SpecInfer)
  swor        sequential rule, q_j = q without x_1..x_{j-1}           (Sequoia)
  spechub     hub coupling for 2-child nodes drawn by `draw_spechub`  (SpecHub)
  point_mass  sequential rule, q_j = delta(x_j)                       (n-grams, top-k at T > 0)
  select_rule SpecHub where the draft is confident (q(argmax) >= 0.3), else SWOR; the flag is a
              function of q only, so the choice is lossless, but drafting and verification must
              use the SAME flag (`hub_flag`, or the flag the drafter stored).
Each rule must be paired with the proposal sampler it was derived for (`jaxspec.verify.proposals`);
verifying children with another rule's q_j is biased (see the negative controls in the tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.errors import InputError
from jaxspec.types import Array, Bool, Float, Int, PRNGKeyArray

HUB_THRESHOLD = 0.3  # SpecHub vs SWOR switch on q(argmax) (ALGORITHMS.md §3(b), "~0.3")

_f32 = jnp.float32


@struct.dataclass
class NodeResult:
    """Exact output law of one node rule (see the module docstring)."""

    accept: Float[Array, "B C"]  # P(child j is the accepted one)
    residual: Float[Array, "B V"]  # bonus law given that no child is accepted

    def none(self) -> Float[Array, " B"]:
        """P(no child is accepted)."""
        return jnp.maximum(1.0 - self.accept.sum(-1), 0.0)


# ----------------------------------------------------------------------------- helpers


def softmax(logits: Float[Array, "B V"]) -> Float[Array, "B V"]:
    """float32 softmax that returns all zeros (not NaN) for a row that is entirely -inf."""
    z = logits.astype(_f32)
    m = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.exp(z - jnp.where(jnp.isfinite(m), m, 0.0))  # exp(-inf) = 0
    s = e.sum(-1, keepdims=True)
    return jnp.where(s > 0, e / jnp.where(s > 0, s, 1.0), 0.0)


def _take(x: Float[Array, "B V"], idx: Int[Array, " B"]) -> Float[Array, " B"]:
    return jnp.take_along_axis(x, idx[:, None], axis=-1)[:, 0]


def _ratio(num: Float[Array, " B"], den: Float[Array, " B"]) -> Float[Array, " B"]:
    """min(1, num / den) with the den -> 0 limit (1 where num > 0, else 0)."""
    safe = jnp.where(den > 0, den, 1.0)
    return jnp.where(den > 0, jnp.minimum(1.0, num / safe), (num > 0).astype(_f32))


def _normalize_or(r: Float[Array, "B V"], fallback: Float[Array, "B V"]) -> Float[Array, "B V"]:
    """r / sum(r), or `fallback` on rows where r sums to 0."""
    s = r.sum(-1, keepdims=True)
    return jnp.where(s > 0, r / jnp.where(s > 0, s, 1.0), fallback)


def _residual(p_j: Float[Array, "B V"], q_j: Float[Array, "B V"]) -> Float[Array, "B V"]:
    """p_{j+1} = normalize(max(p_j - q_j, 0)); zero residual -> the current p_j."""
    return _normalize_or(jnp.maximum(p_j - q_j, 0.0), p_j)


# ----------------------------------------------------------------------------- sequential family

# A proposal maps (state, x_j, valid_j) -> (q_j, next state): q_j: f32[B, V] is the exact law child
# j was drawn from given the children before it; the state carries what q_{j+1} needs.
Proposal = Callable[[Any, Int[Array, " B"], Bool[Array, " B"]], tuple[Float[Array, "B V"], Any]]


def sequential(
    p: Float[Array, "B V"], children: Int[Array, "B C"], proposal: Proposal, state: Any
) -> NodeResult:
    """ALGORITHMS.md §0.3 for any exact proposal sequence q_1..q_C: accept x_j w.p.
    a_j = min(1, p_j(x_j) / q_j(x_j)); on rejection p_{j+1} = norm(max(p_j - q_j, 0)).
    Invalid children (-1) get probability 0 and leave p_j (and the proposal state) unchanged."""
    B = p.shape[0]

    def step(carry, x):
        p_j, alive, st = carry  # alive = P(children before j all rejected)
        valid = x >= 0
        xs = jnp.maximum(x, 0)
        q_j, st_next = proposal(st, xs, valid)
        a = jnp.where(valid, _ratio(_take(p_j, xs), _take(q_j, xs)), 0.0)
        p_next = jnp.where(valid[:, None], _residual(p_j, q_j), p_j)
        return (p_next, alive * (1.0 - a), st_next), alive * a

    init = (p.astype(_f32), jnp.ones((B,), _f32), state)
    (res, _, _), acc = jax.lax.scan(step, init, children.astype(jnp.int32).T)
    return NodeResult(accept=acc.T, residual=res)


def rrs(
    p: Float[Array, "B V"], draft_logits: Float[Array, "B V"], children: Int[Array, "B C"]
) -> NodeResult:
    """SpecInfer recursive rejection sampling: children i.i.d. from q, so q_j = q for every j
    (duplicates are allowed and simply get a lower acceptance)."""
    q = softmax(draft_logits)
    return sequential(p, children, lambda st, x, valid: (q, st), None)


def swor(
    p: Float[Array, "B V"], draft_logits: Float[Array, "B V"], children: Int[Array, "B C"]
) -> NodeResult:
    """Sequoia: children drawn without replacement (Gumbel-top-C), so q_j = softmax of the draft
    logits with x_1..x_{j-1} masked to -inf (renormalised from masked logits)."""
    V = p.shape[-1]

    def proposal(z, x, valid):
        q_j = softmax(z)
        drop = valid[:, None] & (jnp.arange(V)[None, :] == x[:, None])  # remove x_j for j+1
        return q_j, jnp.where(drop, -jnp.inf, z)

    return sequential(p, children, proposal, draft_logits.astype(_f32))


def point_mass(p: Float[Array, "B V"], children: Int[Array, "B C"]) -> NodeResult:
    """Deterministic children (n-gram, prompt lookup, top-k at T > 0): q_j = delta(x_j). Accept x_j
    w.p. p_j(x_j); otherwise zero it and renormalise.

    This exact law is correct even with duplicate siblings (a repeat has p_j(x) = 0, so it gets
    probability 0 and leaves p_j unchanged) and `sample_node` draws from it exactly; it is the
    single-uniform inverse-CDF walk of §6.3 that duplicates bias. Duplicates still waste slots:
    run `dedup_siblings` on drafter output inside the step."""
    V = p.shape[-1]

    def proposal(st, x, valid):
        return jax.nn.one_hot(x, V, dtype=_f32), st

    return sequential(p, children, proposal, None)


def greedy(target_logits: Float[Array, "B V"], children: Int[Array, "B C"]) -> NodeResult:
    """T = 0: accept the first child equal to argmax (logits or probabilities, same argmax);
    the residual is the one-hot argmax."""
    V = target_logits.shape[-1]
    y = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)
    match = (children == y[:, None]) & (children >= 0)
    first = match & (jnp.cumsum(match, axis=-1) == 1)
    return NodeResult(accept=first.astype(_f32), residual=jax.nn.one_hot(y, V, dtype=_f32))


# ----------------------------------------------------------------------------- SpecHub


def spechub(
    p: Float[Array, "B V"], draft_logits: Float[Array, "B V"], children: Int[Array, "B 2"]
) -> NodeResult:
    """SpecHub (ALGORITHMS.md §3(b) == MyTree.accept_step) for children from `draw_spechub`.

    Hub a = argmax(draft_logits) (first index on ties, the same tie-break as the drafter). Pairs
    are (i, a) with Q(i, a) = q(i), or (a, i) with Q(a, i) = Q_ai(i) = q(a) q(i) / (1 - q(a)),
    computed as q(a) * softmax(logits with a masked). Quantities over x != a (both branches):
      p1 = max(p - q, 0),     R_ia = sum_{x!=a} max(q(x) - p(x), 0),     p1(a) = p(a)
      p2 = max(p1 - Q_ai, 0), R_ai = sum_{x!=a} max(Q_ai(x) - p1(x), 0)
      pa = max(p(a) - R_ai, 0),   p2(a) = max(pa - R_ia, 0)
    (i, a): accept i w.p. t = min(1, p(i)/q(i)); else accept a w.p. min(1, pa/R_ia).
    (a, i): accept i (child 2, tested FIRST) w.p. t = min(1, p1(i)/Q_ai(i)); else accept a
            (child 1) w.p. min(1, p(a)/R_ai).
    The sequential tests multiply out to accept = [t, (1-t) h] resp. [(1-t) h, t].

    Why the residual is norm(p2) (mass bookkeeping, summing over the pair law): token i != a is
    served min(p(i), q(i)) by (i, a) pairs and min(p1(i), Q_ai(i)) by (a, i) pairs, leaving p2(i).
    (a, i) pairs reach the hub test with total mass sum_i Q_ai(i) - min(p1(i), Q_ai(i)) = R_ai and
    a constant threshold, so they serve min(p(a), R_ai) = p(a) - pa; (i, a) pairs likewise reach it
    with mass R_ia and serve min(pa, R_ia), leaving p2(a). So P(no accept, ...) = p2 exactly, and
    a bonus from norm(p2) makes the output p. Total acceptance p(a) + sum min(p, q/(1-q(a))).
    `pa` must be computed in both branches (computing it only in (a, i) is biased, TV up to 0.37).

    Other child patterns: (x, -1) is a lone child verified by the single-draft rule (what
    `draw_spechub` emits when q has no token besides the hub); anything else (no valid child, or
    a pair without the hub) is treated as a childless node (accept 0, residual p), which is
    lossless whatever the children are.
    """
    if children.shape[-1] != 2:
        raise ValueError(f"spechub needs exactly 2 children per node, got {children.shape[-1]}")
    p = p.astype(_f32)
    z = draft_logits.astype(_f32)
    V = p.shape[-1]
    a = jnp.argmax(z, axis=-1).astype(jnp.int32)  # hub
    is_hub = jnp.arange(V)[None, :] == a[:, None]
    q = softmax(z)
    q_ai = _take(q, a)[:, None] * softmax(jnp.where(is_hub, -jnp.inf, z))  # 0 at the hub

    # Vocabulary-wide quantities of steps 2, 4, 5, 6 (computed for both branches).
    p1 = jnp.where(is_hub, p, jnp.maximum(p - q, 0.0))
    r_ia = jnp.where(is_hub, 0.0, jnp.maximum(q - p, 0.0)).sum(-1)
    p2 = jnp.where(is_hub, 0.0, jnp.maximum(p1 - q_ai, 0.0))
    r_ai = jnp.where(is_hub, 0.0, jnp.maximum(q_ai - p1, 0.0)).sum(-1)
    p_a = _take(p, a)
    pa = jnp.maximum(p_a - r_ai, 0.0)
    p2 = jnp.where(is_hub, jnp.maximum(pa - r_ia, 0.0)[:, None], p2)

    # Hub thresholds: 0 when nothing reaches the test (its mass then stays in p2).
    def hub_ratio(num, den):
        return jnp.where(den > 0, jnp.minimum(1.0, num / jnp.where(den > 0, den, 1.0)), 0.0)

    c1, c2 = children[:, 0].astype(jnp.int32), children[:, 1].astype(jnp.int32)
    pair_ia = (c1 >= 0) & (c1 != a) & (c2 == a)
    pair_ai = (c1 == a) & (c2 >= 0) & (c2 != a)
    lone = (c1 >= 0) & (c2 < 0)
    i = jnp.maximum(jnp.where(pair_ia, c1, c2), 0)  # the non-hub token of the pair

    t_ia = _ratio(_take(p, i), _take(q, i))  # step 1
    acc_ia = jnp.stack([t_ia, (1.0 - t_ia) * hub_ratio(pa, r_ia)], -1)  # steps 1, 6
    t_ai = _ratio(_take(p1, i), _take(q_ai, i))  # step 3
    acc_ai = jnp.stack([(1.0 - t_ai) * hub_ratio(p_a, r_ai), t_ai], -1)  # steps 3, 5

    # Zero p2 (measure zero): fall back to p without the two children, then to p.
    kids = jax.nn.one_hot(c1, V, dtype=_f32) + jax.nn.one_hot(c2, V, dtype=_f32)
    res_pair = _normalize_or(p2, _normalize_or(jnp.where(kids > 0, 0.0, p), p))

    single = rrs(p, z, jnp.stack([c1, jnp.full_like(c2, -1)], -1))  # lone child: §0.2

    pair = (pair_ia | pair_ai)[:, None]
    accept = jnp.where(pair_ia[:, None], acc_ia, acc_ai)
    accept = jnp.where(pair, accept, jnp.where(lone[:, None], single.accept, 0.0))
    residual = jnp.where(pair, res_pair, jnp.where(lone[:, None], single.residual, p))
    return NodeResult(accept=accept, residual=residual)


def hub_flag(
    draft_logits: Float[Array, "B V"], threshold: float = HUB_THRESHOLD
) -> Bool[Array, " B"]:
    """Per-node SpecHub-vs-SWOR switch: q(argmax) >= threshold. A function of q only, so it may
    steer drafting and verification losslessly, provided both see the same flag."""
    return softmax(draft_logits).max(-1) >= threshold


def select_rule(
    p: Float[Array, "B V"],
    draft_logits: Float[Array, "B V"],
    children: Int[Array, "B 2"],
    use_hub: Bool[Array, " B"] | None = None,
    threshold: float = HUB_THRESHOLD,
) -> NodeResult:
    """2-child nodes: SpecHub where `use_hub` (default: `hub_flag(draft_logits, threshold)`),
    SWOR elsewhere. Pass the flag the drafter used (`draw_select`) when it is stored."""
    if use_hub is None:
        use_hub = hub_flag(draft_logits, threshold)
    hub, sw = spechub(p, draft_logits, children), swor(p, draft_logits, children)
    return jax.tree.map(lambda h, s: jnp.where(use_hub[:, None], h, s), hub, sw)


# ----------------------------------------------------------------------------- siblings


def dedup_siblings(children: Int[Array, "B C"]) -> Int[Array, "B C"]:
    """jit-compatible: mark repeated siblings invalid (-1), keeping the first occurrence. This is
    the check the jitted step should apply to drafter output (O(C^2), no host sync)."""
    c = children.astype(jnp.int32)
    C = c.shape[-1]
    same = (c[:, :, None] == c[:, None, :]) & (c[:, None, :] >= 0)  # [B, j, i]
    earlier = jnp.tril(jnp.ones((C, C), bool), k=-1)[None]  # i < j
    dup = jnp.any(same & earlier, axis=-1)
    return jnp.where(dup, -1, c)


def check_distinct_siblings(children) -> None:
    """Host-side: raise InputError if any row has a repeated valid token (tests, host drafters)."""
    c = np.asarray(children)
    for b, row in enumerate(c.reshape(-1, c.shape[-1])):
        vals, counts = np.unique(row[row >= 0], return_counts=True)
        if np.any(counts > 1):
            raise InputError(
                f"sibling tokens must be distinct: row {b} repeats {vals[counts > 1].tolist()} "
                f"in children {row.tolist()}"
            )


# ----------------------------------------------------------------------------- sampling


def sample_node(
    result: NodeResult, children: Int[Array, "B C"], key: PRNGKeyArray
) -> tuple[Int[Array, " B"], Int[Array, " B"]]:
    """Draw the node's outcome: (child index in [0, C) or -1 for none, bonus token).

    One float32 uniform picks among the C + 1 outcomes by inverse CDF over `accept` (a child with
    probability 0 is never picked); the bonus is drawn from `residual` on every row and only
    means something where the child index is -1. Equal in law to the sequential loop."""
    k_u, k_bonus = jax.random.split(key)
    acc = jnp.where(children >= 0, result.accept, 0.0)
    cdf = jnp.cumsum(acc, axis=-1)
    u = jax.random.uniform(k_u, cdf.shape[:1], _f32)
    j = jnp.sum(cdf <= u[:, None], axis=-1).astype(jnp.int32)  # first j with u < cdf[j]
    child = jnp.where(j < acc.shape[-1], j, -1)
    bonus = jax.random.categorical(k_bonus, jnp.log(result.residual), axis=-1).astype(jnp.int32)
    return child, bonus
