"""The speculative step's invariants (DESIGN §5) on tiny fp32 models.

* Greedy losslessness: every tree shape × draft emits exactly the AR greedy tokens, in batches
  whose rows accept different lengths and finish at different times (EOS, per-row max_new).
* Draft == target ⇒ every drafted token on the walked path is accepted (a = depth each step).
* KV commit invariant: after decoding, the committed target and draft KV equal a fresh prefill
  of the committed tokens.
* No recompilation across steps and prompts.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.drafting import layer_skip
from jaxspec.generate import prefill_cache
from jaxspec.model import init_params
from jaxspec.sampling import SamplingParams
from jaxspec.speculative import SpecConfig, _spec_step, spec_generate, spec_prefill_jit
from jaxspec.testing import TINY
from jaxspec.trees import chain, kary, load_tree

CFG = dataclasses.replace(TINY, num_layers=4)
PARAMS = init_params(CFG, jax.random.key(0), scale=0.5)
OTHER = init_params(CFG, jax.random.key(1), scale=0.5)  # an unrelated draft
SKIP_CFG, SKIP = layer_skip(PARAMS, CFG, (0, 2, 3))
TREES = {
    "chain1": chain(1),
    "chain4": chain(4),
    "kary2x2": kary(2, 2),
    "irregular9": load_tree("irregular_9"),
}
DRAFTS = {"self": (CFG, PARAMS), "other": (CFG, OTHER), "layerskip": (SKIP_CFG, SKIP)}


def batch(lengths, seed=0, P=32):
    rng = np.random.default_rng(seed)
    arr = np.zeros((len(lengths), P), np.int32)
    for i, n in enumerate(lengths):
        arr[i, :n] = rng.integers(4, CFG.vocab_size, n)
    return jnp.asarray(arr), jnp.asarray(lengths, jnp.int32)


def outputs(state):
    toks, n = np.asarray(state.tokens), np.asarray(state.n_out)
    return [toks[i, : n[i]].tolist() for i in range(toks.shape[0])]


def ar_greedy(prompts, lengths, max_new):
    spec = SpecConfig(CFG, CFG, chain(0))
    st = spec_generate(PARAMS, PARAMS, prompts, lengths, jax.random.key(0),
                       SamplingParams.make(len(lengths)), max_new, spec=spec,
                       max_new_tokens=24, chunk=8)  # fmt: skip
    return outputs(st)


def test_tree_chain0_is_plain_autoregressive_decoding():
    from jaxspec.generate import generate

    prompts, lengths = batch([3, 17, 9])
    max_new = jnp.asarray([24, 10, 24])
    st = generate(PARAMS, prompts, lengths, jax.random.key(0), SamplingParams.make(3), max_new,
                  cfg=CFG, max_new_tokens=24, chunk=8)  # fmt: skip
    assert outputs(st) == ar_greedy(prompts, lengths, max_new)


@pytest.mark.parametrize("tree", sorted(TREES))
@pytest.mark.parametrize("draft", sorted(DRAFTS))
def test_greedy_equals_autoregressive(tree, draft):
    prompts, lengths = batch([3, 17, 9, 30], seed=1)
    max_new = jnp.asarray([24, 11, 24, 5])
    want = ar_greedy(prompts, lengths, max_new)
    dcfg, dparams = DRAFTS[draft]
    spec = SpecConfig(CFG, dcfg, TREES[tree], "greedy")
    st = spec_generate(PARAMS, dparams, prompts, lengths, jax.random.key(0),
                       SamplingParams.make(4), max_new, spec=spec, max_new_tokens=24,
                       chunk=8)  # fmt: skip
    assert outputs(st) == want
    hist = np.asarray(st.accept_hist).sum(0)
    ranks = np.asarray(st.rank_hist)
    # every accepted token is one accepted rank at one node
    assert (ranks[:, :-1].sum(1) == np.asarray(st.accepted)).all()
    if draft == "self":  # draft == target: every step accepts the full depth (but the last)
        assert hist[: TREES[tree].max_depth].sum() <= 4  # at most one short step per row
        assert ranks[:, 1:-1].sum() == 0  # ... always through the draft's top-1 child
    assert int(np.asarray(st.live_steps).max()) <= int(st.steps)


@pytest.mark.parametrize("tree", ["kary2x2", "chain4"])  # a chain drafts incrementally
def test_kv_commit_invariant(tree):
    prompts, lengths = batch([5, 12], seed=2)
    max_new = jnp.asarray([20, 20])
    spec = SpecConfig(CFG, SKIP_CFG, TREES[tree], "greedy")
    st = spec_generate(PARAMS, SKIP, prompts, lengths, jax.random.key(0), SamplingParams.make(2),
                       max_new, spec=spec, max_new_tokens=24, chunk=8)  # fmt: skip
    outs = outputs(st)
    for cache, params, cfg in ((st.cache, PARAMS, CFG), (st.draft_cache, SKIP, SKIP_CFG)):
        for b in range(2):
            n = int(cache.lengths[b])
            seq = np.asarray(prompts[b, : int(lengths[b])]).tolist() + outs[b]
            assert n == len(seq) - 1  # everything but the last emitted token (the next root)
            ids = jnp.asarray([seq[:n] + [0] * (64 - n)])
            fresh, _ = prefill_cache(params, cfg, ids, jnp.asarray([n]), slots=64, chunk=64)
            # fp32 K/V computed through different matmul shapes (chunks of 8 vs one of 64, tree
            # steps) differ by rounding only: measured max 2.4e-5 on values of magnitude ~4 in
            # the deepest layer; a wrong row or position gives differences of order 1.
            for got, want in ((cache.k, fresh.k), (cache.v, fresh.v)):
                np.testing.assert_allclose(
                    np.asarray(got[:, b, :, :n]), np.asarray(want[:, 0, :, :n]),
                    atol=1e-4, rtol=1e-5,
                )  # fmt: skip


def test_no_recompile_across_steps_and_prompts():
    spec = SpecConfig(CFG, SKIP_CFG, chain(3), "greedy")
    step = jax.jit(chex.assert_max_traces(_spec_step, n=1), static_argnums=(3,))
    for seed, lengths in ((0, [4, 9]), (1, [20, 2])):
        prompts, lens = batch(lengths, seed=seed)
        st = spec_prefill_jit(PARAMS, SKIP, prompts, lens, jax.random.key(0),
                              SamplingParams.make(2), jnp.asarray([12, 12]), spec=spec,
                              max_new_tokens=24, chunk=8)  # fmt: skip
        for _ in range(3):
            st = step(PARAMS, SKIP, st, spec)
    chex.clear_trace_counter()
