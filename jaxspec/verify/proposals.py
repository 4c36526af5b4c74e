"""Proposal samplers: how a node's children are drawn, one per node rule.

Every sampler takes the draft's processed logits `draft_logits: f32[B, V]` (temperature / top-k /
top-p applied, -inf for removed tokens; q = softmax(draft_logits)) and returns `children: i32[B, C]`
in rank order, -1 marking a child that cannot be drawn. Pair each sampler with its rule
(`jaxspec.verify.rules`): the rule must know the exact law q_j each child was drawn from.

  draw_iid     -> rrs          C children i.i.d. from q
  draw_swor    -> swor         Gumbel-top-C in float32 logit space (= sequential draws without
                               replacement); children beyond |supp q| are -1
  draw_spechub -> spechub      hub a = argmax logits + one Gumbel race: (x1, a) if x1 != a, else
                               (a, second place of the same race); (a, -1) if q has only a
  draw_topk    -> point_mass   deterministic top-C (also the T = 0 drafter for `greedy`)
  draw_select  -> select_rule  per-row SpecHub or SWOR (2 children) by the stored hub flag

Randomness comes from the explicit key; split a fresh key every step (never reuse coins).
Races run on logits + Gumbel noise, never on log(u)/q: when q underflows to 0 in float32 the
probability-space race is degenerate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxspec.types import Array, Bool, Float, Int, PRNGKeyArray

_f32 = jnp.float32


def _race(draft_logits: Float[Array, "B V"], key: PRNGKeyArray) -> Float[Array, "B V"]:
    """Gumbel race keys z + g (float32); -inf stays -inf, so removed tokens never win."""
    z = draft_logits.astype(_f32)
    return z + jax.random.gumbel(key, z.shape, _f32)


def _top(keys: Float[Array, "B V"], k: int) -> Int[Array, "B C"]:
    """Indices of the k largest keys, -1 where the key is -inf (nothing left to draw)."""
    vals, idx = jax.lax.top_k(keys, k)
    return jnp.where(jnp.isfinite(vals), idx.astype(jnp.int32), -1)


def draw_iid(draft_logits: Float[Array, "B V"], k: int, key: PRNGKeyArray) -> Int[Array, "B C"]:
    """k children drawn independently from q (with replacement), for `rrs`."""
    B = draft_logits.shape[0]
    x = jax.random.categorical(key, draft_logits.astype(_f32), axis=-1, shape=(k, B))
    return x.T.astype(jnp.int32)


def draw_swor(draft_logits: Float[Array, "B V"], k: int, key: PRNGKeyArray) -> Int[Array, "B C"]:
    """k distinct children without replacement (Gumbel-top-k), for `swor`. The j-th largest key is
    distributed as q renormalised without the j-1 larger ones. When q has fewer than k nonzero
    tokens the extra children are -1 (never token 0 with q = 0)."""
    return _top(_race(draft_logits, key), k)


def _hub_pair(z: Float[Array, "B V"], top2: Int[Array, "B 2"]) -> Int[Array, "B 2"]:
    """(x1, a) if the race winner x1 is not the hub a = argmax z (first index on ties, the
    tie-break `spechub` uses too), else (a, x2) with x2 the race's second place (-1 if none)."""
    a = jnp.argmax(z, axis=-1).astype(jnp.int32)
    x1, x2 = top2[:, 0], top2[:, 1]
    hub_won = x1 == a
    return jnp.stack([jnp.where(hub_won, a, x1), jnp.where(hub_won, x2, a)], axis=-1)


def draw_spechub(draft_logits: Float[Array, "B V"], key: PRNGKeyArray) -> Int[Array, "B 2"]:
    """SpecHub pair (ALGORITHMS.md §3(b)): P(i, a) = q(i), P(a, i) = q(a) q(i) / (1 - q(a)). One
    race: its winner is ~ q and its second place ~ q(. | != winner), so no extra draw is needed."""
    z = draft_logits.astype(_f32)
    return _hub_pair(z, _top(_race(z, key), 2))


def draw_topk(draft_logits: Float[Array, "B V"], k: int) -> Int[Array, "B C"]:
    """The k most likely draft tokens, deterministic and distinct, for `point_mass` (T > 0) or
    `greedy` (T = 0). Tokens the draft removed (-inf) are not proposed (-1)."""
    return _top(draft_logits.astype(_f32), k)


def draw_select(
    draft_logits: Float[Array, "B V"], key: PRNGKeyArray, use_hub: Bool[Array, " B"]
) -> Int[Array, "B 2"]:
    """Two children per row: SpecHub pair where `use_hub`, SWOR top-2 elsewhere (one race serves
    both). Verify with `select_rule(..., use_hub=use_hub)`."""
    z = draft_logits.astype(_f32)
    top2 = _top(_race(z, key), 2)
    return jnp.where(use_hub[:, None], _hub_pair(z, top2), top2)
