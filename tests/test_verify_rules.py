"""Node rules are lossless, checked by exact enumeration (no Monte Carlo) on tiny vocabularies.

For a rule and its proposal, every child tuple is listed with its exact probability, computed here
in float64 from q (independently of the draw functions). Each tuple becomes one batch row of a
single jitted call of the rule; combining tuple probability x NodeResult gives the exact output
law, which must equal p to float32 round-off. Cases: Dirichlet p/q (0.1-2), mixtures, p and q
with zeros, peaked q (logits x 50), p one-hot, q = p, ties in argmax q, fewer nonzero q than
children. Negative controls show the check catches wrong pairings of proposal and rule.
The samplers are checked against the same analytic laws (total variation on 20k draws).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.errors import InputError
from jaxspec.verify import (
    HUB_THRESHOLD,
    NodeResult,
    check_distinct_siblings,
    dedup_siblings,
    draw_iid,
    draw_select,
    draw_spechub,
    draw_swor,
    draw_topk,
    greedy,
    hub_flag,
    point_mass,
    rrs,
    sample_node,
    select_rule,
    sequential,
    softmax,
    spechub,
    swor,
)

TOL = 2e-6  # max |output(x) - p(x)| for float32 rules
MAX_ERR: dict[str, float] = {}  # worst enumeration error per rule (printed with -s)


# ----------------------------------------------------------------------------- cases


def softmax64(z):
    z = np.asarray(z, np.float64)
    if not np.isfinite(z).any():
        return np.zeros_like(z)
    e = np.exp(z - z[np.isfinite(z)].max())
    return e / e.sum()


def logits_of(q):
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(q, np.float64)).astype(np.float32)


def make_cases(V, seed):
    """(name, p f32[V], draft logits f32[V]) covering the regimes of ALGORITHMS.md §0.5 / §3(c)."""
    rng = np.random.default_rng(seed)
    dr = lambda c: rng.dirichlet(np.full(V, c))  # noqa: E731
    cases = []
    for c in (0.1, 0.5, 2.0):
        cases.append((f"dirichlet{c}", dr(c), logits_of(dr(c))))
    p = dr(1.0)
    cases.append(("mixture", p, logits_of(0.7 * p + 0.3 * dr(1.0))))
    p = dr(1.0)
    p[np.argsort(p)[: V // 2]] = 0  # top-p zeros
    cases.append(("p_zeros", p, logits_of(dr(1.0))))
    q = dr(1.0)
    q[np.argsort(q)[:2]] = 0
    cases.append(("q_zeros", dr(1.0), logits_of(q)))
    cases.append(("q_peaked", dr(0.5), (50 * rng.standard_normal(V)).astype(np.float32)))
    z = (3 * rng.standard_normal(V)).astype(np.float32)
    p = softmax64(z + rng.standard_normal(V))
    p[np.argmax(z)] = 0  # top-p removed the draft's favourite
    cases.append(("p_zero_at_q_top", p, z))
    cases.append(("p_onehot", np.eye(V)[rng.integers(V)], logits_of(dr(1.0))))
    p = dr(0.5)
    cases.append(("q_equals_p", p, logits_of(p)))
    q = np.zeros(V)
    q[rng.choice(V, 2, replace=False)] = [0.6, 0.4]
    cases.append(("q_two_tokens", dr(1.0), logits_of(q)))
    z = rng.standard_normal(V).astype(np.float32)
    z[[1, 3]] = z.max() + 1  # tie at the top of q
    cases.append(("q_tie", dr(1.0), z))
    cases.append(("q_onehot", dr(1.0), logits_of(np.eye(V)[rng.integers(V)])))
    out = []
    for name, p, z in cases:
        p = np.asarray(p, np.float64)
        out.append((name, (p / p.sum()).astype(np.float32), np.asarray(z, np.float32)))
    return out


# ----------------------------------------------------------------------------- proposal laws


def law_iid(z, k):
    q = softmax64(z)
    for t in itertools.product(range(len(q)), repeat=k):
        yield float(np.prod(q[list(t)])), t


def law_swor(z, k, prefix=(), pr=1.0):
    """Sequential draws from q renormalised without earlier children; -1 once nothing is left."""
    if len(prefix) == k:
        yield pr, prefix
        return
    zz = np.array(z, np.float64)
    zz[[x for x in prefix if x >= 0]] = -np.inf
    qj = softmax64(zz)
    if qj.sum() == 0:
        yield pr, prefix + (-1,) * (k - len(prefix))
        return
    for x in np.flatnonzero(qj > 0):
        yield from law_swor(z, k, prefix + (int(x),), pr * qj[x])


def law_hub(z, k=2):
    """Q(i, a) = q(i), Q(a, i) = q(a) q(i) / (1 - q(a)) = q(a) softmax(masked)(i);
    (a, -1) when q has no token besides the hub."""
    q, a = softmax64(z), int(np.argmax(z))
    zm = np.array(z, np.float64)
    zm[a] = -np.inf
    qm = softmax64(zm)
    if qm.sum() == 0:
        yield 1.0, (a, -1)
        return
    for i in range(len(q)):
        if i != a:
            yield q[i], (i, a)
            yield q[a] * qm[i], (a, i)


def law_topk(z, k):
    order = np.argsort(-np.asarray(z, np.float64), kind="stable")[:k]
    yield 1.0, tuple(int(x) if np.isfinite(z[x]) else -1 for x in order)


def law_fixed(children):
    return lambda z, k: iter([(1.0, tuple(children))])


# ----------------------------------------------------------------------------- enumeration


_jit = {}


def jitted(fn):
    if fn not in _jit:
        _jit[fn] = jax.jit(fn)
    return _jit[fn]


def enumerate_rule(rule, law, cases, k, needs_q=True):
    """Exact output law of (law, rule) for every case, in ONE batched jitted call.

    Returns out f64[cases, V], p f64[cases, V], acc f64[cases, k] (per-rank acceptance)."""
    V = len(cases[0][1])
    T = V**k  # every law has at most V^k tuples; pad with zero-weight rows (fixed shape)
    P, Z, CH, W = [], [], [], []
    for _, p, z in cases:
        tuples = [(w, t) for w, t in law(z, k) if w > 0]
        assert 0 < len(tuples) <= T and abs(sum(w for w, _ in tuples) - 1) < 1e-9
        tuples += [(0.0, (-1,) * k)] * (T - len(tuples))
        for w, t in tuples:
            P.append(p), Z.append(z), CH.append(t), W.append(w)
    P, Z, CH = np.stack(P), np.stack(Z), np.asarray(CH, np.int32)
    args = (P, Z, CH) if needs_q else (P, CH)
    res = jitted(rule)(*map(jnp.asarray, args))
    acc = np.asarray(res.accept, np.float64)
    resid = np.asarray(res.residual, np.float64)
    assert acc.shape == CH.shape and resid.shape == P.shape
    assert np.all(np.isfinite(acc)) and np.all(np.isfinite(resid))
    assert np.all(acc >= 0) and np.all(acc.sum(-1) <= 1 + 1e-6) and np.all(acc[CH < 0] == 0)
    assert np.allclose(resid.sum(-1), 1, atol=1e-5) and np.all(resid >= 0)
    W = np.asarray(W)
    out = np.zeros_like(resid)
    np.add.at(out, (np.arange(len(W))[:, None].repeat(k, 1), np.maximum(CH, 0)), W[:, None] * acc)
    out += (W * (1 - acc.sum(-1)))[:, None] * resid
    n = len(cases)
    out = out.reshape(n, T, V).sum(1)
    acc_rank = (W[:, None] * acc).reshape(n, T, k).sum(1)
    p64 = np.stack([c[1] for c in cases]).astype(np.float64)
    return out, p64 / p64.sum(-1, keepdims=True), acc_rank


def max_err(out, p):
    return np.abs(out - p).max(-1)  # per case


def assert_lossless(name, out, p, cases):
    err = max_err(out, p)
    MAX_ERR[name] = max(MAX_ERR.get(name, 0.0), float(err.max()))
    bad = [(c[0], float(e)) for c, e in zip(cases, err, strict=True) if not e < TOL]
    assert not bad, f"{name}: output != p for {bad}"


# ----------------------------------------------------------------------------- losslessness


@pytest.mark.parametrize("V,k", [(4, 1), (5, 2), (6, 3), (4, 3)])
def test_rrs_exact(V, k):
    cases = make_cases(V, seed=10 * V + k)
    out, p, _ = enumerate_rule(rrs, law_iid, cases, k)
    assert_lossless("rrs", out, p, cases)


@pytest.mark.parametrize("V,k", [(4, 1), (5, 2), (6, 3), (4, 3)])
def test_swor_exact(V, k):
    cases = make_cases(V, seed=20 * V + k)
    out, p, acc = enumerate_rule(swor, law_swor, cases, k)
    assert_lossless("swor", out, p, cases)
    names = [c[0] for c in cases]
    # Robustness (ALGORITHMS.md §4(b)): q = p accepts child 1 surely
    assert acc[names.index("q_equals_p"), 0] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("V", [4, 5, 6])
def test_spechub_exact(V):
    cases = make_cases(V, seed=30 + V)
    out, p, _ = enumerate_rule(spechub, law_hub, cases, 2)
    assert_lossless("spechub", out, p, cases)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_point_mass_exact_for_every_fixed_tuple(k):
    """Point mass is lossless for ANY fixed child tuple: distinct, with -1, or with duplicates."""
    p_cases = make_cases(5, seed=40 + k)[:8]
    tuples = list(itertools.permutations(range(5), k))[::3] + [(-1,) * k]
    if k >= 2:
        tuples += [(2, 2, 0)[:k], (4, -1, 4)[:k]]  # duplicates: the repeat gets probability 0
    for t in tuples:
        out, p, acc = enumerate_rule(point_mass, law_fixed(t), p_cases, k, needs_q=False)
        assert_lossless("point_mass", out, p, [(f"{n}{t}", p, z) for n, p, z in p_cases])
        # per-rank closed form: a distinct child x_j is accepted with total probability p(x_j)
        for j, x in enumerate(t):
            first = x >= 0 and x not in t[:j]
            want = p[:, x] if first else np.zeros(len(p_cases))
            np.testing.assert_allclose(acc[:, j], want, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3])
def test_point_mass_with_topk_drafts(k):
    cases = make_cases(6, seed=50 + k)
    out, p, _ = enumerate_rule(
        lambda p, z, c: point_mass(p, c), lambda z, k: law_topk(z, k), cases, k
    )
    assert_lossless("point_mass", out, p, cases)


def test_greedy_exact():
    V, k = 5, 2
    cases = make_cases(V, seed=60)
    cases.append(("p_tie", np.array([0.1, 0.4, 0.1, 0.4, 0.0], np.float32), cases[0][2]))
    out, p, _ = enumerate_rule(greedy, law_iid, cases, k, needs_q=False)
    want = np.eye(V)[np.argmax(p, -1)]  # first index on ties
    np.testing.assert_allclose(out, want, atol=1e-6)


def test_select_rule_exact_and_flag():
    """SpecHub where q(a) >= 0.3 else SWOR, flag from q only: lossless with matching drafts."""
    assert HUB_THRESHOLD == 0.3
    V = 5
    cases = make_cases(V, seed=70)
    flags = np.asarray(hub_flag(jnp.asarray(np.stack([c[2] for c in cases]))))
    assert flags.any() and not flags.all()  # both branches exercised
    flag_of = {c[2].tobytes(): f for c, f in zip(cases, flags, strict=True)}

    def law(z, k):
        return law_hub(z) if flag_of[z.tobytes()] else law_swor(z, k)

    out, p, _ = enumerate_rule(select_rule, law, cases, 2)
    assert_lossless("select_rule", out, p, cases)
    # row-wise it is exactly one of the two rules
    P, Z = (jnp.asarray(np.stack([c[i] for c in cases])) for i in (1, 2))
    ch = jnp.asarray(np.stack([list(next(law(c[2], 2))[1]) for c in cases]), jnp.int32)
    sel, hub, sw = (jitted(r)(P, Z, ch) for r in (select_rule, spechub, swor))
    want = np.where(flags[:, None], hub.accept, sw.accept)
    np.testing.assert_array_equal(sel.accept, want)


# ----------------------------------------------------------------------------- closed forms


def test_closed_form_acceptance():
    V = 6
    cases = make_cases(V, seed=80)
    P = np.stack([c[1] for c in cases]).astype(np.float64)
    Q = np.stack([softmax64(c[2]) for c in cases])
    mins = np.minimum(P, Q).sum(-1)  # single-draft rate, = child-1 rate of every sequential rule

    _, _, acc1 = enumerate_rule(rrs, law_iid, cases, 1)
    np.testing.assert_allclose(acc1[:, 0], mins, atol=1e-6)
    _, _, acc_r = enumerate_rule(rrs, law_iid, cases, 2)
    _, _, acc_s = enumerate_rule(swor, law_swor, cases, 2)
    _, _, acc_h = enumerate_rule(spechub, law_hub, cases, 2)
    np.testing.assert_allclose(acc_r[:, 0], mins, atol=1e-6)
    np.testing.assert_allclose(acc_s[:, 0], mins, atol=1e-6)

    for c, (p, q) in enumerate(zip(P, Q, strict=True)):
        left = np.maximum(p - q, 0)
        r = left / left.sum() if left.sum() > 0 else p
        # RRS (§3(b)): α1 + (1 − α1) Σ min(q, r)
        want = mins[c] + (1 - mins[c]) * np.minimum(q, r).sum()
        assert acc_r[c].sum() == pytest.approx(want, abs=1e-6), cases[c][0]
        # SWOR k = 2: Σ_x1 min(q, p)(x1) + (q(x1) − min(q, p)(x1)) Σ min(q(.|≠x1), r)
        want = 0.0
        for x1 in np.flatnonzero(q > 0):
            q2 = np.where(np.arange(V) == x1, 0, q)
            q2 = q2 / q2.sum() if q2.sum() > 0 else q2
            m = min(q[x1], p[x1])
            want += m + (q[x1] - m) * np.minimum(q2, r).sum()
        assert acc_s[c].sum() == pytest.approx(want, abs=1e-6), cases[c][0]
        # SpecHub (§3(b)): p(a) + Σ_{x≠a} min(p(x), q(x)/(1 − q(a)))
        z = cases[c][2].astype(np.float64)
        a = int(np.argmax(z))
        zm = z.copy()
        zm[a] = -np.inf
        want = p[a] + np.delete(np.minimum(p, softmax64(zm)), a).sum()
        assert acc_h[c].sum() == pytest.approx(want, abs=1e-6), cases[c][0]


# ----------------------------------------------------------------------------- negative controls


def deviation(rule, law, cases, k, needs_q=True):
    out, p, _ = enumerate_rule(rule, law, cases, k, needs_q)
    return float(max_err(out, p).max())


def test_negative_controls_are_caught():
    cases = make_cases(5, seed=90)[:6]
    # SWOR drafts verified as if drawn with replacement (q_j = q)
    assert deviation(rrs, law_swor, cases, 2) > 100 * TOL
    # deterministic top-k drafts verified with SWOR's q_j (children were not drawn from q)
    assert deviation(swor, law_topk, cases, 2) > 100 * TOL
    # SpecHub pairs verified by SWOR (drafter/verifier hub-flag mismatch)
    assert deviation(swor, law_hub, cases, 2) > 100 * TOL
    # RRS drafts verified by SpecHub
    assert deviation(spechub, law_iid, cases, 2) > 100 * TOL


def naive_swor(p, z, children):
    """WRONG in float32: SWOR with q_j = q(not removed) / (1 - Σ q(removed)) instead of a softmax
    of masked logits; for a confident draft 1 - q(a) is rounding noise or exactly 0."""
    q, V = softmax(z), p.shape[-1]

    def proposal(removed, x, valid):
        kept = 1.0 - jnp.where(removed, q, 0.0).sum(-1, keepdims=True)
        drop = valid[:, None] & (jnp.arange(V)[None] == x[:, None])
        return jnp.where(removed, 0.0, q) / kept, removed | drop

    return sequential(p, children, proposal, jnp.zeros(p.shape, bool))


def test_negative_control_naive_renormalisation():
    rng = np.random.default_rng(92)
    cases = [
        (f"peaked{i}", rng.dirichlet(np.ones(5) * 0.5).astype(np.float32), 10 * z)
        for i, z in enumerate(rng.standard_normal((8, 5)).astype(np.float32))
    ]
    assert deviation(naive_swor, law_swor, cases, 3) > 0.01
    out, p, _ = enumerate_rule(swor, law_swor, cases, 3)
    assert_lossless("swor", out, p, cases)


def inverse_cdf_walk(p, children):
    """WRONG with duplicates (§6.3): one uniform, accept the first j with u <= Σ_{l<=j} p(x_l);
    the residual is p with the children zeroed."""
    pk = jnp.take_along_axis(p, jnp.maximum(children, 0), -1) * (children >= 0)
    cum = jnp.minimum(jnp.cumsum(pk, -1), 1.0)
    acc = jnp.diff(cum, prepend=0.0, axis=-1)
    hit = jax.vmap(lambda c: jnp.zeros(p.shape[-1], bool).at[c].set(True, mode="drop"))(children)
    res = jnp.where(hit, 0.0, p)
    return NodeResult(acc, res / res.sum(-1, keepdims=True))


def test_negative_control_duplicate_point_mass():
    cases = make_cases(5, seed=91)[:6]
    dup = law_fixed((1, 1, 3))
    assert deviation(inverse_cdf_walk, dup, cases, 3, needs_q=False) > 0.01
    assert deviation(inverse_cdf_walk, law_fixed((1, 0, 3)), cases, 3, needs_q=False) < TOL
    assert deviation(point_mass, dup, cases, 3, needs_q=False) < TOL


# ----------------------------------------------------------------------------- properties


def test_invalid_child_is_skipped():
    """A -1 child has probability 0 and changes nothing for the children after it."""
    rng = np.random.default_rng(3)
    p = jnp.asarray(rng.dirichlet(np.ones(6), 3), jnp.float32)
    z = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)
    with_gap = jnp.asarray([[2, -1, 4], [0, -1, 5], [3, -1, 1]], jnp.int32)
    without = with_gap[:, [0, 2]]
    for rule in (rrs, swor, lambda p, z, c: point_mass(p, c)):
        rule = jax.jit(rule)
        a, b = rule(p, z, with_gap), rule(p, z, without)
        np.testing.assert_allclose(a.accept[:, [0, 2]], b.accept, atol=1e-7)
        np.testing.assert_array_equal(a.accept[:, 1], 0.0)
        np.testing.assert_allclose(a.residual, b.residual, atol=1e-7)


def test_batched_rows_are_independent():
    """B = 3 rows with different p / q in one jitted call == each row alone."""
    cases = make_cases(6, seed=4)
    rows = [cases[0], cases[6], cases[4]]  # dirichlet, peaked q, p with zeros
    P, Z = (jnp.asarray(np.stack([r[i] for r in rows])) for i in (1, 2))
    ch = jnp.asarray([[1, 4], [np.argmax(rows[1][2]), 2], [5, 0]], jnp.int32)
    rules = {
        "rrs": rrs,
        "swor": swor,
        "spechub": spechub,
        "select": select_rule,
        "point_mass": lambda p, z, c: point_mass(p, c),
        "greedy": lambda p, z, c: greedy(p, c),
    }
    for name, rule in rules.items():
        rule = jax.jit(rule)
        batched = rule(P, Z, ch)
        for b in range(3):
            alone = rule(P[b : b + 1], Z[b : b + 1], ch[b : b + 1])
            for x, y in zip(jax.tree.leaves(batched), jax.tree.leaves(alone), strict=True):
                np.testing.assert_allclose(x[b], y[0], atol=1e-7, err_msg=name)


def test_dedup_and_check_siblings():
    ch = jnp.asarray([[3, 3, 1, -1, 1], [0, 1, 2, 3, 4], [-1, -1, 2, 2, 2]], jnp.int32)
    got = jax.jit(dedup_siblings)(ch)
    np.testing.assert_array_equal(got, [[3, -1, 1, -1, -1], [0, 1, 2, 3, 4], [-1, -1, 2, -1, -1]])
    check_distinct_siblings(got)
    check_distinct_siblings(np.asarray([[-1, -1, 0]]))
    with pytest.raises(InputError, match="row 0 repeats \\[1, 3\\]"):
        check_distinct_siblings(np.asarray(ch))


# ----------------------------------------------------------------------------- samplers

N_DRAWS = 20_000


def tv_bound(law, n):
    """E[TV] <= ½ Σ sqrt(2 w / (π n)), plus 5 sd of TV (each draw moves TV by at most 1/n)."""
    w = np.asarray(law)
    return 0.5 * np.sqrt(2 / (np.pi * n)) * np.sqrt(w).sum() + 5 * 0.5 / np.sqrt(n)


def check_frequencies(draws, law):
    law = dict((t, w) for w, t in law if w > 0)
    keys, counts = np.unique(np.asarray(draws), axis=0, return_counts=True)
    freq = {tuple(int(v) for v in k): c / len(draws) for k, c in zip(keys, counts, strict=True)}
    assert set(freq) <= set(law), f"impossible tuples drawn: {set(freq) - set(law)}"
    tv = 0.5 * sum(abs(freq.get(t, 0.0) - w) for t, w in law.items())
    assert tv < tv_bound(list(law.values()), len(draws)), tv


def tiled(z):
    return jnp.tile(jnp.asarray(z, jnp.float32)[None], (N_DRAWS, 1))


def test_draw_iid_matches_law():
    z = logits_of([0.5, 0.3, 0.15, 0.05])
    draws = jax.jit(draw_iid, static_argnums=1)(tiled(z), 2, jax.random.key(0))
    check_frequencies(draws, law_iid(z, 2))


def test_draw_swor_matches_law():
    z = logits_of([0.45, 0.3, 0.0, 0.15, 0.1])
    draws = np.asarray(jax.jit(draw_swor, static_argnums=1)(tiled(z), 3, jax.random.key(1)))
    check_frequencies(draws, law_swor(z, 3))
    assert all(len(set(row)) == 3 for row in draws.tolist())  # never repeats
    z = logits_of([0.0, 0.7, 0.0, 0.3, 0.0])  # fewer nonzero tokens than children
    draws = np.asarray(draw_swor(jnp.asarray(np.stack([z] * 200)), 3, jax.random.key(2)))
    assert np.all(draws[:, 2] == -1) and np.all(np.sort(draws[:, :2], 1) == [1, 3])


def test_draw_spechub_matches_law():
    z = logits_of([0.1, 0.45, 0.2, 0.15, 0.1])
    draws = jax.jit(draw_spechub)(tiled(z), jax.random.key(3))
    check_frequencies(draws, law_hub(z))
    peaked = (50 * np.random.default_rng(0).standard_normal(5)).astype(np.float32)
    draws = np.asarray(draw_spechub(jnp.asarray(np.stack([peaked] * 50)), jax.random.key(4)))
    assert np.all(draws[:, 0] == np.argmax(peaked)) and np.all(draws[:, 1] >= 0)
    onehot = logits_of([0, 0, 1.0, 0, 0])
    draws = np.asarray(draw_spechub(jnp.asarray(np.stack([onehot] * 50)), jax.random.key(5)))
    assert np.all(draws == [2, -1])  # q has only the hub: lone child


def test_draw_topk_and_select():
    z = np.array([[0.1, 2.0, -np.inf, 1.0], [5.0, -np.inf, -np.inf, -np.inf]], np.float32)
    np.testing.assert_array_equal(draw_topk(jnp.asarray(z), 3), [[1, 3, 0], [0, -1, -1]])
    zz = jnp.asarray(np.random.default_rng(1).standard_normal((64, 6)), jnp.float32)
    key = jax.random.key(6)
    flag = jnp.arange(64) % 2 == 0
    got = jax.jit(draw_select)(zz, key, flag)
    want = np.where(flag[:, None], draw_spechub(zz, key), draw_swor(zz, 2, key))
    np.testing.assert_array_equal(got, want)


def test_sample_node_matches_result():
    V = 5
    _, p, z = make_cases(V, seed=7)[2]  # Dirichlet(2)
    ch = jnp.asarray([[3, -1, 1]] * N_DRAWS, jnp.int32)
    res = jax.jit(point_mass)(jnp.asarray(np.stack([p] * N_DRAWS)), ch)
    child, bonus = jax.jit(sample_node)(res, ch, jax.random.key(8))
    child, bonus = np.asarray(child), np.asarray(bonus)
    assert not np.any(child == 1)  # invalid child never picked
    assert np.all(ch[np.arange(N_DRAWS), np.maximum(child, 0)] >= 0)
    # cells: child 0, child 2, none x bonus token
    acc, resid = np.asarray(res.accept[0], np.float64), np.asarray(res.residual[0], np.float64)
    law = [acc[0], acc[2]] + list((1 - acc.sum()) * resid)
    cell = np.where(child == 0, 0, np.where(child == 2, 1, 2 + bonus))
    freq = np.bincount(cell, minlength=len(law)) / N_DRAWS
    assert 0.5 * np.abs(freq - law).sum() < tv_bound(law, N_DRAWS)
    # chi-square with cells of expected count >= 5 (dof ~ 6): far below a 1e-4 tail
    e = np.asarray(law) * N_DRAWS
    m = e >= 5
    chi2 = (((freq * N_DRAWS)[m] - e[m]) ** 2 / e[m]).sum()
    assert chi2 < 30, chi2
    # fresh keys give fresh draws
    c2, b2 = jax.jit(sample_node)(res, ch, jax.random.key(9))
    assert not np.array_equal(c2, child) and not np.array_equal(b2, bonus)


def test_report_max_errors():
    """Runs last: print the worst enumeration error per rule (visible with -s)."""
    print("\nmax |output - p| per rule:", {k: f"{v:.2e}" for k, v in sorted(MAX_ERR.items())})
