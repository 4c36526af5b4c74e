"""tree_attention and sparse_kv_attention, each run three ways on the shared case base
(`attention_cases.py`): the jnp reference, the Pallas kernel in interpret mode (CPU, in CI), and the
compiled Pallas kernel (GPU only). Plus the api contract: clear errors, dispatch, fallback."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from attention_cases import CASES, Case, check, make_inputs, to_jax

from pallas_kernels.common import BlockSizes
from pallas_kernels.sparse_kv_attention import sparse_kv_attention
from pallas_kernels.tree_attention import tree_attention

WAYS = [
    pytest.param("reference", id="reference"),
    pytest.param("pallas", id="interpret"),
    pytest.param("pallas", id="gpu", marks=pytest.mark.gpu),
]
GPU = pytest.mark.gpu
IMPL = "pallas"  # interpret mode on CPU, compiled on a GPU
SMALL_BLOCKS = BlockSizes(block_kv=32, block_q=16, num_splits=2)  # many blocks, splits, row blocks


# float32 matmuls at full precision (on a GPU, XLA would otherwise use tf32 in the reference part)
EXACT = jax.default_matmul_precision("highest")


def _tree(case: Case, impl: str):
    inputs = make_inputs(case)
    with EXACT:
        out = tree_attention(**to_jax(inputs, case.dtype), impl=impl, block_sizes=SMALL_BLOCKS)
    check(out, inputs, case)


def _sparse(case: Case, impl: str):
    inputs = make_inputs(case, sparse=True)
    with EXACT:
        x = to_jax(inputs, case.dtype)
        bs = BlockSizes(num_splits=3)
        out = sparse_kv_attention(**x, block_size=case.block_size, impl=impl, block_sizes=bs)
    check(out, inputs, case, sparse=True)


@pytest.mark.parametrize("impl", WAYS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_tree_attention(case, impl):
    _tree(case, impl)


SPARSE_CASES = [
    *CASES[:3],
    Case("sparse_smollm2", H=9, K=3, T=5, S=256, lengths=(200, 256), block_size=32, num_blocks=6),
    Case("sparse_bf16", dtype="bfloat16", pad=1, num_blocks=8),
    Case("sparse_len0", lengths=(0, 50), num_blocks=2),
    Case("sparse_odd_slots", S=77, lengths=(77, 60), block_size=16, num_blocks=5, nan=False),
]


@pytest.mark.parametrize("impl", WAYS)
@pytest.mark.parametrize("case", SPARSE_CASES, ids=lambda c: c.name)
def test_sparse_kv_attention(case, impl):
    _sparse(case, impl)


def test_default_block_sizes_interpret():
    """The default tiling (64-slot blocks, auto splits) on a cache that is not a multiple of 64."""
    case = Case("defaults", S=200, lengths=(150, 199), H=9, K=3)
    inputs = make_inputs(case)
    check(tree_attention(**to_jax(inputs, case.dtype), impl="pallas"), inputs, case)


def test_long_chunk_tree_keys_in_blocks():
    """A prefill-sized chunk (T=40 -> 64 padded keys) walks its own keys in blocks of block_kv."""
    case = Case("long_chunk", T=40, tree="causal", lengths=(0, 33), S=120, H=2, K=1)
    inputs = make_inputs(case)
    with EXACT:
        out = tree_attention(**to_jax(inputs, case.dtype), impl=IMPL, block_sizes=SMALL_BLOCKS)
    check(out, inputs, case)


def test_sparse_all_blocks_equals_tree_attention():
    """Listing every block of the cache is dense attention."""
    case = Case("all_blocks", nan=False)
    x = to_jax(make_inputs(case), case.dtype)
    nb = -(-case.S // 16)
    blocks = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (case.B, case.K, nb))
    for impl in ("reference", "pallas"):
        a = sparse_kv_attention(**x, block_indices=blocks, block_size=16, impl=impl)
        b = tree_attention(**x, impl="reference")
        assert jnp.allclose(a, b, atol=2e-5), impl


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_slot_last_k_cache_is_the_same_attention(case):
    """K stored [B, K, E, S] (the CPU cache of unrolled weights): the reference on the whole case
    base (NaN in masked slots included); the kernel declines it, so auto falls back."""
    inputs = make_inputs(case)
    x = to_jax(inputs, case.dtype)
    x = {**x, "k_cache": x["k_cache"].swapaxes(2, 3)}
    with EXACT:
        out = tree_attention(**x, impl="reference", k_slot_last=True)
    check(out, inputs, case)
    with pytest.raises(NotImplementedError, match="slot-last"):
        tree_attention(**x, impl="pallas", k_slot_last=True)
    with pytest.raises(ValueError, match=r"k_cache must be \[B, K, E, S\]"):
        tree_attention(**{**x, "k_cache": x["k_cache"][..., :-1]}, k_slot_last=True)


def test_sliding_window_falls_back_to_reference():
    """auto uses the reference where the kernel raises NotImplementedError; pallas raises."""
    case = Case("window", nan=False)
    x = to_jax(make_inputs(case), case.dtype)
    pos = x["lengths"][:, None] + jnp.arange(case.T)[None]
    ref = tree_attention(**x, positions=pos, sliding_window=8, impl="reference")
    assert jnp.array_equal(tree_attention(**x, positions=pos, sliding_window=8, impl="auto"), ref)
    with pytest.raises(NotImplementedError, match="sliding window"):
        tree_attention(**x, positions=pos, sliding_window=8, impl="pallas")


def test_bad_inputs_give_clear_errors():
    case = Case("errors")
    x = to_jax(make_inputs(case), case.dtype)
    with pytest.raises(ValueError, match="impl must be one of"):
        tree_attention(**x, impl="triton")
    with pytest.raises(ValueError, match="not a multiple of KV heads"):
        tree_attention(**{**x, "q": x["q"][:, :, :5]})
    with pytest.raises(ValueError, match=r"lengths must be int\[B=2\]"):
        tree_attention(**{**x, "lengths": x["lengths"].astype(jnp.float32)})
    with pytest.raises(ValueError, match="inflight mask must be bool"):
        tree_attention(**{**x, "inflight": x["inflight"].astype(jnp.int32)})
    with pytest.raises(ValueError, match=r"k_new must be \[B, T, K, E\]"):
        tree_attention(**{**x, "k_new": x["k_new"][:, :2]})
    with pytest.raises(ValueError, match="block_indices must be"):
        sparse_kv_attention(**x, block_indices=jnp.zeros((2, 5, 3), jnp.int32), block_size=16)
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_kv=48)


def test_kernel_is_jittable_with_one_compile_per_shape():
    case = Case("jit", nan=False)
    x = to_jax(make_inputs(case), case.dtype)
    f = jax.jit(lambda **kw: tree_attention(**kw, impl="pallas"))
    a = f(**x)
    b = f(**{**x, "lengths": jnp.asarray([3, 50], jnp.int32)})  # new lengths: same executable
    assert f._cache_size() == 1 and a.shape == b.shape


@pytest.mark.parametrize(
    "way", [pytest.param("pallas", id="interpret"), pytest.param("pallas", id="gpu", marks=GPU)]
)
def test_greedy_generation_with_kernels_equals_reference(way):
    """End to end: AR and tree speculation with the Pallas kernel in every attention call give the
    tokens of greedy AR decoding with the reference attention."""
    import dataclasses

    import numpy as np

    from jaxspec.sampling import SamplingParams
    from jaxspec.speculative import SpecConfig, spec_generate
    from jaxspec.testing import TINY, tiny_model
    from jaxspec.trees import chain, kary

    ref_cfg = dataclasses.replace(TINY, head_dim=16, attention="reference")
    cfg, params = tiny_model(cfg=ref_cfg)
    kern_cfg = dataclasses.replace(cfg, attention=way)
    rng = np.random.default_rng(3)
    lengths = [5, 21, 12]
    prompts = np.zeros((3, 32), np.int32)
    for i, n in enumerate(lengths):
        prompts[i, :n] = rng.integers(4, cfg.vocab_size, n)
    prompts, lengths = jnp.asarray(prompts), jnp.asarray(lengths, jnp.int32)
    max_new = jnp.asarray([20, 9, 20])

    def run(target_cfg, tree):
        spec = SpecConfig(target_cfg, target_cfg, tree, "greedy")
        st = spec_generate(params, params, prompts, lengths, jax.random.key(0),
                           SamplingParams.make(3), max_new, spec=spec, max_new_tokens=20,
                           chunk=8)  # fmt: skip
        toks, n = np.asarray(st.tokens), np.asarray(st.n_out)
        return [toks[i, : n[i]].tolist() for i in range(3)]

    with EXACT:
        want = run(cfg, chain(0))
        assert run(kern_cfg, chain(0)) == want
        assert run(kern_cfg, kary(2, 2)) == want
