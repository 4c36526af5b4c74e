"""Speculative decoding: one jitted draft → tree-verify → accept → commit step.

`spec_step(params_t, params_d, state, spec)` (DONATES `state`):
  1. draft   the draft model runs over the whole tree once per level (positions = length + depth,
             ancestor mask); the children of each level's nodes are drawn from the draft logits at
             that node (top-k for greedy / point-mass, Gumbel-top-k for SWOR, i.i.d. for RRS);
             one more pass leaves draft KV for every node in the draft cache's scratch.
  2. verify  ONE target forward over root + N nodes (committed prefix ⊕ ancestor mask).
  3. accept  a walk down the tree (a static loop over depth, vectorised over rows): at the
             current node the verification rule (`jaxspec.verify.rules`) gives the exact
             distribution over {children, none}; a child is drawn, or the bonus token from the
             residual. Rows accept different numbers of tokens.
  4. commit  the accepted path's K/V rows are gathered from the scratch slots
             `[length, length + N]` to `[length, length + a]` in both caches, and each row's
             length advances by a + 1 (root + accepted). Emitted tokens = accepted + bonus,
             truncated at EOS and at the row's max_new; finished rows stop, the batch does not.
Static (`SpecConfig`): target/draft model configs, the tree, the verifier. Per-row sampling
parameters are arrays as in plain decoding. The tree chain(0) (root only) is autoregressive
decoding through the same step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.config import ModelConfig
from jaxspec.errors import ConfigError
from jaxspec.kv_cache import KVCache
from jaxspec.model import forward, lm_head
from jaxspec.model.params import Params
from jaxspec.prefill import is_eos, prefill_cache
from jaxspec.sampling import SamplingParams, probs, process_logits, sample
from jaxspec.trees import TreeSpec
from jaxspec.types import Array, Bool, Int, PRNGKeyArray
from jaxspec.verify import proposals, rules

VERIFIERS = ("greedy", "swor", "rrs", "spechub", "point_mass")


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    target: ModelConfig
    draft: ModelConfig
    tree: TreeSpec
    # greedy (T = 0) | swor | rrs | spechub (2-child nodes with a peaked draft; SWOR elsewhere)
    # | point_mass (deterministic top-k drafts at T > 0)
    verifier: str = "greedy"

    def __post_init__(self):
        if self.verifier not in VERIFIERS:
            raise ConfigError(f"unknown verifier {self.verifier!r}; choose from {VERIFIERS}")
        if self.draft.vocab_size != self.target.vocab_size:
            raise ConfigError(
                f"draft vocabulary ({self.draft.vocab_size}) differs from the target's "
                f"({self.target.vocab_size}): the draft must share the target's tokenizer"
            )


@struct.dataclass
class SpecState:
    tokens: Int[Array, "B O"]  # emitted tokens, -1 past n_out
    n_out: Int[Array, " B"]
    root: Int[Array, " B"]  # last emitted token; its KV is in neither cache yet
    done: Bool[Array, " B"]
    max_new: Int[Array, " B"]
    cache: KVCache  # target
    draft_cache: KVCache | None  # draft; same lengths as the target's (None: no draft, N = 0)
    sampling: SamplingParams
    rng: PRNGKeyArray
    steps: Int[Array, ""]  # target forward passes since prefill
    live_steps: Int[Array, " B"]  # steps in which the row was live
    accepted: Int[Array, " B"]  # accepted drafted tokens
    accept_hist: Int[Array, "B D1"]  # accept_hist[b, a]: steps where row b accepted a tokens


def _draw_children(spec: SpecConfig, z, fanout: np.ndarray, key):
    """Children of n nodes from processed draft logits z [B, n, V]: tokens [B, n, k], -1 = none,
    k = max fan-out. Each proposal matches its verification rule (see `jaxspec.verify`)."""
    B, n, V = z.shape
    k = int(fanout.max())
    flat = z.reshape(B * n, V)
    if spec.verifier in ("greedy", "point_mass"):
        kids = proposals.draw_topk(flat, k)
    elif spec.verifier in ("swor", "spechub"):
        kids = proposals.draw_swor(flat, k, key)
    else:
        kids = proposals.draw_iid(flat, k, key)
    kids = kids.reshape(B, n, k)
    if spec.verifier == "spechub" and (fanout == 2).any():
        # 2-child nodes: a SpecHub pair where the draft is peaked (flag = f(q) only), else SWOR
        pair = proposals.draw_select(flat, key, rules.hub_flag(flat)).reshape(B, n, 2)
        pair = jnp.pad(pair, ((0, 0), (0, 0), (0, k - 2)), constant_values=-1)
        kids = jnp.where(jnp.asarray(fanout == 2)[None, :, None], pair, kids)
    return kids


def _draft(params_d, spec: SpecConfig, state: SpecState, positions, key):
    """Tree tokens [B, N1], processed draft logits per node [B, N1, V], draft cache with scratch."""
    tree = spec.tree
    B = state.root.shape[0]
    anc = jnp.asarray(tree.ancestor_mask)[None]
    toks = jnp.zeros((B, tree.num_nodes), jnp.int32).at[:, 0].set(state.root)
    zq = None
    dcache = state.draft_cache
    for level, (start, stop) in enumerate(tree.level_slices[:-1]):
        logits, _ = forward(params_d, spec.draft, toks, positions, dcache, anc)
        nodes = np.arange(start, stop)
        z = jax.vmap(lambda x: process_logits(x, state.sampling), in_axes=1, out_axes=1)(
            logits[:, start:stop]
        )
        zq = z if zq is None else jnp.concatenate([zq, z], axis=1)
        kids = _draw_children(spec, z, tree.num_children[nodes], jax.random.fold_in(key, level))
        for j, node in enumerate(nodes):  # static scatter of drawn tokens to child slots
            for r, child in enumerate(tree.children[node][: tree.num_children[node]]):
                toks = toks.at[:, child].set(kids[:, j, r])
    if tree.num_speculated:  # draft KV for every node (the accepted path's rows are committed)
        _, dcache = forward(params_d, spec.draft, toks, positions, dcache, anc)
    n_inner = 0 if zq is None else zq.shape[1]
    if n_inner < tree.num_nodes:  # leaves of the last level: never used as q
        pad = jnp.zeros((B, tree.num_nodes - n_inner, spec.target.vocab_size), jnp.float32)
        zq = pad if zq is None else jnp.concatenate([zq, pad], axis=1)
    return toks, zq, dcache


def _node_result(spec: SpecConfig, logits_t, zq_node, kid_tok, n_kids, sp: SamplingParams):
    if spec.verifier == "greedy":
        return rules.greedy(logits_t, kid_tok)
    p = probs(logits_t, sp)
    if spec.verifier == "point_mass":
        return rules.point_mass(p, kid_tok)
    if spec.verifier == "rrs":
        return rules.rrs(p, zq_node, kid_tok)
    res = rules.swor(p, zq_node, kid_tok)
    if spec.verifier == "spechub" and spec.tree.max_width >= 2:
        hub = rules.select_rule(p, zq_node, kid_tok[:, :2])  # same flag as the drafter's
        hub = hub.replace(accept=jnp.pad(hub.accept, ((0, 0), (0, kid_tok.shape[1] - 2))))
        two = (n_kids == 2)[:, None]
        res = jax.tree.map(lambda h, s: jnp.where(two, h, s), hub, res)
    return res


def _walk(spec: SpecConfig, logits_t, zq, toks, sp, key):
    """Accept walk: (accepted length a [B], path node ids [B, D], bonus token [B])."""
    tree = spec.tree
    B = toks.shape[0]
    rows = jnp.arange(B)
    children = jnp.asarray(tree.children)  # [N1, W]
    cur = jnp.zeros((B,), jnp.int32)
    alive = jnp.ones((B,), bool)
    acc = jnp.zeros((B,), jnp.int32)
    path = jnp.zeros((B, max(tree.max_depth, 1)), jnp.int32)
    bonus = jnp.zeros((B,), jnp.int32)
    for d in range(tree.max_depth):
        kids = children[cur]  # [B, W]
        kid_tok = jnp.where(kids >= 0, toks[rows[:, None], jnp.maximum(kids, 0)], -1)
        n_kids = jnp.asarray(tree.num_children)[cur]
        res = _node_result(spec, logits_t[rows, cur], zq[rows, cur], kid_tok, n_kids, sp)
        j, bon = rules.sample_node(res, kid_tok, jax.random.fold_in(key, d))
        took = alive & (j >= 0)
        nxt = kids[rows, jnp.maximum(j, 0)]
        path = path.at[:, d].set(jnp.where(took, nxt, path[:, d]))
        bonus = jnp.where(alive & ~took, bon, bonus)
        cur = jnp.where(took, nxt, cur)
        acc = acc + took
        alive = took
    # rows that walked to the bottom: the bonus comes from the target at the last node
    last = sample(logits_t[rows, cur], sp, jax.random.fold_in(key, tree.max_depth))
    return acc, path, jnp.where(alive, last, bonus)


def _commit_cache(cache: KVCache, idx: Int[Array, "B D1"], n: Int[Array, " B"]) -> KVCache:
    """Move scratch rows length + idx[:, j] to length + j (read all, then write); commit n[b]."""
    rows = jnp.arange(idx.shape[0])[:, None]
    src = cache.lengths[:, None] + idx
    dst = cache.lengths[:, None] + jnp.arange(idx.shape[1])[None]
    k = cache.k.at[:, rows, :, dst].set(cache.k[:, rows, :, src], mode="drop")
    v = cache.v.at[:, rows, :, dst].set(cache.v[:, rows, :, src], mode="drop")
    return cache.replace(k=k, v=v, lengths=cache.lengths + n)


def _spec_step(params_t: Params, params_d: Params, state: SpecState, spec: SpecConfig):
    tree = spec.tree
    B, out_len = state.tokens.shape
    D = tree.max_depth
    rows = jnp.arange(B)
    rng, k_draft, k_walk = jax.random.split(state.rng, 3)
    positions = state.cache.lengths[:, None] + jnp.asarray(tree.depth)[None]
    anc = jnp.asarray(tree.ancestor_mask)[None]
    # 1. draft (nothing to draft for the root-only tree: plain autoregressive decoding)
    if tree.num_speculated:
        toks, zq, dcache = _draft(params_d, spec, state, positions, k_draft)
    else:
        toks, zq, dcache = state.root[:, None], None, None
    # 2. verify: one target forward over the whole tree
    logits_t, cache = forward(params_t, spec.target, toks, positions, state.cache, anc)
    # 3. accept
    acc, path, bonus = _walk(spec, logits_t, zq, toks, state.sampling, k_walk)
    live = ~state.done
    # 4. emit accepted tokens + bonus, truncated at EOS and max_new
    emitted = jnp.concatenate([toks[rows[:, None], path[:, :D]] if D else toks[:, :0],
                               jnp.zeros((B, 1), jnp.int32)], axis=1)  # fmt: skip
    emitted = emitted.at[rows, acc].set(bonus)
    j = jnp.arange(D + 1)[None]
    count = acc + 1
    eos = is_eos(emitted, spec.target) & (j < count[:, None])
    first_eos = jnp.where(eos.any(1), jnp.argmax(eos, axis=1), D + 1)
    count = jnp.minimum(jnp.minimum(count, first_eos + 1), state.max_new - state.n_out)
    count = jnp.where(live, count, 0)
    dst = jnp.where(j < count[:, None], state.n_out[:, None] + j, out_len)  # out_len: dropped
    tokens = state.tokens.at[rows[:, None], dst].set(emitted, mode="drop")
    n_out = state.n_out + count
    done = state.done | (live & ((first_eos < acc + 1) | (n_out >= state.max_new)))
    # commit root (node 0) + the accepted path in both caches; a row's cache always holds every
    # emitted token but the last (the next root), so truncated rows commit only `count` rows
    idx = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), path[:, :D]], axis=1)
    cache = _commit_cache(cache, idx, count)
    if dcache is not None:
        dcache = _commit_cache(dcache, idx, count)
    return state.replace(
        tokens=tokens,
        n_out=n_out,
        root=jnp.where(live, bonus, state.root),
        done=done,
        cache=cache,
        draft_cache=dcache,
        rng=rng,
        steps=state.steps + 1,
        live_steps=state.live_steps + live,
        accepted=state.accepted + jnp.where(live, acc, 0),
        accept_hist=state.accept_hist.at[rows, acc].add(live.astype(jnp.int32)),
    )


def spec_prefill(
    params_t: Params,
    params_d: Params,
    prompts: Int[Array, "B P"],
    prompt_lengths: Int[Array, " B"],
    key: PRNGKeyArray,
    sampling: SamplingParams,
    max_new: Int[Array, " B"],
    *,
    spec: SpecConfig,
    max_new_tokens: int,
    chunk: int,
) -> SpecState:
    """Prefill both caches (slots = P + max_new_tokens + tree size) and sample the first token."""
    B, P = prompts.shape
    slots = P + max_new_tokens + spec.tree.num_nodes
    lengths = prompt_lengths.astype(jnp.int32)
    cache, last_h = prefill_cache(params_t, spec.target, prompts, lengths, slots=slots, chunk=chunk)
    dcache = None
    if spec.tree.num_speculated:
        dcache, _ = prefill_cache(params_d, spec.draft, prompts, lengths, slots=slots, chunk=chunk)
    key, sub = jax.random.split(key)
    first = sample(lm_head(params_t, last_h[:, None])[:, 0], sampling, sub)
    max_new = jnp.minimum(max_new.astype(jnp.int32), max_new_tokens)
    D1 = spec.tree.max_depth + 1
    return SpecState(
        tokens=jnp.full((B, max_new_tokens), -1, jnp.int32).at[:, 0].set(first),
        n_out=jnp.ones((B,), jnp.int32),
        root=first,
        done=is_eos(first, spec.target) | (max_new <= 1) | (lengths <= 0),
        max_new=max_new,
        cache=cache,
        draft_cache=dcache,
        sampling=sampling,
        rng=key,
        steps=jnp.zeros((), jnp.int32),
        live_steps=jnp.zeros((B,), jnp.int32),
        accepted=jnp.zeros((B,), jnp.int32),
        accept_hist=jnp.zeros((B, D1), jnp.int32),
    )


def _spec_decode(params_t, params_d, state: SpecState, spec: SpecConfig) -> SpecState:
    limit = state.tokens.shape[1]
    return jax.lax.while_loop(
        lambda s: ~jnp.all(s.done) & (s.steps < limit),
        lambda s: _spec_step(params_t, params_d, s, spec),
        state,
    )


def _spec_generate(params_t, params_d, prompts, prompt_lengths, key, sampling, max_new, *,
                   spec, max_new_tokens, chunk):  # fmt: skip
    state = spec_prefill(params_t, params_d, prompts, prompt_lengths, key, sampling, max_new,
                         spec=spec, max_new_tokens=max_new_tokens, chunk=chunk)  # fmt: skip
    return _spec_decode(params_t, params_d, state, spec)


def _phases(params_t, params_d, state: SpecState, spec: SpecConfig):
    """The draft phase and the verify forward of one step, as two separate functions (for timing
    the draft / verify split outside the fused step; same shapes, same work)."""
    positions = state.cache.lengths[:, None] + jnp.asarray(spec.tree.depth)[None]
    anc = jnp.asarray(spec.tree.ancestor_mask)[None]

    def draft():
        return _draft(params_d, spec, state, positions, state.rng)

    def verify(toks):
        return forward(params_t, spec.target, toks, positions, state.cache, anc)

    return draft, verify


def _draft_only(params_t, params_d, state, spec):
    return _phases(params_t, params_d, state, spec)[0]()


def _verify_only(params_t, params_d, state, spec, toks):
    return _phases(params_t, params_d, state, spec)[1](toks)


draft_phase = jax.jit(_draft_only, static_argnums=(3,))
verify_phase = jax.jit(_verify_only, static_argnums=(3,))
spec_step = jax.jit(_spec_step, static_argnums=(3,), donate_argnums=(2,))
spec_decode = jax.jit(_spec_decode, static_argnums=(3,), donate_argnums=(2,))
spec_prefill_jit = jax.jit(spec_prefill, static_argnames=("spec", "max_new_tokens", "chunk"))
spec_generate = jax.jit(_spec_generate, static_argnames=("spec", "max_new_tokens", "chunk"))


def spec_stream(params_t, params_d, state: SpecState, spec: SpecConfig):
    """Python generator over the jitted `spec_step` (each step donates the previous state)."""
    while not bool(jnp.all(state.done)):
        state = spec_step(params_t, params_d, state, spec)
        yield state
