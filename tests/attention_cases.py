"""One case base for the attention ops, run three ways (reference, Pallas interpret on CPU,
compiled Pallas on a GPU) against a naive float64 attention that gathers only the visible keys.

Each case draws fresh random inputs from its own seed. Invariants every case checks:
  * real query rows equal the naive masked attention (float32 to rounding, bf16 to its precision);
  * NaN written into masked/padded K/V (scratch slots past the length, padded tree nodes,
    unselected blocks) never reaches a real row's output.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    B: int = 2
    T: int = 4
    H: int = 6
    K: int = 2
    S: int = 96
    E: int = 64
    dtype: str = "float32"
    lengths: tuple[int, ...] = (37, 90)
    tree: str = "random"  # "random" | "causal"
    pad: int = 0  # trailing padded tree nodes (nobody sees them, they see nothing; K/V are NaN)
    nan: bool = True  # NaN in the scratch slots past each row's length
    block_size: int = 16  # sparse op: cache block size
    num_blocks: int = 4  # sparse op: block-list entries per (row, KV head)

    @property
    def tol(self) -> float:
        return 2e-5 if self.dtype == "float32" else 3e-2


CASES = [
    Case("base"),
    Case("decode_N1", T=1),
    Case("mha", H=4, K=4),
    Case("gqa_g4_e32", H=8, K=2, E=32),
    Case("e128", E=128, H=3, K=1),
    Case("smollm2_shape", H=9, K=3, T=8, S=200, lengths=(0, 150)),
    Case("length0_and_full", lengths=(0, 96)),
    Case("padded_nodes", T=8, pad=3),
    Case("causal_chunk", T=16, tree="causal", lengths=(5, 64)),
    Case("bf16", dtype="bfloat16", T=6, pad=2),
    Case("batch1_long", B=1, S=600, lengths=(517,), T=3),
    Case("no_nan_odd_slots", S=77, lengths=(77, 13), nan=False),
]


def _rng(case: Case, salt: str = "") -> np.random.Generator:
    return np.random.default_rng(zlib.crc32((case.name + salt).encode()))


def tree_mask(case: Case, rng) -> np.ndarray:
    """bool[B, T, T] ancestor masks (self included): random trees per row, or causal chunks;
    the last `pad` nodes are padding: all-False rows and columns (their outputs are unspecified)."""
    B, T = case.B, case.T
    masks = np.zeros((B, T, T), bool)
    real = T - case.pad
    for b in range(B):
        if case.tree == "causal":
            masks[b, :real, :real] = np.tril(np.ones((real, real), bool))
        else:
            parent = [-1] + [int(rng.integers(0, i)) for i in range(1, real)]
            for i in range(real):
                j = i
                while j >= 0:
                    masks[b, i, j] = True
                    j = parent[j]
    return masks


def block_lists(case: Case, rng) -> np.ndarray:
    """int32[B, K, NB]: distinct random blocks of the cache per (row, KV head), -1 padded."""
    nblocks = -(-case.S // case.block_size)
    out = np.full((case.B, case.K, case.num_blocks), -1, np.int32)
    for b in range(case.B):
        for k in range(case.K):
            n = int(rng.integers(1, min(case.num_blocks, nblocks) + 1))
            chosen = rng.choice(nblocks, size=n, replace=False)
            out[b, k, rng.permutation(case.num_blocks)[:n]] = chosen
    return out


def make_inputs(case: Case, sparse: bool = False) -> dict:
    rng = _rng(case, "sparse" if sparse else "")
    B, T, H, K, S, E = case.B, case.T, case.H, case.K, case.S, case.E
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    q, kc, vc = normal(B, T, H, E), normal(B, K, S, E), normal(B, K, S, E)
    kn, vn = normal(B, T, K, E), normal(B, T, K, E)
    lengths = np.asarray(case.lengths, np.int32)
    if case.nan:
        for b in range(B):
            kc[b, :, lengths[b] :] = np.nan
            vc[b, :, lengths[b] :] = np.nan
    real = T - case.pad
    kn[:, real:] = np.nan
    vn[:, real:] = np.nan
    inputs = dict(
        q=q, k_cache=kc, v_cache=vc, lengths=lengths, k_new=kn, v_new=vn,
        inflight=tree_mask(case, rng),
    )  # fmt: skip
    if sparse:
        blocks = block_lists(case, rng)
        inputs["block_indices"] = blocks
        # NaN in every slot no block list selects, for every KV head
        bs = case.block_size
        for b in range(B):
            for k in range(K):
                sel = np.zeros(S, bool)
                for i in blocks[b, k]:
                    if i >= 0:
                        sel[i * bs : (i + 1) * bs] = True
                kc[b, k, ~sel] = np.nan
                vc[b, k, ~sel] = np.nan
    return inputs


def to_jax(inputs: dict, dtype: str) -> dict:
    out = {}
    for name, x in inputs.items():
        if x.dtype == np.float32:
            out[name] = jnp.asarray(x, dtype)
        else:
            out[name] = jnp.asarray(x)
    return out


def naive(inputs: dict, case: Case, sparse: bool = False) -> np.ndarray:
    """float64 attention gathering only the keys each query sees (inputs rounded to the dtype)."""
    j = to_jax(inputs, case.dtype)
    q, kc, vc, kn, vn = (
        np.asarray(j[n], np.float64) for n in ("q", "k_cache", "v_cache", "k_new", "v_new")
    )
    lengths, mask = inputs["lengths"], inputs["inflight"]
    B, T, H, E = q.shape
    K = kc.shape[1]
    G = H // K
    out = np.zeros((B, T, H, E))
    for b in range(B):
        for h in range(H):
            k = h // G
            slots = np.arange(lengths[b])
            if sparse:
                bs = case.block_size
                listed = {int(i) for i in inputs["block_indices"][b, k] if i >= 0}
                slots = np.asarray([s for s in slots if s // bs in listed], int)
            for t in range(T - case.pad):
                seen = np.flatnonzero(mask[b, t])
                keys = np.concatenate([kc[b, k, slots], kn[b, seen, k]])
                vals = np.concatenate([vc[b, k, slots], vn[b, seen, k]])
                s = keys @ q[b, t, h] / np.sqrt(E)
                p = np.exp(s - s.max())
                out[b, t, h] = (p / p.sum()) @ vals
    return out


def check(out, inputs: dict, case: Case, sparse: bool = False):
    """Real rows (not padded nodes) equal the naive attention; nothing NaN leaks into them."""
    ref = naive(inputs, case, sparse)
    real = case.T - case.pad
    got = np.asarray(jnp.asarray(out, jnp.float32), np.float64)[:, :real]
    assert np.isfinite(got).all(), "NaN/inf leaked into a real row"
    np.testing.assert_allclose(got, ref[:, :real], atol=case.tol, rtol=case.tol)
