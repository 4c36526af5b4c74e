"""The shared case of the sharding tests (no JAX configuration here: imported by the test
process and by the workers that start JAX with 8 simulated devices or as 2 processes)."""

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxspec.testing import TINY

# 16 query heads over 8 KV heads, MLP 64 and vocabulary 64: every model axis up to 8 divides
CFG = dataclasses.replace(TINY, num_heads=16, num_kv_heads=8, hidden_size=64,
                          intermediate_size=64, head_dim=8)  # fmt: skip
MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
B, P, OUT = 8, 16, 20


def inputs():
    """Ragged prompts that repeat a 4-token pattern (so n-gram drafts hit), per-row limits."""
    rng = np.random.default_rng(0)
    lengths = np.array([3, 16, 9, 12, 5, 16, 7, 11], np.int32)
    arr = np.zeros((B, P), np.int32)
    for i, n in enumerate(lengths):
        arr[i, :n] = np.resize(rng.integers(4, CFG.vocab_size, 4), n)
    max_new = np.array([20, 7, 20, 13, 20, 4, 20, 16], np.int32)
    return jnp.asarray(arr), jnp.asarray(lengths), jnp.asarray(max_new)


def outputs(state) -> list[list[int]]:
    toks, n = np.asarray(state.tokens), np.asarray(state.n_out)
    return [toks[i, : n[i]].tolist() for i in range(toks.shape[0])]
