"""MagicDec's compact draft cache (`jaxspec/magicdec.py`) on tiny fp32 models.

* Greedy losslessness: self-speculation (copy and streaming builders) and a separate draft model
  emit exactly the AR greedy tokens, for chains and trees, in ragged batches whose windows slide
  many times (budget 16 ≪ prompt + output).
* All-accepted case: with a budget that holds the whole context the self-draft IS the target, so
  every step accepts the full depth (the next step's root is the bonus token and the path's KV
  was committed: no "double buffer" off-by-one can hide).
* Sliding-window bookkeeping against a reference of sink + window semantics, after many commits
  of random sizes: the valid slots hold exactly positions [0, F) ∪ [total − W, total), each in
  its ring slot, and `prepare` re-indexes the sinks to sit just before the window.
* The streaming prefill with a budget larger than the prompt is the dense prefill.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_speculative import batch  # random prompts of the tiny vocabulary (shared by CFGs)

from jaxspec import magicdec
from jaxspec.errors import ConfigError
from jaxspec.generate import prefill_cache
from jaxspec.kv_cache import KVCache
from jaxspec.magicdec import MagicDec
from jaxspec.model import init_params, unrolled
from jaxspec.model.layers import apply_rope, rope_inv_freq
from jaxspec.sampling import SamplingParams
from jaxspec.speculative import SpecConfig, spec_generate
from jaxspec.testing import TINY
from jaxspec.trees import chain, kary, load_tree

CFG = dataclasses.replace(TINY, num_layers=3)
PARAMS = init_params(CFG, jax.random.key(0), scale=0.5)
OTHER = init_params(CFG, jax.random.key(1), scale=0.5)
LENGTHS = [3, 30, 9, 25]
MAX_NEW = [40, 11, 40, 33]


def run(spec, draft_params, lengths=LENGTHS, max_new=MAX_NEW, params=PARAMS):
    prompts, lens = batch(lengths, seed=1)
    st = spec_generate(params, draft_params, prompts, lens, jax.random.key(0),
                       SamplingParams.make(len(lengths)), jnp.asarray(max_new), spec=spec,
                       max_new_tokens=40, chunk=8)  # fmt: skip
    toks, n = np.asarray(st.tokens), np.asarray(st.n_out)
    return [toks[i, : n[i]].tolist() for i in range(len(lengths))], st


AR = None


def ar_tokens():
    global AR
    if AR is None:
        AR = run(SpecConfig(CFG, CFG, chain(0)), PARAMS)[0]
    return AR


@pytest.mark.parametrize(
    "builder,self_draft,tree",
    [
        ("copy", True, "chain3"),
        ("copy", True, "kary2x2"),
        ("streaming", True, "chain3"),
        ("streaming", True, "irregular9"),
        ("snapkv", True, "chain3"),
        ("snapkv", True, "kary2x2"),
        ("copy", False, "chain2"),
        ("streaming", False, "kary2x2"),
    ],
)
def test_greedy_equals_autoregressive(builder, self_draft, tree):
    trees = {"chain2": chain(2), "chain3": chain(3), "kary2x2": kary(2, 2),
             "irregular9": load_tree("irregular_9")}  # fmt: skip
    md = MagicDec(budget=16, sink=4, builder=builder, self_draft=self_draft, obs_window=8)
    spec = SpecConfig(CFG, CFG, trees[tree], "greedy", magicdec=md)
    got, st = run(spec, PARAMS if self_draft else OTHER)
    assert got == ar_tokens()
    total = np.asarray(st.cache.lengths)
    assert (np.asarray(st.draft_cache.lengths) == np.minimum(total, 16)).all()
    assert total.max() > 40  # the window slid past the budget


@pytest.mark.parametrize("builder,tree", [("copy", "chain3"), ("streaming", "kary2x2"),
                                          ("snapkv", "chain3")])  # fmt: skip
def test_greedy_equals_autoregressive_with_unrolled_layers(builder, tree):
    """The CPU default: unrolled weights, whose prefill builds a slot-last K target cache that
    the draft cache is copied / selected from and committed into every step."""
    trees = {"chain3": chain(3), "kary2x2": kary(2, 2)}
    md = MagicDec(budget=16, sink=4, builder=builder, obs_window=8)
    spec = SpecConfig(CFG, CFG, trees[tree], "greedy", magicdec=md)
    un = unrolled(PARAMS)
    got, st = run(spec, un, params=un)
    assert got == ar_tokens()
    assert st.cache.k_slot_last
    total = np.asarray(st.cache.lengths)
    assert (np.asarray(st.draft_cache.lengths) == np.minimum(total, 16)).all()
    assert total.max() > 40


@pytest.mark.parametrize("builder", ["copy", "streaming"])
def test_full_budget_self_draft_accepts_everything(builder):
    md = MagicDec(budget=96, sink=4, builder=builder)
    spec = SpecConfig(CFG, CFG, chain(3), "greedy", magicdec=md)
    got, st = run(spec, PARAMS, lengths=[30, 12], max_new=[40, 40])
    assert got == ar_tokens_for([30, 12], [40, 40])
    hist = np.asarray(st.accept_hist).sum(0)
    # every live step accepts all 3 drafts, but a row's last step may be cut short by max_new
    # or EOS (at most one per row)
    assert hist[:3].sum() <= 2 and hist[3] > 0


def ar_tokens_for(lengths, max_new):
    return run(SpecConfig(CFG, CFG, chain(0)), PARAMS, lengths, max_new)[0]


def test_sampling_with_a_sparse_self_draft_is_lossless():
    """T > 0 (SWOR, temperature 0.9, top-p 0.95): the joint of three tokens sampled through a
    sparse self-draft (budget 4 = 2 sinks + 2 window slots < the 5-token prompt, so q ≠ p)
    matches the target's exact joint (chi-square, V = 8)."""
    from tests_helpers_joint import chi_square_ok, exact_joint, sample_counts

    cfg = dataclasses.replace(TINY, vocab_size=8, eos_token_ids=(), num_layers=2)
    target = init_params(cfg, jax.random.key(0), scale=0.6)
    md = MagicDec(budget=4, sink=2)
    counts = sample_counts(target, target, cfg, "swor", chain(1), magicdec=md)
    ok, chi2, dof = chi_square_ok(counts, exact_joint(target, cfg))
    assert ok, (chi2, dof)


def test_sliding_window_bookkeeping_matches_reference():
    """K/V rows that encode their position; random commit sizes; reference: sink + window."""
    md = MagicDec(budget=12, sink=3)
    F, W = md.fixed, md.window
    L, B, K, E = 2, 3, 1, 2
    N1 = 4  # in-flight rows per step
    total = np.array([0, 5, 20])  # committed tokens per row before decoding

    def rows_for(pos):  # [L, B, K, n, E] rows whose value is their position (+ layer offset)
        p = jnp.asarray(pos, jnp.float32)
        val = p[None, :, None, :, None] + 1000 * jnp.arange(L)[:, None, None, None, None]
        return jnp.broadcast_to(val, (L, B, K, p.shape[1], E))

    dense_slots = 64
    pos = np.broadcast_to(np.arange(dense_slots), (B, dense_slots))
    dense = KVCache(k=rows_for(pos), v=-rows_for(pos), lengths=jnp.asarray(total, jnp.int32))
    dcache, ring = magicdec.build_copy(md, dense, scratch=N1)
    rng = np.random.default_rng(0)
    for _ in range(30):
        # in-flight rows at scratch slots n_valid + i hold "positions" total + perm(i); the
        # accepted path idx picks rows in order so that committed row j is position total + j
        count = rng.integers(0, N1 + 1, B)
        nv = np.asarray(dcache.lengths)
        src_pos = total[:, None] + np.arange(N1)[None]
        scratch_k = rows_for(src_pos)
        bi = np.arange(B)[:, None]
        dst = nv[:, None] + np.arange(N1)[None]
        src = dcache.replace(
            k=dcache.k.at[:, bi, :, dst].set(scratch_k.transpose(1, 3, 0, 2, 4)),
            v=dcache.v.at[:, bi, :, dst].set(-scratch_k.transpose(1, 3, 0, 2, 4)),
        )
        idx = jnp.broadcast_to(jnp.arange(N1, dtype=jnp.int32)[None], (B, N1))
        dcache, ring = magicdec.commit(md, src, ring, src, dcache.lengths, idx,
                                       jnp.asarray(count), jnp.asarray(total))  # fmt: skip
        total = total + count
        for b in range(B):
            n = int(dcache.lengths[b])
            held = np.asarray(dcache.k[0, b, 0, :n, 0])
            want = set(range(min(F, total[b]))) | set(range(max(F, total[b] - W), total[b]))
            assert n == min(total[b], md.budget)
            assert sorted(held.tolist()) == sorted(want)
            assert (np.asarray(dcache.v[1, b, 0, :n, 0]) == -(held + 1000)).all()
            for t in want:  # each position in its ring slot
                assert held[t if t < F else F + (t - F) % W] == t
    # prepare: sink keys rotated to positions s + (total − n_valid), from the canonical copy
    fixed = jax.random.normal(jax.random.key(0), (L, B, K, F, 8))
    cfg = dataclasses.replace(CFG, head_dim=8)
    shapes = (L, B, K, md.budget + N1, 8)
    dc = KVCache(k=jnp.zeros(shapes), v=jnp.zeros(shapes), lengths=jnp.zeros((B,), jnp.int32))
    prepped = magicdec.prepare(md, cfg, dc, ring.replace(fixed_k=fixed), jnp.asarray(total))
    shift = total - np.minimum(total, md.budget)
    for b in range(B):
        x = fixed[:, b].transpose(0, 2, 1, 3).reshape(1, L * F, K, 8)
        want = apply_rope(x, jnp.full((1, L * F), shift[b]), rope_inv_freq(cfg))
        got = prepped.k[:, b, :, :F].transpose(0, 2, 1, 3).reshape(1, L * F, K, 8)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_streaming_prefill_with_room_for_everything_is_the_dense_prefill():
    prompts, lens = batch([3, 30, 17], seed=1)
    md = MagicDec(budget=40, sink=4, builder="streaming")
    dc, _ = magicdec.build_streaming(md, PARAMS, CFG, prompts, lens, chunk=8, scratch=4)
    dense, _ = prefill_cache(PARAMS, CFG, prompts, lens, slots=40, chunk=8)
    assert (np.asarray(dc.lengths) == np.asarray(lens)).all()
    for b, n in enumerate([3, 30, 17]):
        np.testing.assert_allclose(np.asarray(dc.k[:, b, :, :n]),
                                   np.asarray(dense.k[:, b, :, :n]), atol=1e-5)  # fmt: skip


def test_snapkv_selection_matches_brute_force():
    """Per (layer, row, KV head): the top-F positions before the window by pooled attention."""
    md = MagicDec(budget=10, builder="snapkv", obs_window=4, pool=3)
    L, B, K, G, S, E, T = 2, 3, 2, 2, 24, 4, md.obs_window
    rng = np.random.default_rng(0)
    q = rng.normal(size=(L, B, T, K * G, E)).astype(np.float32)
    k = rng.normal(size=(L, B, K, S, E)).astype(np.float32)
    lengths = np.array([24, 17, 12])
    got = np.asarray(magicdec.snapkv_select(md, jnp.asarray(q), jnp.asarray(k),
                                            jnp.asarray(lengths)))  # fmt: skip
    for l_, b, h in np.ndindex(L, B, K):
        n, start = lengths[b], lengths[b] - T
        w = np.zeros(S)
        for g in range(G):
            for t in range(T):
                s = k[l_, b, h, : start + t + 1] @ q[l_, b, t, h * G + g] / np.sqrt(E)
                p = np.exp(s - s.max())
                w[: start + t + 1] += p / p.sum()
        assert n <= S
        padded = np.pad(w, 1)
        pooled = (padded[:-2] + padded[1:-1] + padded[2:]) / 3
        want = np.argsort(-pooled[:start], kind="stable")[: md.fixed]
        assert sorted(got[l_, b, h].tolist()) == sorted(want.tolist())


def test_bad_configurations_are_rejected_clearly():
    with pytest.raises(ConfigError, match="budget"):
        MagicDec(budget=16, sink=16)
    with pytest.raises(ConfigError, match="builder"):
        MagicDec(builder="h2o")
    with pytest.raises(ConfigError, match="self-speculation"):
        MagicDec(builder="snapkv", self_draft=False)
    with pytest.raises(ConfigError, match="window"):
        SpecConfig(CFG, CFG, chain(8), "greedy", magicdec=MagicDec(budget=10, sink=4))
    with pytest.raises(ConfigError, match="target"):
        other = dataclasses.replace(CFG, num_layers=2)
        SpecConfig(CFG, other, chain(2), "greedy", magicdec=MagicDec(budget=32))


def _synthetic_profile(path):
    """t(b, c, s) = parameter time (grows with b·s past a knee) + KV time (∝ b·c)."""
    from jaxspec.profiling import write_toml

    batches, contexts, tokens = [1, 16], [256, 512, 1024, 4096], [1, 2, 3, 4, 5]
    t = [[[0.05 * (1 + 0.3 * (s - 1) * b / 16) + 1e-6 * b * c for s in tokens] for c in contexts]
         for b in batches]  # fmt: skip
    body = {"budgets": [256, 512], "alpha_contexts": [1024, 4096],
            "alpha": [[0.5, 0.6], [0.8, 0.85]], "batches": batches, "contexts": contexts,
            "tokens": tokens, "target_s": t}  # fmt: skip
    write_toml(path, body, ["synthetic MagicDec profile"])
    return body


def test_gamma_auto_picks_the_best_predicted_chain_per_bucket(tmp_path):
    """--gamma auto: per bucket the (γ, K) maximising Ω(γ, α(K))·t1 / (γ·t(b,K,1) + t(b,n,γ+1))
    over the profile (brute force here), AR where nothing beats 1; the runner's spec function
    returns the matching SpecConfig."""
    import types

    from jaxspec import costmodel
    from jaxspec.magicdec_auto import auto_magicdec, read_magicdec_profile

    path = tmp_path / "magicdec.toml"
    body = _synthetic_profile(path)
    md = MagicDec(budget=512, sink=16)
    args = types.SimpleNamespace(magicdec_profile=path)
    model = types.SimpleNamespace(name="tiny", cfg=CFG)
    spec_for = auto_magicdec(args, model, md, CFG, "greedy")
    t = body["target_s"]
    assert spec_for(1, 4096) is None  # batch 1: the draft costs as much as the target
    spec = spec_for(16, 4096)
    best, arg = 1.0, None
    for gi, g in enumerate(range(1, 5)):
        for ki, K in enumerate(body["budgets"]):
            sp = costmodel.speedup_chain(body["alpha"][1][ki], g, t[1][3][0], t[1][ki][0],
                                         t[1][3][gi + 1])  # fmt: skip
            if sp > best:
                best, arg = sp, (g, K)
    assert arg is not None and (spec.tree.max_depth, spec.magicdec.budget) == arg
    assert spec_for(9, 4096) == spec  # batch 9 rounds up to the profiled 16
    bad = tmp_path / "bad.toml"
    bad.write_text("budgets = [1]\n")
    with pytest.raises(ConfigError, match="not a MagicDec profile"):
        read_magicdec_profile(bad)
    with pytest.raises(ConfigError, match="bench --long-context"):
        read_magicdec_profile(tmp_path / "missing.toml")


def test_gamma_auto_uses_the_profiled_step_times(tmp_path):
    """A profile with whole-step times and accepted-length histograms is chosen from those:
    each pick equals the brute-force argmax of `predict_by_steps` over the measured γ and K
    (histogram at the nearest profiled context, context clipped to the step table); and when
    the measured steps are slow, the bucket falls back to AR although the forward-only model
    (same profile without the step table) predicts a gain."""
    from jaxspec import costmodel
    from jaxspec.magicdec_auto import AutoMagicDec, read_magicdec_profile
    from jaxspec.profiling import write_toml

    path = tmp_path / "magicdec.toml"
    body = _synthetic_profile(path)
    t = np.asarray(body["target_s"])
    gammas = [0, 1, 2, 3]
    step = [[[t[bi, ci, g] + g * t[bi, 1, 0] * 1.2 for g in gammas] for ci in (2, 3)]
            for bi in range(2)]  # fmt: skip
    hist = [[[5, 3, 2, 1], [4, 3, 3, 2]], [[2, 2, 3, 9], [1, 2, 3, 12]]]  # [context][budget]
    steps = {"step_batches": [1, 16], "step_contexts": [1024, 4096], "step_gammas": gammas,
             "step_budget": 512, "step_s": step, "accept_hist": hist}  # fmt: skip
    write_toml(path, {**body, **steps}, ["synthetic"])
    auto = AutoMagicDec(read_magicdec_profile(path))
    timing, st = auto.timing, auto.steps
    assert st is not None
    outcomes = set()
    # per_row: a static batch whose rows decode that many tokens (None: the mean row's rate)
    for (b, ctx), per_row in itertools.product(
        [(16, 4096), (16, 1024), (16, 3000), (1, 4096), (16, 9000)], [None, 15]
    ):
        near = 0 if abs(1024 - ctx) < abs(4096 - ctx) else 1
        sctx = min(max(ctx, 1024), 4096)
        best, arg = 1.0, None
        for g in gammas[1:]:
            for ki, K in enumerate(body["budgets"]):
                sp = costmodel.predict_by_steps(body["alpha"][near][ki],
                                                steps["accept_hist"][near][ki], timing, st, b,
                                                sctx, g, K, per_row)[0]  # fmt: skip
                if sp > best:
                    best, arg = sp, (g, K)
        pick = auto.choose(b, ctx, per_row)
        assert (None if pick is None else (pick.gamma, pick.budget)) == arg, (b, ctx, per_row)
        outcomes.add(arg is None)
    assert outcomes == {True, False}  # both a speculative pick and AR are exercised
    slow = [[[row[0] * (1 + 2 * g) for g in gammas] for row in plane] for plane in step]
    write_toml(path, {**body, **steps, "step_s": slow}, ["synthetic, slow steps"])
    assert AutoMagicDec(read_magicdec_profile(path)).choose(16, 4096) is None
    write_toml(path, body, ["synthetic, forward times only"])
    assert AutoMagicDec(read_magicdec_profile(path)).choose(16, 4096) is not None


def test_a_kv_cache_that_does_not_fit_is_a_clear_error():
    """Batch × context beyond the device's memory: one error naming the size needed."""
    from jaxspec.errors import InputError
    from jaxspec.kv_cache import cache_bytes, check_fits

    need = cache_bytes(CFG, 64, 8192, 4)
    assert need == 2 * CFG.num_layers * 64 * 8192 * CFG.num_kv_heads * CFG.head_dim * 4
    assert check_fits(CFG, 64, 8192, 4, available=2 * need) == need
    with pytest.raises(InputError, match=r"batch 64 × 8192 slots needs \d+\.\d\d GiB"):
        check_fits(CFG, 64, 8192, 4, available=need)
    with pytest.raises(InputError, match="working copies"):
        check_fits(CFG, 64, 8192, 4, available=2 * need, copies=2.2)
