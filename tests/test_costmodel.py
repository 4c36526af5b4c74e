"""MagicDec's cost model, speedup model and (γ, K) chooser (jaxspec/costmodel.py, ALGORITHMS.md
§1(b)). Pure numpy on hand-computed shapes and synthetic timing tables; nothing is compiled."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from jaxspec.config import ModelConfig
from jaxspec.costmodel import (
    GAMMAS,
    AnalyticTiming,
    MeasuredTiming,
    Pick,
    StepTiming,
    batch_tokens_per_step,
    choose_speculation,
    critical_length,
    decode_cost,
    expected_tokens_chain,
    omega,
    paper_critical_length,
    paper_decode_cost,
    predict_by_steps,
    speculation_table,
    speedup_chain,
    speedup_tree,
    step_time,
    step_token_probs,
)
from jaxspec.errors import ConfigError
from jaxspec.hardware import Roofline


def cfg(d, heads, kv_heads, head_dim, inter, vocab=10, layers=3) -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=vocab, hidden_size=d, intermediate_size=inter,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                       head_dim=head_dim)  # fmt: skip


# H·e = 16 ≠ d = 8, so a model that used d for the attention width would be caught.
SMALL = cfg(8, 4, 2, 4, 12)
TOY_ROOF = Roofline("toy", "float16", flops_per_s=1000.0, bytes_per_s=100.0)  # R = 10
A100 = Roofline("a100-like", "float16", flops_per_s=156e12, bytes_per_s=1e12)  # R = 156
LLAMA31_8B = cfg(4096, 32, 8, 128, 14336, vocab=128256, layers=32)
# MagicDec's Table 1 layer as a real config: d = 3072, g = 4, 3·d·I = 8d² (I = 8d/3).
PAPER_LIKE = cfg(3072, 24, 6, 128, 8192)


# ---- cost model --------------------------------------------------------------------------------


def test_decode_cost_counts_small_config():
    """Exact counts for d=8, H=4, Hkv=2, e=4, I=12, V=10, itemsize 2. Weights per layer are
    wq 8·16 + wk,wv 2·8·8 + wo 16·8 + MLP 3·8·12 = 672. KV per cached token is 2·2·4·2 = 32 bytes
    and 4·4·4 = 64 FLOPs per query. The head is 80 weights."""
    c = decode_cost(SMALL, 2)
    assert c.num_layers == 3
    assert (c.param_bytes, c.param_flops) == (1344, 1344)
    assert (c.kv_bytes, c.kv_flops) == (32, 64)
    assert (c.head_bytes, c.head_flops) == (160, 160)
    c4 = decode_cost(SMALL, 4)  # bytes scale with itemsize, FLOPs do not
    assert (c4.param_bytes, c4.param_flops, c4.kv_bytes, c4.head_bytes) == (2688, 1344, 64, 320)


def test_step_time_small_config_both_regimes():
    """step_time = L·[max(s·b·Fp/F, Bp/BW) + max(s·b·n·Fk/F, b·n·Bk/BW)] + head, hand-computed
    with F = 1000 and BW = 100. b=2, s=3 is memory-bound everywhere:
    3·(13.44 + 3.2) + 1.6 = 51.52. b=8, s=4 has compute-bound parameters:
    3·(43.008 + 12.8) + 5.12 = 172.544."""
    assert step_time(SMALL, TOY_ROOF, 2, 5, 3, 2) == pytest.approx(51.52)
    assert step_time(SMALL, TOY_ROOF, 8, 5, 4, 2) == pytest.approx(172.544)
    assert step_time(SMALL, TOY_ROOF, 1, 0, 1, 2) == pytest.approx(3 * 13.44 + 1.6)  # no KV


def test_critical_length_small_config_hand_values():
    """The per-layer KV time equals the parameter time at n* in all regimes:
      - memory-bound: 13.44 / (2·0.32) = 21;
      - compute-bound parameters: 43.008 / (8·0.32) = 16.8;
      - compute-bound parameters and KV (s·g = 16 ≥ R = 10): 86.016 / (8·0.512) = 21.
    Both terms of `layer_times` agree there."""
    c = decode_cost(SMALL, 2)
    for b, s, want in ((2, 3, 21.0), (8, 4, 16.8), (8, 8, 21.0)):
        n = critical_length(SMALL, TOY_ROOF, b, s, 2)
        assert n == pytest.approx(want)
        t_param, t_kv = c.layer_times(TOY_ROOF, b, n, s)
        assert t_kv == pytest.approx(t_param)


@pytest.mark.parametrize("b,s", [(64, 4), (256, 1), (40, 4), (8, 4), (1, 1), (4, 8)])
def test_critical_length_matches_paper_closed_form(b, s):
    """With the MLP of Table 1 (two 4d matrices = three matrices of I = 8d/3), the exact count
    reproduces the closed form of ALGORITHMS.md in both regimes at R = 156:
      - n* = s·(10g + 2)·d/(2R) when b·s ≥ R;
      - n* = (10g + 2)·d/(2b) below it.
    So does `paper_decode_cost`."""
    want = paper_critical_length(3072, 4, 156, b, s)
    expect = s * 42 * 3072 / 312 if b * s >= 156 else 42 * 3072 / (2 * b)
    assert want == pytest.approx(expect)
    assert critical_length(PAPER_LIKE, A100, b, s, 2) == pytest.approx(want)
    assert paper_decode_cost(3072, 4).critical_length(A100, b, s) == pytest.approx(want)


def test_paper_numbers_llama31_8b_and_llama2_7b():
    """The spec's worked numbers.
      - Llama-3.1-8B shape under Table 1: n* ≈ 551·s (≈ 550·s, 2.2K at s = 4).
      - MHA Llama-2-7B: ≈ 158·s (≈ 160·s).
      - The exact Llama-3.1-8B count (13d² weights: 3 MLP matrices of 3.5d): 13·4·4096/312·s ≈
        683·s.
    All three are at b·s ≥ R."""
    for s in (1, 4, 8):
        n = paper_critical_length(4096, 4, 156, 256, s)
        assert n == pytest.approx(551.38 * s, rel=1e-4)
        assert paper_decode_cost(4096, 4).critical_length(A100, 256, s) == pytest.approx(n)
        assert paper_critical_length(4096, 1, 156, 256, s) == pytest.approx(157.54 * s, rel=1e-4)
        exact = critical_length(LLAMA31_8B, A100, 256, s, 2)
        assert exact == pytest.approx(13 * 4 * 4096 / 312 * s)
    assert paper_critical_length(4096, 4, 156, 64, 4) == pytest.approx(2205.5, rel=1e-4)


def test_paper_decode_cost_is_table_1():
    """Table 1 at itemsize 2:
      - 2·(10d² + 2d²/g) parameter bytes and as many FLOPs per token;
      - 4·d/g KV bytes per cached token (4·b·n·d/g in all);
      - 4·d KV FLOPs per query and cached token.
    The exact count of a config whose MLP is 8d² gives the same numbers."""
    d, g = 3072, 4
    p = paper_decode_cost(d, g)
    assert p.param_bytes == p.param_flops == pytest.approx(2 * (10 * d * d + 2 * d * d / g))
    assert (p.kv_bytes, p.kv_flops) == (4 * d / g, 4 * d)
    e = decode_cost(PAPER_LIKE, 2)
    assert (e.param_bytes, e.param_flops, e.kv_bytes, e.kv_flops) == pytest.approx(
        (p.param_bytes, p.param_flops, p.kv_bytes, p.kv_flops)
    )


# ---- speedup formulas --------------------------------------------------------------------------


def test_omega_hand_values():
    """Ω(γ, α) = (1 − α^{γ+1})/(1 − α):
    - α = 0 gives 1;
    - α = 1 gives γ + 1;
    - γ = 1 gives 1 + α;
    - Ω(3, 0.5) = 1.875."""
    for g in (1, 3, 8):
        assert omega(0.0, g) == 1.0
        assert omega(1.0, g) == g + 1
    assert omega(0.3, 1) == pytest.approx(1.3)
    assert omega(0.5, 3) == pytest.approx((1 - 0.5**4) / 0.5) == pytest.approx(1.875)


def test_speedup_chain_and_tree_hand_values():
    """Ω·T1/(γ·TD + TV):
      - α = 0: 1/(0.3 + 1.2);
      - α = 1: 5/(0.4 + 1.1);
      - γ = 1: 1.8·2/(0.5 + 2.5).
    Tree form G/((TL + D·TD)/T1) = 3/((1.5 + 2·0.25)/1). A chain is the tree with G = Ω and
    D = γ."""
    assert speedup_chain(0.0, 3, 1.0, 0.1, 1.2) == pytest.approx(1 / 1.5)
    assert speedup_chain(1.0, 4, 1.0, 0.1, 1.1) == pytest.approx(10 / 3)
    assert speedup_chain(0.8, 1, 2.0, 0.5, 2.5) == pytest.approx(1.2)
    assert speedup_tree(3.0, 2, 1.0, 0.25, 1.5) == pytest.approx(1.5)
    for a, g in itertools.product((0.0, 0.4, 0.9, 1.0), (1, 2, 5)):
        assert speedup_chain(a, g, 1.3, 0.2, 1.7) == pytest.approx(
            speedup_tree(omega(a, g), g, 1.3, 0.2, 1.7)
        )


# ---- timing sources ----------------------------------------------------------------------------

BATCHES = [1, 4, 16]
CONTEXTS = [256, 512, 1024, 2048, 4096, 16384]
TOKENS = list(range(1, 10))
ALPHAS = {256: 0.55, 512: 0.7, 1024: 0.8, 2048: 0.85, 4096: 0.9}


def synthetic_table(seed: int, noise: float = 0.3) -> dict:
    """A roofline-shaped table, t = weights + b·n·kv + b·s·compute, with multiplicative noise so
    that argmaxes are not tied. It is a plain dict shaped like `jaxspec profile device`'s."""
    rng = np.random.default_rng(seed)
    b = np.array(BATCHES, float)[:, None, None]
    n = np.array(CONTEXTS, float)[None, :, None]
    s = np.array(TOKENS, float)[None, None, :]
    t = 1e-2 + 2e-7 * b * n * (1 + 0.05 * s) + 4e-4 * b * s
    t = t * np.exp(noise * rng.standard_normal(t.shape))
    return {"batches": BATCHES, "contexts": CONTEXTS, "tokens": TOKENS, "target_s": t.tolist()}


def brute_force(table: dict, alphas: dict, batch: int, context: int) -> tuple[float, int, int]:
    """(best speedup, γ, K) by direct indexing of the grid, first maximum in (γ, K) order."""
    t = np.asarray(table["target_s"])[BATCHES.index(batch)]
    ci = CONTEXTS.index(context)
    best = (-1.0, 0, 0)
    for g in GAMMAS:
        for k in sorted(alphas):
            a = alphas[k]
            td = t[CONTEXTS.index(min(k, context)), 0]
            sp = sum(a**i for i in range(g + 1)) * t[ci, 0] / (g * td + t[ci, g])
            if sp > best[0]:
                best = (sp, g, k)
    return best


def test_measured_timing_interpolates_bilinearly_and_refuses_to_extrapolate():
    """A table sampled from t = 1 + 2c + 3s + 0.5·c·s is reproduced exactly off-grid, because
    the function is bilinear. Points outside the measured context or token range raise
    ConfigError naming the value."""
    c = np.array([100.0, 300.0, 1000.0])[:, None]
    s = np.array([1.0, 2.0, 5.0])[None, :]
    plane = 1 + 2 * c + 3 * s + 0.5 * c * s
    m = MeasuredTiming.from_table({"batches": [2], "contexts": [100, 300, 1000],
                                   "tokens": [1, 2, 5], "target_s": [plane.tolist()]})  # fmt: skip
    for cc, ss in ((150, 1.5), (300, 3), (999, 4.9), (100, 1), (1000, 5)):
        assert m.t_target(2, cc, ss) == pytest.approx(1 + 2 * cc + 3 * ss + 0.5 * cc * ss)
    assert m.t_draft(2, 300) == m.t_target(2, 300, 1)
    with pytest.raises(ConfigError, match="context 1001"):
        m.t_target(2, 1001, 1)
    with pytest.raises(ConfigError, match="context 50"):
        m.t_draft(2, 50)
    with pytest.raises(ConfigError, match="tokens 6"):
        m.t_target(2, 300, 6)


def test_measured_timing_draft_table():
    """With self_spec=False the draft time is the table's draft_s at (context = K, 1 token).
    Without draft_s, it is a ConfigError."""
    t = synthetic_table(0)
    d = (np.asarray(t["target_s"]) * 0.25).tolist()
    m = MeasuredTiming.from_table({**t, "draft_s": d}, self_spec=False)
    assert m.t_draft(4, 512) == pytest.approx(d[1][1][0])
    with pytest.raises(ConfigError, match="draft_s"):
        MeasuredTiming.from_table(t, self_spec=False)


# ---- the chooser -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_chooser_is_argmax_of_brute_force(seed):
    """On every on-grid bucket, choose_speculation returns the brute-force maximiser of
    Ω·T1/(γ·TD + TV) over γ ∈ 1..8 and K, with the same timings. It returns None exactly
    where that maximum is ≤ 1. The synthetic tables exercise both outcomes."""
    table = synthetic_table(seed)
    timing = MeasuredTiming.from_table(table)
    outcomes = set()
    for b, c in itertools.product(BATCHES, CONTEXTS):
        want, g, k = brute_force(table, ALPHAS, b, c)
        pick = choose_speculation(ALPHAS, timing, b, c)
        outcomes.add(pick is None)
        if want <= 1:
            assert pick is None, (b, c, want)
            continue
        assert (pick.gamma, pick.budget) == (g, k)
        assert pick.speedup == pytest.approx(want)
        assert pick.alpha == ALPHAS[k]
        assert pick.verify_s == timing.t_target(b, c, g + 1)
        assert pick.draft_s == timing.t_draft(b, min(k, c))
    assert outcomes == {True, False}


@pytest.mark.parametrize("seed", range(4))
def test_chooser_never_picks_a_slowdown_on_its_table(seed):
    """Every pick is re-evaluated with speedup_chain on the same measured table, at on-grid and
    interpolated contexts. The value matches the pick's and is > 1."""
    timing = MeasuredTiming.from_table(synthetic_table(seed, noise=0.6))
    for b, c in itertools.product(BATCHES, (256, 300, 700, 2048, 3000, 9000, 16384)):
        pick = choose_speculation(ALPHAS, timing, b, c)
        if pick is None:
            continue
        again = speedup_chain(
            ALPHAS[pick.budget],
            pick.gamma,
            timing.t_target(b, c, 1),
            timing.t_draft(b, min(pick.budget, c)),
            timing.t_target(b, c, pick.gamma + 1),
        )
        assert again == pytest.approx(pick.speedup)
        assert again > 1


def test_chooser_returns_none_when_nothing_helps():
    """If verification costs s autoregressive steps and the draft is as slow as the target,
    every (γ, K) predicts < 1, even at α = 1. Every bucket is then autoregressive, and the
    table says gamma = 0, speedup = 1."""
    n = np.ones((len(BATCHES), len(CONTEXTS), 1))
    t = n * np.array(TOKENS, float)[None, None, :]
    timing = MeasuredTiming.from_table({"batches": BATCHES, "contexts": CONTEXTS,
                                        "tokens": TOKENS, "target_s": t.tolist()})  # fmt: skip
    alphas = {256: 1.0, 1024: 1.0}
    for b, c in itertools.product(BATCHES, CONTEXTS):
        assert choose_speculation(alphas, timing, b, c) is None
    rows = speculation_table(alphas, timing, BATCHES, CONTEXTS)
    assert len(rows) == len(BATCHES) * len(CONTEXTS)
    assert all(r["gamma"] == 0 and r["budget"] == 0 and r["speedup"] == 1.0 for r in rows)


def test_speculation_table_is_plain_and_matches_chooser():
    """speculation_table has one dict per (batch, context), with only ints and floats (so it is
    JSON- and TOML-friendly), agreeing with choose_speculation bucket by bucket."""
    timing = MeasuredTiming.from_table(synthetic_table(1))
    rows = speculation_table(ALPHAS, timing, BATCHES, CONTEXTS)
    assert [(r["batch"], r["context"]) for r in rows] == list(itertools.product(BATCHES, CONTEXTS))
    json.dumps(rows)
    for r in rows:
        assert all(type(v) in (int, float) for v in r.values())
        pick = choose_speculation(ALPHAS, timing, r["batch"], r["context"])
        want = Pick(0, 0, 0.0, 1.0, r["target_1_s"], 0.0, r["target_1_s"]) if pick is None else pick
        assert {k: r[k] for k in want.to_dict()} == want.to_dict()


def test_analytic_chooser_magicdec_trend():
    """Llama-3.1-8B with the A100-like roofline and a 512-slot self-speculation draft (α = 0.8)
    at 32K context. Speculation pays at batch 64, where KV reads dominate and verify ≈ one
    step, and pays more than at batch 1. The pick is also the brute-force argmax of the
    analytic times."""
    timing = AnalyticTiming(LLAMA31_8B, A100, 2)
    alphas = {512: 0.8, 2048: 0.85}
    big = choose_speculation(alphas, timing, 64, 32768)
    small = choose_speculation(alphas, timing, 1, 32768)
    assert big is not None and big.speedup > 1.5
    assert small is None or small.speedup < big.speedup
    assert big.verify_s / big.target_1_s < 1.15  # 1.10 at γ = 6 (b·s = 448 > R)
    best = max(
        (speedup_chain(a, g, timing.t_target(64, 32768, 1), timing.t_draft(64, k),
                       timing.t_target(64, 32768, g + 1)), g, k)
        for g in GAMMAS for k, a in alphas.items()
    )  # fmt: skip
    assert big.speedup == pytest.approx(best[0])
    assert (big.gamma, big.budget) == best[1:]


def test_real_cpu_profile_reads_and_never_slows_down():
    """The committed CPU device profile loads, its draft column can be used, and no pick
    predicts a slowdown on it."""
    path = (Path(__file__).resolve().parent.parent / "configs" / "profiles"
            / "device__cpu-cpu__smollm2-135m.toml")  # fmt: skip
    if not path.is_file():
        pytest.skip(f"{path} is not there")
    for self_spec in (True, False):
        timing = MeasuredTiming.from_file(path, self_spec=self_spec)
        gammas = [g for g in GAMMAS if g + 1 <= timing.tokens[-1]]
        rows = speculation_table({256: 0.6, 512: 0.7}, timing, timing.batches, timing.contexts,
                                 gammas)  # fmt: skip
        assert all(r["speedup"] >= 1 for r in rows)


# ---- the step-timed chooser --------------------------------------------------------------------

STEP_GAMMAS = [0, 1, 2, 3, 4]


def synthetic_steps(seed: int, budget: int = 512) -> dict:
    """Whole-step seconds per (batch, context, γ): the forward table's verify time plus γ draft
    steps at `budget` plus a per-level overhead, with noise, as a `StepTiming` table."""
    rng = np.random.default_rng(seed + 100)
    t = np.asarray(synthetic_table(seed)["target_s"])
    step = np.empty((len(BATCHES), len(CONTEXTS), len(STEP_GAMMAS)))
    for bi, ci, gi in itertools.product(*(range(n) for n in step.shape)):
        g = STEP_GAMMAS[gi]
        draft = t[bi, CONTEXTS.index(min(budget, CONTEXTS[ci])), 0]
        step[bi, ci, gi] = (t[bi, ci, g] + g * (draft + 3e-3)) * np.exp(0.2 * rng.normal())
    return {"step_batches": BATCHES, "step_contexts": CONTEXTS, "step_gammas": STEP_GAMMAS,
            "step_budget": budget, "step_s": step.tolist()}  # fmt: skip


def test_expected_tokens_chain_equals_enumeration():
    """1 + Σ_{d≤γ} P(A ≥ d) equals the mean of min(A, γ) + 1 over the steps the histogram
    counts (a shorter greedy chain accepts a prefix), and Ω(γ, α) when A is truncated
    geometric with rate α."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        hist = rng.integers(0, 9, size=6).astype(float)
        hist[0] += 1
        steps = np.repeat(np.arange(6), hist.astype(int))
        for g in range(1, 6):
            assert expected_tokens_chain(hist, g) == pytest.approx(np.minimum(steps, g).mean() + 1)
    a, G = 0.7, 4
    geo = [a**d * (1 - a) for d in range(G)] + [a**G]
    for g in range(1, G + 1):
        assert expected_tokens_chain(geo, g) == pytest.approx(omega(a, g))
    with pytest.raises(ConfigError, match="longer than the measured chain"):
        expected_tokens_chain([1, 2, 3], 3)
    with pytest.raises(ConfigError, match="histogram"):
        expected_tokens_chain([0, 0], 1)


def fitted_steps(S: np.ndarray) -> np.ndarray:
    """The step table through `StepTiming.t_step_fit`, computed directly: per (batch, context)
    the least-squares line over γ ≥ 1 evaluated at each γ ≥ 1; γ = 0 (AR) as measured."""
    g = np.asarray(STEP_GAMMAS[1:], float)
    A = np.stack([np.ones_like(g), g], axis=1)
    coef = np.linalg.lstsq(A, S[..., 1:].reshape(-1, len(g)).T, rcond=None)[0]  # [2, B·C]
    fit = (A @ coef).T.reshape(S[..., 1:].shape)
    return np.concatenate([S[..., :1], fit], axis=-1)


def test_step_fit_is_exact_on_affine_steps_and_averages_noise():
    """t_step_fit returns an affine table unchanged, leaves γ = 0 (AR) as measured, and moves a
    single noisy γ only by its share of the least-squares line: a step 30% low at one γ comes
    out within 10% of the affine truth there, where the raw table is 30% off."""
    st = synthetic_steps(0)
    S = np.asarray(st["step_s"])
    g = np.asarray(STEP_GAMMAS, float)
    affine = S[..., :1] * 1.3 + S[..., 1:2] * 0.4 * g  # a + b·γ per (batch, context), any γ
    steps = StepTiming.from_table({**st, "step_s": affine.tolist()})
    for (bi, b), (ci, c), gi in itertools.product(enumerate(BATCHES), enumerate(CONTEXTS),
                                                  range(len(STEP_GAMMAS))):  # fmt: skip
        assert steps.t_step_fit(b, c, STEP_GAMMAS[gi]) == pytest.approx(affine[bi, ci, gi])
    noisy = affine.copy()
    noisy[..., 2] *= 0.7
    steps = StepTiming.from_table({**st, "step_s": noisy.tolist()})
    fit = fitted_steps(noisy)
    for (bi, b), (ci, c) in itertools.product(enumerate(BATCHES), enumerate(CONTEXTS)):
        assert steps.t_step_fit(b, c, 0) == noisy[bi, ci, 0]
        got = steps.t_step_fit(b, c, STEP_GAMMAS[2])
        assert got == pytest.approx(fit[bi, ci, 2])
        assert abs(got / affine[bi, ci, 2] - 1) < 0.1
    one = {**st, "step_gammas": [0, 3], "step_s": S[..., [0, 3]].tolist()}
    assert StepTiming.from_table(one).t_step_fit(1, 256, 3) == S[0, 0, 3]  # nothing to fit


def _mc_batch_tokens_per_step(probs, tokens, batch, trials=20000, seed=0) -> float:
    """tokens / mean over trials of max over `batch` rows of the steps to emit `tokens`."""
    rng = np.random.default_rng(seed)
    k = rng.choice(len(probs), size=(trials, batch, tokens), p=probs)  # tokens emitted per step
    steps = (np.cumsum(k, axis=-1) < tokens).sum(-1) + 1  # the step reaching `tokens`
    return tokens / steps.max(-1).mean()


def test_batch_tokens_per_step_is_the_slowest_rows_rate():
    """A static batch steps until its slowest row has its tokens: tokens / E[max_i S_i]. Exact
    on closed cases (every draft accepted: ceil(T / (γ + 1)) steps for every row; none
    accepted: the AR rate 1), equal to Monte-Carlo simulation of B rows, non-increasing in the
    batch size, and at batch 1 and long outputs it tends to the mean tokens per step."""
    hist = [4, 10, 4, 13, 34]  # a measured accepted-length histogram (chain of 4)
    for g in (1, 2, 3, 4):
        p = step_token_probs(g, hist)
        assert p.sum() == pytest.approx(1) and p[0] == 0
        assert (np.arange(p.size) * p).sum() == pytest.approx(expected_tokens_chain(hist, g))
        a = 0.8
        pa = step_token_probs(g, alpha=a)
        assert (np.arange(pa.size) * pa).sum() == pytest.approx(omega(a, g))
        full = np.zeros(g + 2)
        full[-1] = 1.0
        for T in (5, 63, 64):
            assert batch_tokens_per_step(full, T, 7) == pytest.approx(T / -(-T // (g + 1)))
            assert batch_tokens_per_step([0.0, 1.0], T, 7) == pytest.approx(1.0)
    p = step_token_probs(3, hist)
    rates = [batch_tokens_per_step(p, 63, b) for b in (1, 2, 4, 16, 32)]
    assert all(x > y for x, y in zip(rates, rates[1:], strict=False))
    for b in (1, 4, 16):
        assert batch_tokens_per_step(p, 63, b) == pytest.approx(
            _mc_batch_tokens_per_step(p, 63, b), rel=0.01
        )
    assert batch_tokens_per_step(p, 4000, 1) == pytest.approx(expected_tokens_chain(hist, 3),
                                                              rel=2e-3)  # fmt: skip
    with pytest.raises(ConfigError, match="P\\(0\\) = 0"):
        batch_tokens_per_step([0.5, 0.5], 10, 2)
    with pytest.raises(ConfigError, match="batch"):
        batch_tokens_per_step(p, 10, 0)
    with pytest.raises(ConfigError, match=">= γ \\+ 1 = 4 counts"):
        step_token_probs(3, [1, 2, 3])


@pytest.mark.parametrize("seed", range(2))
def test_chooser_with_a_static_batch_uses_the_slowest_rows_rate(seed):
    """With `tokens_per_row` the chooser's E is `batch_tokens_per_step` (histogram where given,
    else i.i.d. α), with step timing and with forward timing; every prediction is ≤ the
    mean-row one, and the picks equal the brute-force argmax (None where it is ≤ 1)."""
    table, st = synthetic_table(seed), synthetic_steps(seed)
    timing, steps = MeasuredTiming.from_table(table), StepTiming.from_table(st)
    rng = np.random.default_rng(seed)
    hists = {k: rng.integers(1, 20, size=5).tolist() for k in (256, 1024)}
    T = 31
    outcomes = set()
    for b, c in itertools.product(BATCHES, CONTEXTS):
        best = (1.0, None)
        for g in STEP_GAMMAS[1:]:
            for k in sorted(ALPHAS):
                mean, ts, t_ar, _ = predict_by_steps(ALPHAS[k], hists.get(k), timing, steps, b,
                                                     c, g, k)  # fmt: skip
                sp = predict_by_steps(ALPHAS[k], hists.get(k), timing, steps, b, c, g, k, T)[0]
                probs = step_token_probs(g, hists.get(k), None if k in hists else ALPHAS[k])
                assert sp == pytest.approx(batch_tokens_per_step(probs, T, b) * t_ar / ts)
                assert sp <= mean + 1e-12
                if sp > best[0]:
                    best = (sp, (g, k))
        pick = choose_speculation(ALPHAS, timing, b, c, steps=steps, hists=hists,
                                  tokens_per_row=T)  # fmt: skip
        assert (None if pick is None else (pick.gamma, pick.budget)) == best[1], (b, c)
        outcomes.add(pick is None)
        fwd = choose_speculation(ALPHAS, timing, b, c, tokens_per_row=T)
        plain = choose_speculation(ALPHAS, timing, b, c)
        if fwd is not None:
            assert plain is not None and fwd.speedup <= plain.speedup + 1e-12
            e = batch_tokens_per_step(step_token_probs(fwd.gamma, alpha=fwd.alpha), T, b)
            assert fwd.speedup == pytest.approx(speedup_chain(
                fwd.alpha, fwd.gamma, fwd.target_1_s, fwd.draft_s, fwd.verify_s
            ) * e / omega(fwd.alpha, fwd.gamma))  # fmt: skip
    assert outcomes == {True, False}


@pytest.mark.parametrize("seed", range(3))
def test_step_chooser_is_argmax_of_brute_force(seed):
    """With a StepTiming the chooser maximises E(γ, K)·T_AR / (step(γ) + γ·(t_D(K) − t_D(K0)))
    over the measured γ and K, computed here by direct indexing of both grids (step: the
    table's least-squares line over γ ≥ 1, `fitted_steps`); E comes from
    the histogram where one is given (K = 256, 1024) and from Ω(γ, α) elsewhere. None exactly
    where the maximum is ≤ 1; every pick is > 1 and reproduced by predict_by_steps."""
    table, st = synthetic_table(seed), synthetic_steps(seed)
    timing, steps = MeasuredTiming.from_table(table), StepTiming.from_table(st)
    rng = np.random.default_rng(seed)
    hists = {k: rng.integers(1, 20, size=5).tolist() for k in (256, 1024)}
    t, S = np.asarray(table["target_s"]), fitted_steps(np.asarray(st["step_s"]))
    outcomes = set()
    for b, c in itertools.product(BATCHES, CONTEXTS):
        bi, ci = BATCHES.index(b), CONTEXTS.index(c)
        td0 = t[bi, CONTEXTS.index(min(512, c)), 0]
        best = (-1.0, 0, 0)
        for g in STEP_GAMMAS[1:]:
            for k in sorted(ALPHAS):
                h = np.asarray(hists.get(k, [0]), float)
                e = (1 + sum(h[d:].sum() for d in range(1, g + 1)) / h.sum() if k in hists
                     else omega(ALPHAS[k], g))  # fmt: skip
                ts = S[bi, ci, g] + g * (t[bi, CONTEXTS.index(min(k, c)), 0] - td0)
                sp = e * S[bi, ci, 0] / ts
                if sp > best[0]:
                    best = (sp, g, k)
        pick = choose_speculation(ALPHAS, timing, b, c, steps=steps, hists=hists)
        outcomes.add(pick is None)
        if best[0] <= 1:
            assert pick is None, (b, c, best)
            continue
        assert (pick.gamma, pick.budget) == best[1:] and pick.speedup == pytest.approx(best[0])
        assert pick.ar_step_s == S[bi, ci, 0] and pick.speedup > 1
        again = predict_by_steps(ALPHAS[pick.budget], hists.get(pick.budget), timing, steps, b,
                                 c, pick.gamma, pick.budget)  # fmt: skip
        assert again[0] == pytest.approx(pick.speedup) and again[1] == pytest.approx(pick.step_s)
    assert outcomes == {True, False}


def test_step_timing_interpolates_and_rejects_bad_tables():
    """t_step interpolates linearly in context, exact in batch and γ; off-grid batches, γ and
    contexts and malformed tables are ConfigErrors naming the problem."""
    st = synthetic_steps(0)
    steps = StepTiming.from_table(st)
    S = np.asarray(st["step_s"])
    assert steps.t_step(4, 768, 2) == pytest.approx((S[1, 1, 2] + S[1, 2, 2]) / 2)
    with pytest.raises(ConfigError, match="batch 2"):
        steps.t_step(2, 1024, 1)
    with pytest.raises(ConfigError, match="γ = 7"):
        steps.t_step(1, 1024, 7)
    with pytest.raises(ConfigError, match="context 100"):
        steps.t_step(1, 100, 1)
    with pytest.raises(ConfigError, match="starting with 0"):
        StepTiming.from_table({**st, "step_gammas": [1, 2, 3, 4, 5]})
    with pytest.raises(ConfigError, match="shape"):
        StepTiming.from_table({**st, "step_gammas": [0, 1, 2]})
    with pytest.raises(ConfigError, match="step_budget"):
        StepTiming.from_table({**st, "step_budget": 0})


# ---- bad inputs --------------------------------------------------------------------------------


def test_bad_inputs_raise_config_error_naming_the_value():
    """Each bad input raises ConfigError, and the message names the bad value:
    - α outside [0, 1] or NaN;
    - empty budgets or γ list;
    - batch ≤ 0, or a batch the table lacks;
    - itemsize 0;
    - a non-positive time;
    - a malformed table."""
    timing = MeasuredTiming.from_table(synthetic_table(0))
    with pytest.raises(ConfigError, match=r"budget 512.*1\.5"):
        choose_speculation({256: 0.5, 512: 1.5}, timing, 1, 1024)
    with pytest.raises(ConfigError, match=r"-0\.1"):
        speedup_chain(-0.1, 2, 1.0, 0.1, 1.0)
    with pytest.raises(ConfigError, match="nan"):
        omega(float("nan"), 2)
    with pytest.raises(ConfigError, match=r"\{\}"):
        choose_speculation({}, timing, 1, 1024)
    with pytest.raises(ConfigError, match="gammas"):
        choose_speculation(ALPHAS, timing, 1, 1024, gammas=[])
    with pytest.raises(ConfigError, match="batch must be an integer >= 1, got 0"):
        choose_speculation(ALPHAS, timing, 0, 1024)
    with pytest.raises(ConfigError, match="got -2"):
        step_time(SMALL, TOY_ROOF, -2, 10, 1, 2)
    with pytest.raises(ConfigError, match=r"batch 2 is not in the table \(batches: \[1, 4, 16\]\)"):
        choose_speculation(ALPHAS, timing, 2, 1024)
    with pytest.raises(ConfigError, match="itemsize.*got 0"):
        decode_cost(SMALL, 0)
    with pytest.raises(ConfigError, match="t_draft.*got 0"):
        speedup_chain(0.5, 2, 1.0, 0.0, 1.0)
    with pytest.raises(ConfigError, match="gamma.*got 0"):
        speedup_chain(0.5, 0, 1.0, 0.1, 1.0)
    bad = synthetic_table(0)
    with pytest.raises(ConfigError, match="shape"):
        MeasuredTiming.from_table({**bad, "tokens": TOKENS[:-1]})
    with pytest.raises(ConfigError, match="strictly increasing"):
        MeasuredTiming.from_table({**bad, "contexts": CONTEXTS[::-1]})
    with pytest.raises(ConfigError, match="'batches'"):
        MeasuredTiming.from_table({k: v for k, v in bad.items() if k != "batches"})


def test_step_chooser_uses_budget_steps_where_timed():
    """With the largest γ's whole steps timed at other budgets (`budget_step_s`), the predicted
    step at (γ, K) is step(γ, K0) + γ·max(δ_step, δ_forward): δ_step = (T(γ_max, K) −
    T(γ_max, K0)) / γ_max measured inside whole steps, δ_forward the isolated forwards'
    difference, the larger (dearer draft) taken; budgets without timed steps keep the forward
    difference. Bad budget tables are ConfigErrors naming the key."""
    table, st = synthetic_table(0), synthetic_steps(0)
    S = fitted_steps(np.asarray(st["step_s"]))
    ks = [256, 512]  # 1024 not timed: falls back to the forward table
    rng = np.random.default_rng(7)
    bud = (  # K = 256's step 0.5–1.1× K0's: its δ_step is sometimes below, sometimes above δ_fwd
        S[:, :, -1:]
        * np.stack([rng.uniform(0.5, 1.1, size=S.shape[:2]), np.ones(S.shape[:2])], axis=-1)
        * np.exp(0.05 * rng.normal(size=(len(BATCHES), len(CONTEXTS), 2)))
    )
    bud[:, :, 1] = S[:, :, -1]  # the reference budget's column is the γ_max step itself
    stb = {**st, "step_budgets": ks, "budget_gamma": STEP_GAMMAS[-1], "budget_step_s": bud.tolist()}
    timing, steps = MeasuredTiming.from_table(table), StepTiming.from_table(stb)
    t = np.asarray(table["target_s"])
    assert steps.has_budget(256) and steps.has_budget(512) and not steps.has_budget(1024)
    gm = STEP_GAMMAS[-1]
    kinds = set()
    for b, c in itertools.product(BATCHES, CONTEXTS):
        bi, ci = BATCHES.index(b), CONTEXTS.index(c)
        delta = (bud[bi, ci, 0] - bud[bi, ci, 1]) / gm
        assert steps.draft_delta(b, c, 256) == pytest.approx(delta)
        assert steps.draft_delta(b, c, 512) == 0.0
        td0 = t[bi, CONTEXTS.index(min(512, c)), 0]
        fwd256 = t[bi, CONTEXTS.index(min(256, c)), 0] - td0
        kinds.add(delta > fwd256)
        for g in STEP_GAMMAS[1:]:
            ts = predict_by_steps(ALPHAS[256], None, timing, steps, b, c, g, 256)[1]
            assert ts == pytest.approx(S[bi, ci, g] + g * max(delta, fwd256))
            fwd = S[bi, ci, g] + g * (t[bi, CONTEXTS.index(min(1024, c)), 0] - td0)
            ts = predict_by_steps(ALPHAS[1024], None, timing, steps, b, c, g, 1024)[1]
            assert ts == pytest.approx(fwd)
    assert kinds == {True, False}  # both the step-measured and the forward δ were the larger
    with pytest.raises(ConfigError, match="no timed steps"):
        steps.draft_delta(1, 1024, 1024)
    with pytest.raises(ConfigError, match="must hold the step_budget"):
        StepTiming.from_table({**stb, "step_budgets": [256, 1024]})
    with pytest.raises(ConfigError, match="budget_gamma"):
        StepTiming.from_table({**stb, "budget_gamma": 2})
    with pytest.raises(ConfigError, match="budget_step_s"):
        StepTiming.from_table({**stb, "budget_step_s": bud[:, :, :1].tolist()})
