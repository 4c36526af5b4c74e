"""Distributional losslessness of the whole speculative system at T > 0.

On a tiny fp32 model with V = 8, the joint distribution of the first three generated tokens
(the first from the prefill, the next two from speculative steps) is enumerated exactly from the
target alone (8^3 cells, temperature and top-p applied). The speculative system, with an
unrelated random draft, samples 24,000 rows in one batch; a chi-square goodness-of-fit test
(cells with expected count < 5 pooled) must pass at ~5 sigma, for each verifier and two tree
shapes, and for model-free n-gram trees (SSSD: drafts from a repetitive prompt, point-mass
rule; the test also checks drafts were accepted, so it exercises the n-gram path). A deliberately
wrong system (the draft's distribution emitted instead of the target's)
fails the same test, so the test can fail.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests_helpers_joint import chi_square_ok

from jaxspec.drafting.ngram import NgramConfig
from jaxspec.kv_cache import init_cache
from jaxspec.model import forward, init_params
from jaxspec.sampling import SamplingParams, probs
from jaxspec.speculative import SpecConfig, spec_generate
from jaxspec.testing import TINY
from jaxspec.trees import chain, kary

CFG = dataclasses.replace(TINY, vocab_size=8, eos_token_ids=(), num_layers=2)
TARGET = init_params(CFG, jax.random.key(0), scale=0.6)
DRAFT = init_params(CFG, jax.random.key(7), scale=0.6)
PROMPT = [3, 1, 4, 1, 5]
NGRAM_PROMPT = [3, 1, 4, 1, 5, 1, 4, 1]  # repeats: the n-gram drafter has matches to propose
TEMP, TOP_P = 0.9, 0.95
N_ROWS = 24_000


def exact_joint(params, prompt=PROMPT) -> np.ndarray:
    """P(t1, t2, t3 | prompt) under `params`, temperature TEMP and top-p TOP_P: [8, 8, 8]."""
    V, P = CFG.vocab_size, len(prompt)
    seqs = np.array([prompt + [a, b] for a in range(V) for b in range(V)], np.int32)  # [64, P+2]
    T = seqs.shape[1]
    logits, _ = forward(params, CFG, jnp.asarray(seqs), jnp.broadcast_to(jnp.arange(T), seqs.shape),
                        init_cache(CFG, len(seqs), T))  # fmt: skip
    sp = SamplingParams.make(len(seqs), TEMP, 0, TOP_P)
    p = [np.asarray(probs(logits[:, P - 1 + i], sp)) for i in range(3)]  # [64, V] each
    p1 = p[0][0]  # the same for every row
    p2 = p[1].reshape(V, V, V)[:, 0]  # [t1, t2]
    p3 = p[2].reshape(V, V, V)  # [t1, t2, t3]
    return p1[:, None, None] * p2[:, :, None] * p3


def sample_system(verifier, tree, key=0, ngram=None, prompt=PROMPT, ds=None, **spec_kw
                  ) -> np.ndarray:  # fmt: skip
    P = 8
    prompts = jnp.zeros((N_ROWS, P), jnp.int32).at[:, : len(prompt)].set(jnp.asarray(prompt))
    spec = SpecConfig(CFG, CFG, tree, verifier, ngram=ngram, **spec_kw)
    draft = ds if ngram is not None else DRAFT
    st = spec_generate(TARGET, draft, prompts, jnp.full((N_ROWS,), len(prompt)),
                       jax.random.key(key), SamplingParams.make(N_ROWS, TEMP, 0, TOP_P),
                       jnp.full((N_ROWS,), 3), spec=spec, max_new_tokens=4, chunk=8)  # fmt: skip
    toks = np.asarray(st.tokens[:, :3])
    assert (np.asarray(st.n_out) == 3).all()
    if ngram is not None:
        assert np.asarray(st.accepted).sum() > N_ROWS // 20, "n-gram drafts were hardly used"
    counts = np.zeros((8, 8, 8))
    np.add.at(counts, (toks[:, 0], toks[:, 1], toks[:, 2]), 1)
    return counts


JOINT = None


def joint():
    global JOINT
    if JOINT is None:
        JOINT = exact_joint(TARGET)
    return JOINT


@pytest.mark.parametrize("verifier", ["swor", "rrs", "spechub", "point_mass"])
@pytest.mark.parametrize("tree", ["chain2", "kary2x2"])
def test_joint_of_first_three_tokens_matches_target(verifier, tree):
    t = {"chain2": chain(2), "kary2x2": kary(2, 2)}[tree]
    ok, chi2, dof = chi_square_ok(sample_system(verifier, t), joint())
    assert ok, (chi2, dof)


def test_joint_with_spechub_at_every_binary_node():
    """`hub_threshold` 0: SpecHub pairs at every 2-child node (the default 0.3 mixes SpecHub and
    SWOR nodes in the test above; a threshold above 1 is plain SWOR)."""
    ok, chi2, dof = chi_square_ok(sample_system("spechub", kary(2, 2), hub_threshold=0.0),
                                  joint())  # fmt: skip
    assert ok, (chi2, dof)


@pytest.mark.parametrize(
    "nodes,datastore,adaptive",
    [(2, False, False), (4, False, False), (4, True, False), (4, True, True)],
)
def test_joint_with_ngram_trees_matches_target(nodes, datastore, adaptive):
    """`adaptive`: the verify width is chosen per step from the batch's trees (0, 1 or 4 nodes;
    costs low enough that drafts are verified) — still lossless."""
    from jaxspec.drafting.datastore import Datastore, build_arrays

    widths = dict(widths=(0, 1, 4), width_cost=(1.0, 1.01, 1.02)) if adaptive else {}
    ngram = NgramConfig(num_nodes=nodes, branch_length=2, max_query=2, matches_per_length=2,
                        datastore_matches=4, min_datastore_matches=2, **widths)  # fmt: skip
    ds = None
    if datastore:  # a random corpus over the 8 tokens: every query has continuations
        docs = np.random.default_rng(0).integers(0, 8, (20, 30)).tolist()
        ds = Datastore.from_arrays(*build_arrays(docs))
    counts = sample_system("point_mass", chain(0), ngram=ngram, prompt=NGRAM_PROMPT, ds=ds)
    ok, chi2, dof = chi_square_ok(counts, exact_joint(TARGET, NGRAM_PROMPT))
    assert ok, (chi2, dof)


def test_the_check_catches_a_wrong_distribution():
    """Negative control: the draft model's own joint fails against the target's."""
    rng = np.random.default_rng(0)
    q = exact_joint(DRAFT).ravel()
    counts = rng.multinomial(N_ROWS, q / q.sum()).reshape(8, 8, 8).astype(float)
    p = joint()
    counts[p == 0] = 0  # keep the zero-probability assertion out of the way
    assert not chi_square_ok(counts, p)[0]
