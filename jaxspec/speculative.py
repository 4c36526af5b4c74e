"""Speculative decoding: one jitted draft → tree-verify → accept → commit step.

`spec_step(params_t, params_d, state, spec)` (DONATES `state`):
  1. draft   the draft model runs over the whole tree once per level (positions = length + depth,
             ancestor mask; a chain feeds only the level's node, its ancestors' K/V already in
             the scratch); the children of each level's nodes are drawn from the draft logits at
             that node (top-k for greedy / point-mass, Gumbel-top-k for SWOR, i.i.d. for RRS);
             one more pass leaves draft KV for every node in the draft cache's scratch. MagicDec
             (`SpecConfig.magicdec`): the draft cache is a compact sink + sliding-window cache
             (`jaxspec.magicdec`), committed into its ring.
  2. verify  ONE target forward over root + N nodes (committed prefix ⊕ ancestor mask).
  3. accept  a walk down the tree (a static loop over depth, vectorised over rows): at the
             current node the verification rule (`jaxspec.verify.rules`) gives the exact
             distribution over {children, none}; a child is drawn, or the bonus token from the
             residual. Rows accept different numbers of tokens.
  4. commit  the target's K/V rows of the accepted path, taken from the verify forward's new
             K/V (which the forward does not write), are written at `[length, length + a]`;
             the draft cache's are gathered from its scratch slots `[length, length + N]`
             (MagicDec committing the target's KV: the verify writes every node and the path is
             gathered likewise). Each row's length advances by a + 1 (root + accepted).
             Emitted tokens = accepted + bonus, truncated at EOS and at the row's max_new;
             finished rows stop, the batch does not.
Static (`SpecConfig`): target/draft model configs, the tree, the verifier. Per-row sampling
parameters are arrays as in plain decoding. The tree chain(0) (root only) is autoregressive
decoding through the same step.

Model-free drafting (SSSD, `SpecConfig.ngram`): step 1 instead builds a per-row candidate tree
from n-gram matches in the row's own history (`SpecState.history`) and, when the `draft` argument
is a `Datastore`, in a token corpus (`jaxspec.drafting.ngram`). The topology is then data:
parents/depths/ancestor mask are per-row arrays, the walk finds a node's children by comparing
parents, and the verifier is greedy or point-mass. There is no draft cache.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec import magicdec
from jaxspec.config import ModelConfig
from jaxspec.drafting.ngram import NgramConfig, children_of, choose_width, ngram_tree
from jaxspec.drafting.vocab import draft_forward, model_params
from jaxspec.errors import ConfigError
from jaxspec.kv_cache import KVCache
from jaxspec.magicdec import DraftRing, MagicDec
from jaxspec.model import forward, forward_hidden, lm_head
from jaxspec.model.params import Params, is_unrolled
from jaxspec.model.transformer import write_kv
from jaxspec.prefill import is_eos, prefill_cache
from jaxspec.sampling import SamplingParams, probs, process_logits, sample
from jaxspec.trees import TreeSpec
from jaxspec.types import Array, Bool, Float, Int, PRNGKeyArray
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
    # model-free n-gram drafting (SSSD); `tree` and `draft` are then unused (pass chain(0), target)
    ngram: NgramConfig | None = None
    # MagicDec: the draft reads a compact sink + sliding-window cache (`jaxspec.magicdec`)
    magicdec: MagicDec | None = None
    # spechub: a 2-child node uses SpecHub where the draft's q(argmax) >= this, SWOR elsewhere
    # (0: SpecHub at every 2-child node; > 1: never). Drafter and verifier read the same value.
    hub_threshold: float = rules.HUB_THRESHOLD

    def __post_init__(self):
        if self.verifier not in VERIFIERS:
            raise ConfigError(f"unknown verifier {self.verifier!r}; choose from {VERIFIERS}")
        if self.ngram is not None and self.verifier not in ("greedy", "point_mass"):
            raise ConfigError(
                f"n-gram drafts are deterministic: verify them with greedy (T = 0) or point_mass, "
                f"not {self.verifier!r}"
            )
        if self.magicdec is not None:
            if self.ngram is not None:
                raise ConfigError("MagicDec drafts with a model: it cannot be combined with ngram")
            self.magicdec.check(self.num_nodes, self.draft)
            if self.magicdec.self_draft and self.draft != self.target:
                raise ConfigError("MagicDec self-speculation drafts with the target's own weights: "
                                  "the draft config must be the target's")  # fmt: skip
        if not self.hub_threshold >= 0:
            raise ConfigError(f"hub_threshold must be >= 0, got {self.hub_threshold}")
        if self.draft.vocab_size != self.target.vocab_size:
            raise ConfigError(
                f"draft vocabulary ({self.draft.vocab_size}) differs from the target's "
                f"({self.target.vocab_size}): the draft must share the target's tokenizer"
            )

    @property
    def num_nodes(self) -> int:
        """In-flight tokens per row and step: root + speculated nodes."""
        return self.tree.num_nodes if self.ngram is None else self.ngram.num_nodes + 1

    @property
    def num_speculated(self) -> int:
        return self.num_nodes - 1

    @property
    def max_depth(self) -> int:
        return self.tree.max_depth if self.ngram is None else self.ngram.max_depth

    @property
    def max_width(self) -> int:
        """Children compared per node (the width of the rank histogram)."""
        if self.ngram is None:
            return self.tree.max_width
        return min(self.ngram.max_children, self.ngram.num_nodes)

    @property
    def uses_draft_model(self) -> bool:
        return self.ngram is None and self.tree.num_speculated > 0


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
    # rank_hist[b, k]: visited nodes (with children) of row b whose rank-k child was accepted;
    # rank_hist[b, W]: those that accepted none (the positional acceptance of Sequoia)
    rank_hist: Int[Array, "B W1"]
    # n-gram drafting only: prompt ⊕ emitted tokens, history[b, :cache.lengths[b] + 1]
    history: Int[Array, "B H"] | None = None
    # MagicDec only: the compact draft cache's ring bookkeeping (`draft_cache` is the compact one)
    draft_ring: DraftRing | None = None


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
        use_hub = rules.hub_flag(flat, spec.hub_threshold)
        pair = proposals.draw_select(flat, key, use_hub).reshape(B, n, 2)
        pair = jnp.pad(pair, ((0, 0), (0, 0), (0, k - 2)), constant_values=-1)
        kids = jnp.where(jnp.asarray(fanout == 2)[None, :, None], pair, kids)
    return kids


def _draft_cache(spec: SpecConfig, state: SpecState) -> KVCache:
    """The draft cache a step drafts with (MagicDec: the compact cache, prepared)."""
    if spec.magicdec is None:
        return state.draft_cache
    md, total = spec.magicdec, state.cache.lengths
    return magicdec.prepare(md, spec.draft, state.draft_cache, state.draft_ring, total)


def _draft(params_d, spec: SpecConfig, state: SpecState, positions, key):
    """Tree tokens [B, N1], processed draft logits per node [B, N1, V] (raw for the greedy
    verifier, which needs no q), draft cache with scratch
    (the draft KV of every node, except where MagicDec commits the target's KV instead).
    A chain drafts incrementally: level d feeds only node d, whose ancestors' K/V are already in
    the scratch slots before it (the cache's lengths are advanced by d for the pass), so γ drafts
    cost γ one-token forwards. Other trees feed every node at every level (ancestor mask)."""
    tree = spec.tree
    B = state.root.shape[0]
    anc = jnp.asarray(tree.ancestor_mask)[None]
    toks = jnp.zeros((B, tree.num_nodes), jnp.int32).at[:, 0].set(state.root)
    zq = None
    dcache = _draft_cache(spec, state)
    base = dcache.lengths
    is_chain = tree.max_width == 1

    def run(lo: int, hi: int, cache):
        """Draft logits of nodes [lo, hi) and the cache with their K/V in its scratch."""
        if not is_chain:
            logits, cache = draft_forward(params_d, spec.draft, toks, positions, cache, anc)
            return logits[:, lo:hi], cache
        view = cache.replace(lengths=base + lo)  # the chain nodes before lo are the prefix
        logits, cache = draft_forward(params_d, spec.draft, toks[:, lo:hi], positions[:, lo:hi],
                                      view)  # fmt: skip
        return logits, cache.replace(lengths=base)

    for level, (start, stop) in enumerate(tree.level_slices[:-1]):
        logits, written = run(start, stop, dcache)
        if is_chain:
            dcache = written  # node `start`'s K/V stays for the next levels
        nodes = np.arange(start, stop)
        if spec.verifier == "greedy":  # children = the draft's top-k; no q is needed (no sort)
            z = logits
        else:
            z = jax.vmap(lambda x: process_logits(x, state.sampling), in_axes=1, out_axes=1)(logits)
        zq = z if zq is None else jnp.concatenate([zq, z], axis=1)
        kids = _draw_children(spec, z, tree.num_children[nodes], jax.random.fold_in(key, level))
        for j, node in enumerate(nodes):  # static scatter of drawn tokens to child slots
            for r, child in enumerate(tree.children[node][: tree.num_children[node]]):
                toks = toks.at[:, child].set(kids[:, j, r])
    own_kv = spec.magicdec is None or not spec.magicdec.commit_target_kv
    if tree.num_speculated and own_kv:  # draft KV for every node (the accepted path is committed)
        start = tree.max_depth if is_chain else 0
        _, dcache = run(start, tree.num_nodes, dcache)
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
        # the drafter's flag, recomputed from the same stored q and threshold
        hub = rules.select_rule(p, zq_node, kid_tok[:, :2], threshold=spec.hub_threshold)
        hub = hub.replace(accept=jnp.pad(hub.accept, ((0, 0), (0, kid_tok.shape[1] - 2))))
        two = (n_kids == 2)[:, None]
        res = jax.tree.map(lambda h, s: jnp.where(two, h, s), hub, res)
    return res


def _walk_tree(node_fn, D: int, width: int, logits_t, sp, key):
    """The accept walk shared by static and per-row trees (a static loop over depth, vectorised
    over rows). `node_fn(cur)` gives the current node's children (node ids [B, W], tokens
    [B, W], −1 past the last) and the rule's `NodeResult`. Returns (accepted length a [B], path
    node ids [B, D], bonus token [B], rank histogram increment [B, W + 1])."""
    B = logits_t.shape[0]
    rows = jnp.arange(B)
    cur = jnp.zeros((B,), jnp.int32)
    alive = jnp.ones((B,), bool)
    acc = jnp.zeros((B,), jnp.int32)
    path = jnp.zeros((B, max(D, 1)), jnp.int32)
    bonus = jnp.zeros((B,), jnp.int32)
    ranks = jnp.zeros((B, width + 1), jnp.int32)
    for d in range(D):
        kids, kid_tok, res = node_fn(cur)
        j, bon = rules.sample_node(res, kid_tok, jax.random.fold_in(key, d))
        took = alive & (j >= 0)
        # this depth's outcome (accepted rank, or none) at live nodes that have children
        counted = alive & (kid_tok >= 0).any(axis=1)
        ranks = ranks.at[rows, jnp.where(took, jnp.minimum(j, width - 1), width)].add(
            counted.astype(jnp.int32)
        )
        nxt = kids[rows, jnp.maximum(j, 0)]
        path = path.at[:, d].set(jnp.where(took, nxt, path[:, d]))
        bonus = jnp.where(alive & ~took, bon, bonus)
        cur = jnp.where(took, nxt, cur)
        acc = acc + took
        alive = took
    # rows that walked to the bottom: the bonus comes from the target at the last node
    last = sample(logits_t[rows, cur], sp, jax.random.fold_in(key, D))
    return acc, path, jnp.where(alive, last, bonus), ranks


def _walk(spec: SpecConfig, logits_t, zq, toks, sp, key):
    """Accept walk over the static tree `spec.tree` (model drafts)."""
    tree = spec.tree
    rows = jnp.arange(toks.shape[0])
    children = jnp.asarray(tree.children)  # [N1, W]

    def node(cur):
        kids = children[cur]  # [B, W]
        kid_tok = jnp.where(kids >= 0, toks[rows[:, None], jnp.maximum(kids, 0)], -1)
        n_kids = jnp.asarray(tree.num_children)[cur]
        res = _node_result(spec, logits_t[rows, cur], zq[rows, cur], kid_tok, n_kids, sp)
        return kids, kid_tok, res

    return _walk_tree(node, tree.max_depth, spec.max_width, logits_t, sp, key)


def _walk_dynamic(spec: SpecConfig, logits_t, toks, parents, sp, key, depth: int | None = None):
    """Accept walk over per-row trees given as data (n-gram drafts): children by parent lookup;
    `depth` bounds the walk (default: the config's deepest node)."""
    rows = jnp.arange(toks.shape[0])
    width = spec.max_width

    def node(cur):
        kids, kid_tok = children_of(parents, toks, cur, width)
        if spec.verifier == "greedy":
            res = rules.greedy(logits_t[rows, cur], kid_tok)
        else:
            res = rules.point_mass(probs(logits_t[rows, cur], sp), kid_tok)
        return kids, kid_tok, res

    return _walk_tree(node, spec.max_depth if depth is None else depth, width, logits_t, sp, key)


def _commit_cache(cache: KVCache, idx: Int[Array, "B D1"], n: Int[Array, " B"]) -> KVCache:
    """Move scratch rows length + idx[:, j] to length + j (read all, then write); commit n[b]."""
    rows = jnp.arange(idx.shape[0])[:, None]
    src = cache.lengths[:, None] + idx
    dst = cache.lengths[:, None] + jnp.arange(idx.shape[1])[None]
    k_rows, v_rows = cache.gather_slots(rows, src)
    return cache.scatter_slots(rows, dst, k_rows, v_rows).replace(lengths=cache.lengths + n)


def _commit_new(cache: KVCache, k_new: Float[Array, "L B T K E"], v_new: Float[Array, "L B T K E"],
                idx: Int[Array, "B D1"], n: Int[Array, " B"]) -> KVCache:  # fmt: skip
    """Write the step's new K/V rows idx[:, j] (of the T in-flight tokens, from a forward with
    `write=False`) at slots length + j, and commit n[b] of them. The other tree nodes are never
    written: the same cache as writing all T rows then `_commit_cache`, with D + 1 rows scattered
    instead of T + 2(D + 1) (a scatter into the slot-last K is a strided loop on XLA:CPU)."""
    rows = jnp.arange(idx.shape[0])[:, None]
    cache = write_kv(cache, k_new[:, rows, idx], v_new[:, rows, idx])
    return cache.replace(lengths=cache.lengths + n)


def _ngram_draft(spec: SpecConfig, datastore, state: SpecState):
    """(tokens, parents, positions, ancestor mask, scores) of each row's n-gram tree."""
    h = state.cache.lengths + 1
    toks, parents, depths, anc, scores = ngram_tree(spec.ngram, state.history, h, datastore)
    return toks, parents, state.cache.lengths[:, None] + depths, anc, scores


def _ngram_verify(params_t, spec: SpecConfig, state: SpecState, drafted, key):
    """Verify forward + accept walk of the n-gram trees: (accepted [B], path [B, max(D, 1)],
    bonus [B], rank increment [B, W + 1], (new K, new V) [L, B, N + 1, K, E], not yet written:
    `_commit_new` writes the accepted path). With adaptive widths
    (`NgramConfig.widths`) the step verifies only the w best nodes of every row, w chosen by
    `choose_width` on device; each width is one `lax.switch` branch (its own forward shape), and
    only the chosen branch runs."""
    toks, parents, positions, anc, scores = drafted
    ng, D = spec.ngram, spec.max_depth

    N1 = ng.num_nodes + 1

    def run(w: int):
        def verify(cache):  # reads the cache; returns the new K/V, padded to N + 1 tokens
            n1 = w + 1  # the w best nodes + the root: a tree (parents precede children)
            h, (k_new, v_new) = forward_hidden(params_t, spec.target, toks[:, :n1],
                                               positions[:, :n1], cache, anc[:, :n1, :n1],
                                               write=False)  # fmt: skip
            logits = lm_head(params_t, h)
            sub = toks[:, :n1], parents[:, :n1]
            acc, path, bonus, ranks = _walk_dynamic(spec, logits, *sub, state.sampling, key,
                                                    depth=min(D, w))  # fmt: skip
            path = jnp.pad(path, ((0, 0), (0, max(D, 1) - path.shape[1])))
            # slots past lengths + w are scratch (never attended before being rewritten)
            pad = ((0, 0), (0, 0), (0, N1 - n1), (0, 0), (0, 0))
            return acc, path, bonus, ranks, jnp.pad(k_new, pad), jnp.pad(v_new, pad)

        return verify

    if not ng.widths:
        *out, k_new, v_new = run(ng.num_nodes)(state.cache)
    else:
        choice = choose_width(ng, scores, ~state.done, state.max_new - state.n_out)
        # the cache only enters the branches read-only and is written once after them: a
        # branch that wrote it made XLA copy the whole cache through the switch every step
        # (measured at batch 8: +30-50% per step over AR with every step at width 0)
        *out, k_new, v_new = jax.lax.switch(choice, [run(w) for w in ng.widths], state.cache)
    return (*out, (k_new, v_new))


def _spec_step(params_t: Params, params_d, state: SpecState, spec: SpecConfig):
    """One step; `params_d` is the draft model's params, or for n-gram drafting the
    `Datastore` (or None)."""
    tree = spec.tree
    B, out_len = state.tokens.shape
    D = spec.max_depth
    rows = jnp.arange(B)
    rng, k_draft, k_walk = jax.random.split(state.rng, 3)
    dcache = None
    if spec.ngram is not None:  # 1. draft: model-free candidate trees, topology per row
        drafted = _ngram_draft(spec, params_d, state)
        toks = drafted[0]
    else:
        positions = state.cache.lengths[:, None] + jnp.asarray(tree.depth)[None]
        anc = jnp.asarray(tree.ancestor_mask)[None]
        # 1. draft (nothing to draft for the root-only tree: plain autoregressive decoding)
        if tree.num_speculated:
            toks, zq, dcache = _draft(params_d, spec, state, positions, k_draft)
        else:
            toks, zq = state.root[:, None], None
    # 2. verify: one target forward over the whole tree; 3. accept
    # (the verify's new K/V are written after the walk, accepted path only, by `_commit_new`;
    # MagicDec committing the target's KV into its draft cache reads the tree rows from the
    # target cache, so there the forward writes every node and `_commit_cache` moves the path)
    kv_new = None
    if spec.ngram is not None:
        acc, path, bonus, ranks, kv_new = _ngram_verify(params_t, spec, state, drafted, k_walk)
    else:
        if spec.magicdec is not None and spec.magicdec.commit_target_kv:
            logits_t, cache = forward(params_t, spec.target, toks, positions, state.cache, anc)
        else:
            h, kv_new = forward_hidden(params_t, spec.target, toks, positions, state.cache, anc,
                                       write=False)  # fmt: skip
            logits_t = lm_head(params_t, h)
        acc, path, bonus, ranks = _walk(spec, logits_t, zq, toks, state.sampling, k_walk)
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
    ring = state.draft_ring
    if spec.magicdec is not None and dcache is not None:  # into the compact cache's window
        md, total = spec.magicdec, state.cache.lengths
        src, start = (cache, total) if md.commit_target_kv else (dcache, dcache.lengths)
        dcache, ring = magicdec.commit(md, dcache, ring, src, start, idx, count, total)
    elif dcache is not None:
        dcache = _commit_cache(dcache, idx, count)
    if kv_new is not None:
        cache = _commit_new(state.cache, *kv_new, idx, count)
    else:
        cache = _commit_cache(cache, idx, count)
    history = state.history
    if history is not None:  # emitted tokens follow the old root at h = lengths + 1
        hdst = jnp.where(j < count[:, None], state.cache.lengths[:, None] + 1 + j, history.shape[1])
        history = history.at[rows[:, None], hdst].set(emitted, mode="drop")
    return state.replace(
        history=history,
        tokens=tokens,
        n_out=n_out,
        root=jnp.where(live, bonus, state.root),
        done=done,
        cache=cache,
        draft_cache=dcache,
        draft_ring=ring,
        rng=rng,
        steps=state.steps + 1,
        live_steps=state.live_steps + live,
        accepted=state.accepted + jnp.where(live, acc, 0),
        accept_hist=state.accept_hist.at[rows, acc].add(live.astype(jnp.int32)),
        rank_hist=state.rank_hist + jnp.where(live[:, None], ranks, 0),
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
    """Prefill both caches (slots = P + max_new_tokens + tree size) and sample the first token.
    With n-gram drafting `params_d` is the datastore (or None) and the history buffer is kept."""
    P = prompts.shape[1]
    slots = P + max_new_tokens + spec.num_nodes
    lengths = prompt_lengths.astype(jnp.int32)
    cache, last_h = prefill_cache(params_t, spec.target, prompts, lengths, slots=slots, chunk=chunk)
    state = spec_start(params_t, params_d, cache, last_h, prompts, key, sampling, max_new,
                       spec=spec, max_new_tokens=max_new_tokens, chunk=chunk)  # fmt: skip
    return decode_layout(params_t, params_d, spec, state)


def decode_layout(params_t: Params, params_d, spec: SpecConfig, state: SpecState) -> SpecState:
    """The state with per-layer caches (`KVCache.layered`, a copy) where the weights they are
    decoded with are unrolled: the target cache, and the draft model's cache (full-size, or
    MagicDec's compact one). Decoding reads each layer's buffer in place then."""
    cache, dcache = state.cache, state.draft_cache
    if is_unrolled(params_t):
        cache = cache.layered()
    if dcache is not None and is_unrolled(model_params(params_d)):
        dcache = dcache.layered()
    return state.replace(cache=cache, draft_cache=dcache)


def spec_start(
    params_t: Params,
    params_d: Params,
    cache: KVCache,
    last_h: Float[Array, "B M"],
    prompts: Int[Array, "B P"],
    key: PRNGKeyArray,
    sampling: SamplingParams,
    max_new: Int[Array, " B"],
    *,
    spec: SpecConfig,
    max_new_tokens: int,
    chunk: int,
) -> SpecState:
    """The decode state from the target's prefilled cache (lengths = the prompt lengths, at least
    P + max_new_tokens + tree size slots) and its last hidden states: the draft cache is built,
    the first token sampled. Benchmarks call it to start several methods from one prefill."""
    B, P = prompts.shape
    lengths = cache.lengths
    dcache, ring = None, None
    if spec.uses_draft_model and spec.magicdec is not None:
        dcache, ring = _magicdec_prefill(params_d, spec, cache, prompts, lengths, chunk)
    elif spec.uses_draft_model:
        dcache, _ = prefill_cache(model_params(params_d), spec.draft, prompts, lengths,
                                  slots=cache.num_slots, chunk=chunk)  # fmt: skip
    key, sub = jax.random.split(key)
    first = sample(lm_head(params_t, last_h[:, None])[:, 0], sampling, sub)
    max_new = jnp.minimum(max_new.astype(jnp.int32), max_new_tokens)
    D1 = spec.max_depth + 1
    history = None
    if spec.ngram is not None:
        history = jnp.zeros((B, P + max_new_tokens), jnp.int32).at[:, :P].set(prompts)
        history = history.at[jnp.arange(B), lengths].set(first)
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
        rank_hist=jnp.zeros((B, spec.max_width + 1), jnp.int32),
        history=history,
        draft_ring=ring,
    )


def _magicdec_prefill(params_d, spec: SpecConfig, cache: KVCache, prompts, lengths, chunk: int):
    """MagicDec's compact draft cache (+ ring) built from the prompt by `spec.magicdec.builder`."""
    md = spec.magicdec
    scratch = spec.num_nodes
    if md.builder == "streaming":
        c = min(chunk, 1 << (md.window.bit_length() - 1))  # a power of two <= the window
        return magicdec.build_streaming(md, model_params(params_d), spec.draft, prompts, lengths,
                                        chunk=c, scratch=scratch)  # fmt: skip
    if md.builder == "snapkv":
        return magicdec.build_snapkv(md, model_params(params_d), spec.draft, cache, prompts,
                                     lengths, scratch)  # fmt: skip
    dense = cache
    if not md.self_draft:  # the draft model's own dense prompt KV, compacted
        dense, _ = prefill_cache(model_params(params_d), spec.draft, prompts, lengths,
                                 slots=prompts.shape[1], chunk=chunk)  # fmt: skip
    return magicdec.build_copy(md, dense, scratch)


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
    the draft / verify split outside the fused step; same shapes, same work). `verify` takes
    the draft phase's whole output, so nothing of the draft is recomputed inside it."""
    if spec.ngram is not None:

        def ngram_draft():
            return _ngram_draft(spec, params_d, state)

        def ngram_verify(drafted):  # the forward and the accept walk (adaptive: one width)
            return _ngram_verify(params_t, spec, state, drafted, state.rng)

        return ngram_draft, ngram_verify
    positions = state.cache.lengths[:, None] + jnp.asarray(spec.tree.depth)[None]
    anc = jnp.asarray(spec.tree.ancestor_mask)[None]

    def draft():
        return _draft(params_d, spec, state, positions, state.rng)  # prepares a compact cache

    def verify(drafted):
        return forward(params_t, spec.target, drafted[0], positions, state.cache, anc)

    return draft, verify


def _draft_only(params_t, params_d, state, spec):
    return _phases(params_t, params_d, state, spec)[0]()


def _verify_only(params_t, params_d, state, spec, drafted):
    return _phases(params_t, params_d, state, spec)[1](drafted)


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
