"""Exact-joint helpers for sampling-losslessness tests of drafts (three tokens, vocab 8)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.kv_cache import init_cache
from jaxspec.model import forward
from jaxspec.sampling import SamplingParams, probs
from jaxspec.speculative import SpecConfig, spec_generate

PROMPT = [3, 1, 4, 1, 5]
TEMP, TOP_P = 0.9, 0.95
N_ROWS = 24_000


def exact_joint(params, cfg, prompt=PROMPT) -> np.ndarray:
    """P(t1, t2, t3 | prompt) under `params` at TEMP / TOP_P: [V, V, V]."""
    V, P = cfg.vocab_size, len(prompt)
    seqs = np.array([prompt + [a, b] for a in range(V) for b in range(V)], np.int32)
    T = seqs.shape[1]
    logits, _ = forward(params, cfg, jnp.asarray(seqs), jnp.broadcast_to(jnp.arange(T), seqs.shape),
                        init_cache(cfg, len(seqs), T))  # fmt: skip
    sp = SamplingParams.make(len(seqs), TEMP, 0, TOP_P)
    p = [np.asarray(probs(logits[:, P - 1 + i], sp)) for i in range(3)]
    return p[0][0][:, None, None] * p[1].reshape(V, V, V)[:, 0][:, :, None] * p[2].reshape(V, V, V)


def sample_counts(target, draft, cfg, verifier, tree, key=0, magicdec=None) -> np.ndarray:
    V = cfg.vocab_size
    prompts = jnp.zeros((N_ROWS, 8), jnp.int32).at[:, : len(PROMPT)].set(jnp.asarray(PROMPT))
    spec = SpecConfig(cfg, cfg, tree, verifier, magicdec=magicdec)
    st = spec_generate(target, draft, prompts, jnp.full((N_ROWS,), len(PROMPT)),
                       jax.random.key(key), SamplingParams.make(N_ROWS, TEMP, 0, TOP_P),
                       jnp.full((N_ROWS,), 3), spec=spec, max_new_tokens=4, chunk=8)  # fmt: skip
    toks = np.asarray(st.tokens[:, :3])
    counts = np.zeros((V, V, V))
    np.add.at(counts, (toks[:, 0], toks[:, 1], toks[:, 2]), 1)
    return counts


def chi_square_ok(counts: np.ndarray, p: np.ndarray) -> tuple[bool, float, int]:
    expected = (p * counts.sum()).ravel()
    observed = counts.ravel()
    assert observed[expected == 0].sum() == 0, "a token with probability 0 was emitted"
    small = expected < 5
    exp = np.append(expected[~small], expected[small].sum())
    obs = np.append(observed[~small], observed[small].sum())
    keep = exp > 0
    chi2 = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    return chi2 < dof + 5 * np.sqrt(2 * dof), chi2, dof
