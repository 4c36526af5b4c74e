"""CritiPrefill (block-sparse prefill) invariants on tiny fp32 models:
* nothing pruned (every segment dense, or a budget covering every earlier block) == dense;
* the scores follow the max/min pooling formula; no selected block ends after its segment's
  start, and exactly k blocks are selected once enough exist;
* pruning really changes the cache (a test that could not fail otherwise);
* one compile serves every prompt of a bucket;
* speculative decoding after a CritiPrefill prefill is lossless w.r.t. that prefill;
* bad hyper-parameters give clear errors.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.critiprefill import CritiPrefill, block_scores, segment_is_sparse, select_blocks
from jaxspec.errors import ConfigError
from jaxspec.prefill import prefill_cache
from jaxspec.testing import TINY, tiny_model

CFG, PARAMS = tiny_model(cfg=dataclasses.replace(TINY, max_position_embeddings=1024))


def prompts(lengths, P, seed=0):
    rng = np.random.default_rng(seed)
    arr = np.zeros((len(lengths), P), np.int32)
    for i, n in enumerate(lengths):
        arr[i, :n] = rng.integers(4, CFG.vocab_size, n)
    return jnp.asarray(arr), jnp.asarray(lengths, jnp.int32)


def prefill(cp, toks, lengths, slots=448):
    cfg = dataclasses.replace(CFG, prefill=cp)
    return prefill_cache(PARAMS, cfg, toks, lengths, slots=slots, chunk=64)


def assert_close(a, b, atol=2e-5):
    (ca, ha), (cb, hb) = a, b
    np.testing.assert_allclose(np.asarray(ha), np.asarray(hb), atol=atol, rtol=atol)
    np.testing.assert_allclose(np.asarray(ca.k), np.asarray(cb.k), atol=atol, rtol=atol)
    assert np.array_equal(np.asarray(ca.lengths), np.asarray(cb.lengths))


def test_no_pruning_equals_dense():
    toks, lengths = prompts([320, 200, 384], 384)
    dense = prefill(None, toks, lengths)
    # every segment starts before the threshold: all dense
    assert_close(prefill(CritiPrefill(64, 16, 128, 384), toks, lengths), dense)
    # the segment at 192 selects 12 = 192/16 blocks: all of its past, so exact
    everything = CritiPrefill(segment=64, block=16, budget=192, threshold=192)
    one = prompts([320], 384)
    assert_close(prefill(everything, *one), prefill(None, *one))


def test_pruning_changes_the_cache_and_layer_zero_stays_dense():
    """3 layers: layer 1 attends sparsely, so layer 2's K/V of the sparse segments and the last
    hidden state change, while layer 0 (dense) and everything before tau do not."""
    cfg, params = tiny_model(cfg=dataclasses.replace(TINY, num_layers=3))
    toks, lengths = prompts([384], 384, seed=1)

    def run(cp):
        c = dataclasses.replace(cfg, prefill=cp)
        return prefill_cache(params, c, toks, lengths, slots=448, chunk=64)

    (dense, h_d), (sparse, h_s) = run(None), run(CritiPrefill(64, 16, 64, 128))
    k_d, k_s = np.asarray(dense.k), np.asarray(sparse.k)
    np.testing.assert_allclose(
        k_d[:2], k_s[:2], atol=1e-4, rtol=1e-5
    )  # layers 0-1: inputs never pruned
    np.testing.assert_allclose(
        k_d[2, :, :, :128], k_s[2, :, :, :128], atol=1e-4, rtol=1e-5
    )  # before tau
    assert not np.allclose(k_d[2, :, :, 128:320], k_s[2, :, :, 128:320], atol=1e-3)
    assert not np.allclose(np.asarray(h_d), np.asarray(h_s), atol=1e-4)


def test_sparse_flag_per_segment():
    cp = CritiPrefill(segment=64, block=16, budget=64, threshold=128)
    lengths = jnp.asarray([384, 130])
    flags = [bool(segment_is_sparse(cp, jnp.int32(i), lengths)) for i in range(6)]
    # segment 2 ([128, 192)) holds row 1's end -> dense; 0, 1 before tau; 5 is row 0's last
    assert flags == [False, False, False, True, True, False]


def test_scores_formula_and_causal_selection():
    cp = CritiPrefill(segment=32, block=16, budget=48, threshold=64)
    rng = np.random.default_rng(0)
    B, T, H, K, S, E = 2, 32, 4, 2, 160, 8
    q = rng.standard_normal((B, T, H, E)).astype(np.float32)
    k = rng.standard_normal((B, K, S, E)).astype(np.float32)
    lengths = np.asarray([96, 64], np.int32)
    got = np.asarray(block_scores(cp, jnp.asarray(q), jnp.asarray(k), jnp.asarray(lengths)))
    G, nb = H // K, S // 16
    for b in range(B):
        for kh in range(K):
            qs = q[b, :, kh * G : (kh + 1) * G]  # [T, G, E]
            qmax, qmin = qs.max(0), qs.min(0)
            kb = k[b, kh].reshape(nb, 16, E)
            kmax, kmin = kb.max(1), kb.min(1)
            c = np.maximum((qmax @ kmax.T + qmin @ kmax.T) / 2, (qmax @ kmin.T + qmin @ kmin.T) / 2)
            c = c.mean(0)
            n = lengths[b] // 16
            want = np.exp(c[:n] - c[:n].max())
            np.testing.assert_allclose(got[b, kh, :n], want / want.sum(), rtol=1e-5)
            assert (got[b, kh, n:] == 0).all()
    sel = np.asarray(select_blocks(cp, jnp.asarray(got)))
    assert sel.shape == (B, K, 3)
    for b in range(B):
        assert ((sel[b] >= 0) & (sel[b] < lengths[b] // 16)).all()  # ends before the start
        assert all(len(set(r)) == 3 for r in sel[b])


def test_one_compile_per_bucket():
    cp = CritiPrefill(segment=64, block=16, budget=64, threshold=128)
    cfg = dataclasses.replace(CFG, prefill=cp)
    f = jax.jit(lambda t, n: prefill_cache(PARAMS, cfg, t, n, slots=448, chunk=64))
    for seed, lens in enumerate(([384], [250], [130])):
        jax.block_until_ready(f(*prompts(lens, 384, seed)))
    assert f._cache_size() == 1


def test_speculation_after_critiprefill_is_lossless():
    from jaxspec.sampling import SamplingParams
    from jaxspec.speculative import SpecConfig, spec_generate
    from jaxspec.trees import chain, kary

    cfg = dataclasses.replace(CFG, prefill=CritiPrefill(64, 16, 64, 128))
    toks, lengths = prompts([384, 300], 384, seed=2)
    max_new = jnp.asarray([16, 16])

    def run(tree):
        spec = SpecConfig(cfg, CFG, tree, "greedy")
        st = spec_generate(PARAMS, PARAMS, toks, lengths, jax.random.key(0), SamplingParams.make(2),
                           max_new, spec=spec, max_new_tokens=16, chunk=64)  # fmt: skip
        t, n = np.asarray(st.tokens), np.asarray(st.n_out)
        return [t[i, : n[i]].tolist() for i in range(2)]

    want = run(chain(0))
    assert run(chain(3)) == want
    assert run(kary(2, 2)) == want


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(threshold=1024, budget=2048), "must be >= the budget"),
        (dict(segment=500), "multiple of the block"),
        (dict(budget=2000, threshold=4096), "budget .* multiple of the block"),
        (dict(threshold=4100), "must be a multiple of the segment"),
        (dict(block=0), "--block must be positive"),
    ],
)
def test_bad_hyperparameters(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        CritiPrefill(**kw)
