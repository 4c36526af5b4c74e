"""SSSD's model-free drafter, on device: a candidate token tree per row from n-gram matches in the
row's own history (prompt + emitted tokens) and, optionally, in a token datastore.

Everything is a static-shape jittable function of the committed tokens, so the drafts are a
deterministic function of the prefix (which makes point-mass / greedy verification lossless) and
the decode step never leaves the device.

Conventions (ALGORITHMS.md §5(b), generalised):
  * history  int32[B, H]: row b's prompt ⊕ emitted tokens in `history[b, :h_b]`, h_b = its
    cache length + 1; the last token is the tree root (its KV is not cached yet).
  * query    the last Q = `max_query` tokens. For every match length m = 1..Q, the K most recent
    earlier positions whose m tokens equal the query's last m give continuations: the next L =
    `branch_length` tokens (a "source group" of sequences). This is the prompt/self-output
    counting trie of SSSD with each m normalised separately; unlike the reference, the
    continuation depth L does not shrink with m.
  * datastore (optional) `jaxspec.drafting.datastore.Datastore`: the longest query suffix with
    matches first; while fewer than `min_datastore_matches` slots are filled, back off to shorter
    suffixes. Up to S = `datastore_matches` evenly spaced matches become one more group.
  * scores   a prefix x_1..x_{d+1} of a group's sequences scores
    `base · disc^d · count(prefix) / (total + prior)` — SSSD's best-first product of child
    frequencies `count(child)/count(node)` times the per-level discount, in closed form. History
    groups use base 0.6, disc 0.6 + 0.1·m, prior 0; the datastore base 1, disc 1, prior
    `datastore_prior` (1: one corpus match scores 1/2, not 1 — measured, a lone match is
    accepted ~3% of the time). A prefix found by several groups
    keeps its best score. Scores never increase along a path (counts shrink, disc ≤ 1), so the
    N best distinct prefixes, ties broken toward shallower nodes, are closed under taking
    parents: they are exactly what SSSD's best-first merge pops. Node validity is nonetheless
    re-checked (all ancestors present) so a malformed choice can never be verified.
  * output   tokens [B, N+1] (node 0 = root), parents [B, N+1] (root and unused slots -1; an
    unused slot is never a child of anything), depth [B, N+1], ancestor-or-self mask
    [B, N+1, N+1], scores [B, N+1] (root 1, unused 0). Siblings are distinct prefixes, hence
    distinct tokens (needed by point-mass). Node order is best score first, so parents precede
    children, and every leading slice `[:, :w + 1]` is itself a valid tree (the w best nodes).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxspec.errors import ConfigError
from jaxspec.types import Array, Bool, Float, Int

# P(node accepted) against its score: bin means of greedy SmolLM2-135M-Instruct on the 24
# tuning/distill prompts of configs/prompts (not evaluation data), N = 15, 3,076 steps with and
# without the stdlib datastore (session 8, `datastore_prior` 1). The dip at 0.5 is the datastore's
# single corpus matches (p = 0.16); scores above 0.6 come only from the datastore (history scores
# are <= 0.6) and are rare (42 nodes), hence smoothed.
DEFAULT_ACCEPT_KNOTS = ((0.0, 0.0), (0.034, 0.015), (0.071, 0.027), (0.122, 0.052),
                        (0.165, 0.061), (0.212, 0.077), (0.282, 0.109), (0.31, 0.132),
                        (0.38, 0.194), (0.428, 0.28), (0.506, 0.16), (0.603, 0.455),
                        (0.8, 0.55), (1.0, 0.65))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class NgramConfig:
    num_nodes: int = 8  # N speculated nodes per row (the root is extra)
    branch_length: int = 8  # L: continuation length, hence the deepest node
    max_query: int = 4  # Q: longest query suffix
    matches_per_length: int = 16  # K: most recent history matches kept per query length
    datastore_matches: int = 32  # S: datastore matches kept (evenly spaced over the interval)
    min_datastore_matches: int = 16  # back off to a shorter query until this many are found
    datastore_prior: float = 1.0  # added to the datastore group's match count (shrinkage)
    history_base: float = 0.6
    history_discount: float = 0.6  # + 0.1 · m
    max_children: int = 8  # siblings compared per node by the point-mass rule
    # Adaptive verify width (empty: always verify all N nodes). Each step verifies only the w
    # best nodes, w in `widths`, the one maximising predicted tokens ÷ `width_cost[w]` (the
    # measured cost of verifying w + 1 tokens per row relative to one); w = 0 is a plain
    # autoregressive step. See `choose_width`.
    widths: tuple[int, ...] = ()
    width_cost: tuple[float, ...] = ()
    # node score -> P(node accepted), piecewise linear over (score, probability) knots
    accept_knots: tuple[tuple[float, float], ...] = DEFAULT_ACCEPT_KNOTS
    # whose predicted tokens the width maximises: "sum" (every live row: throughput when
    # finished rows are replaced at once, as in the serving engine) or "slowest" (the live rows
    # with the most tokens still to emit: a static batch ends with its slowest row, so tokens
    # accepted by rows that will wait for it anyway buy nothing)
    objective: str = "sum"

    def __post_init__(self):
        for f in ("num_nodes", "branch_length", "max_query", "matches_per_length",
                  "datastore_matches", "max_children"):  # fmt: skip
            if getattr(self, f) < 1:
                raise ConfigError(f"NgramConfig.{f} must be >= 1, got {getattr(self, f)}")
        w = self.widths
        if list(w) != sorted(set(w)) or (w and (w[0] < 0 or w[-1] > self.num_nodes)):
            raise ConfigError(
                f"NgramConfig.widths must be increasing, in [0, num_nodes = {self.num_nodes}]: {w}"
            )
        if len(self.width_cost) != len(w) or any(not (c > 0) for c in self.width_cost):
            raise ConfigError(
                f"NgramConfig.width_cost needs one positive cost per width: widths {w}, "
                f"costs {self.width_cost}"
            )
        if self.objective not in ("sum", "slowest"):
            raise ConfigError(
                f"NgramConfig.objective must be 'sum' or 'slowest', got {self.objective!r}"
            )
        xs = [k[0] for k in self.accept_knots]
        ys = [k[1] for k in self.accept_knots]
        if len(xs) < 2 or xs != sorted(set(xs)) or any(not 0 <= y <= 1 for y in ys):
            raise ConfigError(
                "NgramConfig.accept_knots must be >= 2 (score, probability) pairs with increasing "
                f"scores and probabilities in [0, 1]: {self.accept_knots}"
            )
        if self.history_discount + 0.1 * self.max_query > 1.0:
            raise ConfigError(
                f"NgramConfig: history_discount + 0.1 * max_query = "
                f"{self.history_discount + 0.1 * self.max_query:.2f} > 1: scores must not grow "
                "along a path"
            )

    @property
    def max_depth(self) -> int:
        return min(self.branch_length, self.num_nodes)


def _shift_right(x: Int[Array, "B H"], k: int) -> Int[Array, "B H"]:
    """x[:, j - k] (−1 where j < k)."""
    if k == 0:
        return x
    return jnp.pad(x, ((0, 0), (k, 0)), constant_values=-1)[:, : x.shape[1]]


def _prefix_valid(valid: Bool[Array, "... L"]) -> Bool[Array, "... L"]:
    return jnp.cumprod(valid.astype(jnp.int32), axis=-1).astype(bool)


def history_groups(cfg: NgramConfig, history: Int[Array, "B H"], h: Int[Array, " B"]):
    """Continuations from the row's own history, one group per match length m = 1..Q:
    (sequences [B, Q·K, L], valid [B, Q·K, L])."""
    B, H = history.shape
    Q, K, L = cfg.max_query, min(cfg.matches_per_length, H), cfg.branch_length
    j = jnp.arange(H, dtype=jnp.int32)[None]
    hist = jnp.where(j < h[:, None], history, -1)
    qidx = h[:, None] - Q + jnp.arange(Q, dtype=jnp.int32)[None]  # query positions
    query = jnp.where(qidx >= 0, jnp.take_along_axis(hist, jnp.maximum(qidx, 0), axis=1), -1)
    match = j < (h[:, None] - 1)  # a match must end before the root (the query itself)
    seqs, valids = [], []
    for m in range(1, Q + 1):
        want = query[:, Q - m]  # m-th query token from the end
        match = match & (_shift_right(hist, m - 1) == want[:, None]) & (want >= 0)[:, None]
        ends, _ = jax.lax.top_k(jnp.where(match, j, -1), K)  # most recent matches first
        idx = ends[:, :, None] + 1 + jnp.arange(L, dtype=jnp.int32)[None, None]
        tok = jnp.take_along_axis(hist[:, None, :], jnp.clip(idx, 0, H - 1), axis=2)
        ok = (ends[:, :, None] >= 0) & (idx < h[:, None, None]) & (tok >= 0)
        seqs.append(tok)
        valids.append(_prefix_valid(ok))
    return jnp.concatenate(seqs, axis=1), jnp.concatenate(valids, axis=1)


def datastore_group(cfg: NgramConfig, ds, history: Int[Array, "B H"], h: Int[Array, " B"]):
    """Continuations from the datastore: (sequences [B, S, L], valid [B, S, L])."""
    from jaxspec.drafting.datastore import lookup_interval

    B, H = history.shape
    Q, S, L = cfg.max_query, cfg.datastore_matches, cfg.branch_length
    qidx = h[:, None] - Q + jnp.arange(Q, dtype=jnp.int32)[None]
    query = jnp.where(qidx >= 0, jnp.take_along_axis(history, jnp.clip(qidx, 0, H - 1), axis=1), -1)
    slot = jnp.arange(S, dtype=jnp.int32)[None]  # [1, S]
    filled = jnp.zeros((B,), jnp.int32)
    pos = jnp.full((B, S), -1, jnp.int32)  # corpus position of each slot's continuation
    n_idx = ds.index.shape[0]
    for m in range(Q, 0, -1):
        lo, hi = lookup_interval(ds, query[:, Q - m :])
        n = jnp.maximum(hi - lo, 0)
        # back off only while too few are filled; this level takes the free slots it can fill
        take = jnp.where(filled < cfg.min_datastore_matches, jnp.minimum(n, S - filled), 0)
        i = slot - filled[:, None]  # index within this level
        mine = (i >= 0) & (i < take[:, None])
        at = lo[:, None] + (i * n[:, None]) // jnp.maximum(take[:, None], 1)
        p = ds.index[jnp.clip(at, 0, n_idx - 1)] + m
        pos = jnp.where(mine, p, pos)
        filled = filled + take
    idx = pos[:, :, None] + jnp.arange(L, dtype=jnp.int32)[None, None]
    tok = ds.tokens[jnp.clip(idx, 0, ds.tokens.shape[0] - 1)]
    ok = (pos[:, :, None] >= 0) & (tok >= 0)
    return tok, _prefix_valid(ok)


def _lcp(seqs: Int[Array, "B R L"], valid: Bool[Array, "B R L"]) -> Int[Array, "B R R"]:
    """Length of the common valid prefix of every pair of sequences."""
    eq = (seqs[:, :, None] == seqs[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    return jnp.cumprod(eq.astype(jnp.int32), axis=-1).sum(-1)


def build_tree(
    cfg: NgramConfig,
    seqs: Int[Array, "B R L"],
    valid: Bool[Array, "B R L"],
    group: tuple[int, ...],
    base: tuple[float, ...],
    disc: tuple[float, ...],
    root: Int[Array, " B"],
    prior: tuple[float, ...] | None = None,
):
    """The N best distinct prefixes of the sequences as a token tree (module docstring).
    `group[r]` names sequence r's source group; `base[g]`, `disc[g]`, `prior[g]` (default 0) its
    score constants."""
    B, R, L = seqs.shape
    N = cfg.num_nodes
    g = jnp.asarray(group, jnp.int32)
    lcp = _lcp(seqs, valid)  # [B, R, R]
    d = jnp.arange(L, dtype=jnp.int32)
    shares = lcp[..., None] >= (d + 1)  # [B, r, r', d]: r' has r's prefix of length d + 1
    same = (g[:, None] == g[None, :])[None, :, :, None]
    count = jnp.sum(shares & same, axis=2).astype(jnp.float32)  # [B, R, L]
    total = jnp.sum(valid[:, :, 0][:, None, :] & (g[:, None] == g[None, :])[None], axis=2)
    prior = (0.0,) * len(base) if prior is None else prior
    denom = jnp.maximum(total, 1).astype(jnp.float32) + jnp.asarray(prior, jnp.float32)[g]
    scale = jnp.asarray(base, jnp.float32)[g] / denom
    decay = jnp.asarray(disc, jnp.float32)[g][:, None] ** d[None].astype(jnp.float32)  # [R, L]
    score = jnp.where(valid, decay[None] * count * scale[:, :, None], -1.0)
    best = jnp.max(jnp.where(shares, score[:, None, :, :], -1.0), axis=2)  # [B, R, L]
    rep = jnp.argmax(shares, axis=2) == jnp.arange(R)[None, :, None]  # first holder of a prefix
    cand = jnp.where(valid & rep, best, -1.0)
    flat = cand.transpose(0, 2, 1).reshape(B, L * R)  # depth-major: shallower ties win
    if L * R < N:  # fewer candidate prefixes than nodes: the rest stay unused
        flat = jnp.pad(flat, ((0, 0), (0, N - L * R)), constant_values=-1.0)
    val, sel = jax.lax.top_k(flat, N)
    ok = val > 0
    sel = jnp.minimum(sel, L * R - 1)
    sd, sr = sel // R, sel % R  # depth (0-based) and sequence of each chosen node
    rows = jnp.arange(B)[:, None]
    tok = seqs[rows, sr, sd]
    # ancestor-or-self among chosen nodes: j's prefix is a prefix of i's
    lcp_ij = lcp[rows[:, :, None], sr[:, :, None], sr[:, None, :]]  # [B, N, N]
    anc = (sd[:, None, :] <= sd[:, :, None]) & (lcp_ij >= sd[:, None, :] + 1)
    anc = anc & ok[:, None, :] & ok[:, :, None]
    # valid iff every ancestor depth 0..sd-1 is present (closure; holds by construction)
    ok = ok & (jnp.sum(anc, axis=2) == sd + 1)
    anc = anc & ok[:, None, :] & ok[:, :, None]
    parent_col = jnp.argmax(anc & (sd[:, None, :] == sd[:, :, None] - 1), axis=2) + 1
    parent = jnp.where(ok, jnp.where(sd == 0, 0, parent_col), -1)
    depth = jnp.where(ok, sd + 1, 0)
    eye = jnp.eye(N + 1, dtype=bool)[None]
    full = jnp.zeros((B, N + 1, N + 1), bool).at[:, 1:, 1:].set(anc)
    full = full.at[:, 1:, 0].set(ok) | eye
    tokens = jnp.concatenate([root[:, None], jnp.where(ok, tok, 0)], axis=1)
    parents = jnp.concatenate([jnp.full((B, 1), -1, jnp.int32), parent.astype(jnp.int32)], 1)
    depths = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), depth.astype(jnp.int32)], axis=1)
    scores = jnp.concatenate([jnp.ones((B, 1), jnp.float32), jnp.where(ok, val, 0.0)], axis=1)
    return tokens, parents, depths, full, scores


def ngram_tree(
    cfg: NgramConfig,
    history: Int[Array, "B H"],
    h: Int[Array, " B"],
    datastore=None,
) -> tuple[
    Int[Array, "B N1"],
    Int[Array, "B N1"],
    Int[Array, "B N1"],
    Bool[Array, "B N1 N1"],
    Float[Array, "B N1"],
]:
    """(tokens, parents, depths, ancestor mask, scores) of each row's candidate tree; see the
    module docstring. `h[b]` is the row's history length (its root is `history[b, h - 1]`)."""
    Q, K = cfg.max_query, min(cfg.matches_per_length, history.shape[1])
    seqs, valid = history_groups(cfg, history, h)
    group = tuple(m for m in range(Q) for _ in range(K))
    base = (cfg.history_base,) * Q
    disc = tuple(cfg.history_discount + 0.1 * (m + 1) for m in range(Q))
    if datastore is not None:
        ds_seqs, ds_valid = datastore_group(cfg, datastore, history, h)
        seqs = jnp.concatenate([seqs, ds_seqs], axis=1)
        valid = jnp.concatenate([valid, ds_valid], axis=1)
        group += (Q,) * ds_seqs.shape[1]
        base, disc = base + (1.0,), disc + (1.0,)
    prior = (0.0,) * Q + (cfg.datastore_prior,)
    root = jnp.take_along_axis(history, jnp.maximum(h - 1, 0)[:, None], axis=1)[:, 0]
    return build_tree(cfg, seqs, valid, group, base, disc, root, prior[: len(base)])


def expected_accepted(cfg: NgramConfig, scores: Float[Array, "B N1"]) -> Float[Array, "B N1"]:
    """E[accepted tokens] of each row's tree cut to its w best nodes, for w = 0..N: the sum of the
    nodes' acceptance probabilities (a greedy / point-mass node is accepted iff its whole
    prefix is; the expected length of the accepted path is the sum over nodes of P(accepted))."""
    xs = jnp.asarray([k[0] for k in cfg.accept_knots], jnp.float32)
    ys = jnp.asarray([k[1] for k in cfg.accept_knots], jnp.float32)
    node = scores[:, 1:]
    p = jnp.where(node > 0, jnp.interp(node, xs, ys), 0.0)
    return jnp.concatenate([jnp.zeros_like(p[:, :1]), jnp.cumsum(p, axis=1)], axis=1)


def choose_width(
    cfg: NgramConfig,
    scores: Float[Array, "B N1"],
    live: Bool[Array, " B"],
    remaining: Int[Array, " B"] | None = None,
):
    """Index into `cfg.widths` of this step's verify width: the argmax over w of
    Σ_rows (1 + E[accepted | w best nodes]) ÷ width_cost[w] (one width for the batch: the
    forward's shape is shared), the sum over the live rows, or for `cfg.objective == "slowest"`
    over the live rows with the most `remaining` tokens to emit. Rows with empty trees predict
    1 token at any width, so a batch of weak or empty trees decodes autoregressively when
    width 0 is offered."""
    cum = expected_accepted(cfg, scores)  # [B, N + 1]
    rows = live
    if cfg.objective == "slowest" and remaining is not None:
        most = jnp.max(jnp.where(live, remaining, jnp.iinfo(jnp.int32).min))
        rows = live & (remaining == most)
    tokens = jnp.sum(jnp.where(rows[:, None], 1.0 + cum, 0.0), axis=0)  # [N + 1]
    value = tokens[jnp.asarray(cfg.widths)] / jnp.asarray(cfg.width_cost, jnp.float32)
    return jnp.argmax(value).astype(jnp.int32)


def children_of(
    parents: Int[Array, "B N1"], tokens: Int[Array, "B N1"], cur: Int[Array, " B"], width: int
) -> tuple[Int[Array, "B W"], Int[Array, "B W"]]:
    """The first `width` children of node `cur` per row: (node ids, tokens), −1 past the last."""
    is_kid = parents == cur[:, None]
    order = jnp.argsort(~is_kid, axis=1, stable=True)[:, :width]
    present = jnp.take_along_axis(is_kid, order, axis=1)
    ids = jnp.where(present, order, -1).astype(jnp.int32)
    toks = jnp.where(present, jnp.take_along_axis(tokens, order, axis=1), -1)
    pad = ((0, 0), (0, width - ids.shape[1]))  # a tree cut to fewer nodes than `width`
    return jnp.pad(ids, pad, constant_values=-1), jnp.pad(toks, pad, constant_values=-1)
