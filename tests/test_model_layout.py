"""The three layouts of the same params (`jaxspec.model.params`): input-major `LayerParams`,
output-major `LayerWeights` (stacked) and unrolled (a tuple of per-layer `LayerWeights`).

Invariants: output_major / unrolled then input_major gives the params back bit for bit; every
forward (tied and untied heads, q/k/v bias, causal and tree masks, the queries output, the
write=False K/V, CritiPrefill's sparse prefill) gives the same logits, cache and queries in every
layout up to float32 rounding (the matmuls run with their operands swapped, so sums associate
differently: the tolerance, 1e-4 on logits of magnitude ~5, is 5x the largest difference
observed, 2e-5); the runner decodes the same tokens in every layout; the unrolled decode step
updates the donated cache in place (XLA copies no cache-sized buffer). A per-layer cache
(`KVCache.layered`) holds the same K/V as the stacked one, with non-finite values stored as 0;
slot gathers and scatters and the forward give the same results in both forms; a decode loop over
per-layer caches makes no cache-sized buffer but in-place scatters."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.critiprefill import CritiPrefill
from jaxspec.drafting.vocab import in_layout, make_vocab_draft
from jaxspec.errors import InputError
from jaxspec.kv_cache import init_cache, with_k_layout
from jaxspec.model import (
    LayerWeights,
    forward,
    forward_hidden,
    input_major,
    is_output_major,
    is_unrolled,
    output_major,
    stacked,
    unrolled,
)
from jaxspec.prefill import prefill_cache
from jaxspec.runner import GenerateOptions, Runner, resolve_layout
from jaxspec.testing import TINY, tiny_model

QWEN = dataclasses.replace(TINY, arch="qwen2", attention_bias=True, tie_word_embeddings=False)
CASES = {"llama tied": TINY, "qwen2 bias untied": QWEN}


def close(a, b, atol=1e-4):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("cfg", list(CASES.values()), ids=list(CASES))
def test_layout_roundtrip_and_shapes(cfg):
    _, params = tiny_model(cfg=cfg)
    om = output_major(params)
    assert is_output_major(om) and not is_output_major(params)
    assert isinstance(om.layers, LayerWeights)
    L, M, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    lw = om.layers
    assert lw.wqkv.shape == (L, cfg.num_kv_heads, cfg.group_size + 2, cfg.head_dim, M)
    assert lw.wo.shape == (L, M, cfg.num_heads, cfg.head_dim)
    assert lw.w_gate_up.shape == (L, 2, F, M) and lw.w_down.shape == (L, M, F)
    assert (lw.bqkv is not None) == cfg.attention_bias
    back = input_major(om)
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(back), leaves(params), strict=True):
        assert a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))
    assert output_major(om) is om and input_major(params) is params
    un = unrolled(params)
    assert is_unrolled(un) and is_output_major(un) and not is_unrolled(om)
    assert len(un.layers) == L and all(isinstance(lp, LayerWeights) for lp in un.layers)
    for i, lp in enumerate(un.layers):  # layer i of the stack, without the L axis
        for a, b in zip(leaves(lp), leaves(lw), strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b[i]))
    for back in (input_major(un), input_major(unrolled(om))):
        for a, b in zip(leaves(back), leaves(params), strict=True):
            assert a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(leaves(output_major(un)), leaves(om), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert unrolled(un) is un and stacked(om) is om and stacked(params) is params
    assert isinstance(stacked(un).layers, LayerWeights)


@pytest.mark.parametrize("cfg", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("layout", ["output", "unrolled"])
def test_forward_is_the_same_in_every_layout(cfg, layout):
    _, params = tiny_model(cfg=cfg)
    un = in_layout(params, layout)
    B, T, ctx = 2, 5, 7
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    cache = init_cache(cfg, B, ctx + T)
    # a committed prefix of different lengths per row
    k0 = jnp.asarray(rng.normal(size=cache.k.shape), jnp.float32)
    cache = cache.replace(k=k0, v=k0 * 0.5, lengths=jnp.asarray([ctx, 3], jnp.int32))
    pos = cache.lengths[:, None] + jnp.asarray([0, 1, 1, 2, 2])[None]  # a small tree
    parents = np.array([-1, 0, 0, 1, 2])
    anc = np.eye(T, dtype=bool)
    for i in range(1, T):
        anc[i] |= anc[parents[i]]
    slot_last = with_k_layout(cache, True)  # K as [L, B, K, E, S], as unrolled decoding keeps it
    for mask in (None, jnp.asarray(anc)[None]):
        if mask is None:
            pos = cache.lengths[:, None] + jnp.arange(T)[None]
        fn = jax.jit(lambda p, c, m=mask, q=pos: forward(p, cfg, toks, q, c, m))
        la, ca = fn(params, cache)
        for c in (cache, slot_last):
            lb, cb = fn(un, c)
            assert cb.k_slot_last == c.k_slot_last
            close(la, lb)
            close(ca.k, cb.k_std())
            close(ca.v, cb.v)
    qa = forward_hidden(params, cfg, toks, pos, cache, queries=True)[2]
    qb = forward_hidden(un, cfg, toks, pos, cache, queries=True)[2]
    assert qa.shape == qb.shape == (cfg.num_layers, B, T, cfg.num_heads, cfg.head_dim)
    close(qa, qb)
    (ha, (ka, va)), (hb, (kb, vb)) = (
        forward_hidden(p, cfg, toks, pos, cache, write=False) for p in (params, un)
    )
    assert ka.shape == kb.shape == (cfg.num_layers, B, T, cfg.num_kv_heads, cfg.head_dim)
    close(ha, hb)
    close(ka, kb)
    close(va, vb)


def test_sparse_prefill_is_the_same_in_every_layout():
    cfg, params = tiny_model(cfg=dataclasses.replace(TINY, max_position_embeddings=1024))
    cfg = dataclasses.replace(cfg, prefill=CritiPrefill(64, 16, 64, 128))
    rng = np.random.default_rng(1)
    toks = jnp.asarray(rng.integers(4, cfg.vocab_size, (2, 384)), jnp.int32)
    lengths = jnp.asarray([384, 250], jnp.int32)
    ca, ha = prefill_cache(params, cfg, toks, lengths, slots=448, chunk=64)
    for other in (output_major(params), unrolled(params)):
        cb, hb = prefill_cache(other, cfg, toks, lengths, slots=448, chunk=64)
        assert cb.k_slot_last == is_unrolled(other)  # the cache unrolled decoding reads
        close(ha, hb)
        close(ca.k, cb.k_std())


# slow (112 s): every layout's forward is compared directly in
# test_forward_is_the_same_in_every_layout
@pytest.mark.slow
def test_runner_layouts_decode_the_same_tokens():
    from jaxspec.speculative import SpecConfig
    from jaxspec.trees import kary

    cfg, params = tiny_model()
    _, dparams = tiny_model(seed=1)
    prompts = [[5, 9, 11, 4], [7, 8, 20, 21, 22, 30, 31], [12]]
    opts = GenerateOptions(max_new_tokens=12, batch_size=4)
    spec = SpecConfig(cfg, cfg, kary(2, 2))
    vocab = make_vocab_draft(dparams, np.arange(0, cfg.vocab_size, 2))
    for sp, dp in ((None, None), (spec, dparams), (spec, vocab)):
        outs = {}
        for layout in ("input", "output", "unrolled"):
            r = Runner(params, cfg, sp, dp, time_phases=False, layout=layout)
            assert r.layout == layout
            assert is_output_major(r.params) == (layout != "input")
            assert is_unrolled(r.params) == (layout == "unrolled")
            outs[layout] = r.run(prompts, opts)[0]
        assert outs["input"] == outs["output"] == outs["unrolled"]
        assert sum(map(len, outs["input"])) > len(prompts)
    # self-speculation shares one converted copy; params in the other layout are converted
    r = Runner(params, cfg, spec, params, layout="output")
    assert r.draft_params is r.params
    r = Runner(output_major(params), cfg, layout="input")
    assert not is_output_major(r.params)
    assert is_output_major(in_layout(vocab, "output").params)
    assert in_layout(None, "output") is None  # no draft (or a datastore): unchanged
    r = Runner(params, cfg, spec, vocab, layout="unrolled")
    assert is_unrolled(r.params) and is_unrolled(r.draft_params.params)


def test_layout_choice_errors(monkeypatch):
    monkeypatch.delenv("JAXSPEC_LAYOUT", raising=False)
    assert resolve_layout("auto") == ("unrolled" if jax.default_backend() == "cpu" else "input")
    if jax.default_backend() == "cpu":
        monkeypatch.setenv("JAXSPEC_LAYOUT", "output")
        assert resolve_layout("auto") == "output"
        monkeypatch.setenv("JAXSPEC_LAYOUT", "fast")
        msg = "JAXSPEC_LAYOUT='fast': must be one of input, output, unrolled"
        with pytest.raises(InputError, match=msg):
            resolve_layout("auto")
        assert resolve_layout("unrolled") == "unrolled"  # the variable only steers auto
    msg = "layout must be one of auto, input, output, unrolled, got 'fast'"
    with pytest.raises(InputError, match=msg):
        resolve_layout("fast")
    for layout in ("output", "unrolled"):
        with pytest.raises(InputError, match=f"layout='{layout}' is for one device"):
            resolve_layout(layout, mesh=object())
    assert resolve_layout("auto", mesh=object()) == "input"


@pytest.mark.parametrize("layout", ["output", "unrolled"])
def test_decode_step_updates_the_cache_in_place(layout):
    """A decode loop over the donated cache: the compiled program copies no cache-sized buffer.
    Unrolled, the last layer's attention read is otherwise no ancestor of the cache write, and
    XLA copies the whole cache (both K and V) every step to keep that read valid."""
    cfg, params = tiny_model()
    params = in_layout(params, layout)
    B, S = 2, 64
    kt = is_unrolled(params)  # unrolled decoding keeps K slot-last (as `prefill_cache` builds it)
    cache = init_cache(cfg, B, S, k_slot_last=kt).replace(lengths=jnp.asarray([5, 9], jnp.int32))

    def run(p, tok, cache):
        def body(_, carry):
            tok, cache = carry
            logits, cache = forward(p, cfg, tok, cache.lengths[:, None], cache)
            cache = cache.replace(lengths=cache.lengths + 1)
            return jnp.argmax(logits, -1).astype(jnp.int32), cache

        return jax.lax.fori_loop(0, 4, body, (tok, cache))

    tok = jnp.ones((B, 1), jnp.int32)
    hlo = jax.jit(run, donate_argnums=(2,)).lower(params, tok, cache).compile().as_text()
    L, K, E = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    for shape in (f"f32[{L},{B},{K},{S},{E}]", f"f32[{L},{B},{K},{E},{S}]" if kt else None):
        if shape is None:
            continue
        assert shape in hlo
        copies = [
            ln for ln in hlo.splitlines() if re.search(rf"= {re.escape(shape)}\S* copy\(", ln)
        ]
        assert not copies, copies


@pytest.mark.parametrize("per_layer", [False, True], ids=["stacked", "per-layer"])
@pytest.mark.parametrize("method", ["ar", "chain", "adaptive sssd", "magicdec"])
def test_speculative_decode_loop_updates_the_cache_in_place(method, per_layer):
    """The jitted decode loop (`spec_decode`, unrolled params, slot-last cache) copies no
    cache-sized buffer: the verify's new K/V are written once, after the walk, accepted path
    only (`_commit_new`), also behind adaptive SSSD's `lax.switch` over verify widths. Per layer,
    MagicDec's compact draft cache too is only updated in place (ring commits, re-rotated
    sinks)."""
    from jaxspec.drafting.ngram import NgramConfig
    from jaxspec.magicdec import MagicDec
    from jaxspec.sampling import SamplingParams
    from jaxspec.speculative import SpecConfig, decode_layout, spec_decode, spec_start
    from jaxspec.trees import chain

    cfg, params = tiny_model()
    params = unrolled(params)
    B, P, new = 3, 16, 8
    spec = {
        "ar": SpecConfig(cfg, cfg, chain(0)),
        "chain": SpecConfig(cfg, cfg, chain(2)),
        "adaptive sssd": SpecConfig(cfg, cfg, chain(0), "greedy", ngram=NgramConfig(
            num_nodes=6, branch_length=3, widths=(0, 1, 6), width_cost=(1.0, 1.1, 1.3))),
        "magicdec": SpecConfig(cfg, cfg, chain(2), "greedy", magicdec=MagicDec(budget=20, sink=2)),
    }[method]  # fmt: skip
    draft = params if spec.uses_draft_model else None
    prompts = jnp.ones((B, P), jnp.int32)
    cache, last_h = prefill_cache(params, cfg, prompts, jnp.asarray([5, 9, 16], jnp.int32),
                                  slots=P + new + 8, chunk=8)  # fmt: skip
    assert cache.k_slot_last
    st = spec_start(params, draft, cache, last_h, prompts, jax.random.key(0),
                    SamplingParams.make(B), jnp.full((B,), new), spec=spec,
                    max_new_tokens=new, chunk=8)  # fmt: skip
    if per_layer:  # what `spec_prefill` decodes with unrolled weights
        st = decode_layout(params, draft, spec, st)
        assert st.cache.per_layer
    hlo = spec_decode.lower(params, draft, st, spec).compile().as_text()
    L, K, E, S = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, st.cache.num_slots
    if per_layer:  # each layer's buffer is read in place and written by an in-place scatter only
        sizes = [S]
        if method == "magicdec":
            assert st.draft_cache.per_layer and st.draft_cache.num_slots != S
            sizes.append(st.draft_cache.num_slots)
        for n in sizes:
            for shape in (f"f32[{B},{K},{n},{E}]", f"f32[{B},{K},{E},{n}]"):
                made = re.findall(rf"%(\S+) = {re.escape(shape)}\S* ([\w-]+)\(", hlo)
                assert made
                in_place = ("scatter", "dynamic-update-slice")
                other = [(name, op) for name, op in made
                         if op not in ("parameter", "get-tuple-element")
                         and not any(w in name or w == op for w in in_place)]  # fmt: skip
                assert not other, (shape, other)
        return
    for shape in (f"f32[{L},{B},{K},{S},{E}]", f"f32[{L},{B},{K},{E},{S}]"):
        assert shape in hlo
        copies = [
            ln for ln in hlo.splitlines() if re.search(rf"= {re.escape(shape)}\S* copy\(", ln)
        ]
        assert not copies, copies


@pytest.mark.parametrize("slot_last", [False, True], ids=["k", "k-slot-last"])
def test_per_layer_cache_holds_the_same_slots(slot_last):
    """layered / stacked / gather_slots / scatter_slots agree between the two forms; non-finite
    values become 0 in a per-layer cache (on conversion and on every write)."""
    cfg, _ = tiny_model()
    B, S = 3, 12
    rng = np.random.default_rng(0)
    cache = init_cache(cfg, B, S, k_slot_last=slot_last)
    k = rng.normal(size=cache.k.shape).astype(np.float32)
    v = rng.normal(size=cache.v.shape).astype(np.float32)
    k.flat[7], v.flat[11] = np.nan, np.inf
    cache = cache.replace(k=jnp.asarray(k), v=jnp.asarray(v), lengths=jnp.asarray([2, 5, 12]))
    lay = cache.layered()
    assert lay.per_layer and lay.num_layers == cfg.num_layers and lay.num_slots == S
    assert lay.layered() is lay and cache.stacked() is cache
    back = lay.stacked()
    np.testing.assert_array_equal(back.k, np.nan_to_num(k, nan=0.0, posinf=0.0))
    np.testing.assert_array_equal(back.v, np.nan_to_num(v, nan=0.0, posinf=0.0))
    np.testing.assert_array_equal(lay.k_std(), back.k_std())
    np.testing.assert_array_equal(lay.v_std(), back.v)
    rows = jnp.arange(B)[:, None]
    slots = jnp.asarray([[0, 3], [4, 1], [11, 12]])  # slot 12 is past the end: dropped
    got, want = lay.gather_slots(rows, slots % S), back.gather_slots(rows, slots % S)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    new = rng.normal(size=(B, 2, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim))
    new = jnp.asarray(new, jnp.float32).at[0, 0, 0, 0, 0].set(jnp.nan)
    a = lay.scatter_slots(rows, slots, new, -new).stacked()
    b = back.scatter_slots(rows, slots, jnp.nan_to_num(new, nan=0.0), -jnp.nan_to_num(new, nan=0.0))
    np.testing.assert_array_equal(a.k, b.k)
    np.testing.assert_array_equal(a.v, b.v)
    assert with_k_layout(lay, not slot_last).stacked().k_std().shape == back.k_std().shape
    np.testing.assert_array_equal(with_k_layout(lay, not slot_last).k_std(), back.k_std())


@pytest.mark.parametrize("layout", ["unrolled", "output"])
def test_forward_is_the_same_with_a_per_layer_cache(layout):
    """Stacked cache vs the same cache per layer: the same logits, written cache and write=False
    K/V, with garbage (finite, and NaN: stored as 0 per layer) in the scratch slots. Stacked
    weights scan a per-layer cache through a stacked copy and hand it back per layer."""
    cfg, params = tiny_model()
    params = in_layout(params, layout)
    B, S, T = 2, 24, 3
    rng = np.random.default_rng(1)
    cache = init_cache(cfg, B, S, k_slot_last=is_unrolled(params))
    k = jnp.asarray(rng.normal(size=cache.k.shape), jnp.float32)
    v = jnp.asarray(rng.normal(size=cache.v.shape), jnp.float32)
    cache = cache.replace(k=k, v=v.at[:, 0, :, 20:].set(jnp.nan),
                          lengths=jnp.asarray([7, 13], jnp.int32))  # fmt: skip
    lay = cache.layered()
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    pos = cache.lengths[:, None] + jnp.arange(T)[None]
    tree = jnp.asarray([[1, 0, 0], [1, 1, 0], [1, 0, 1]], bool)[None]
    for mask in (None, tree):
        la, ca = forward(params, cfg, toks, pos, cache, mask)
        lb, cb = forward(params, cfg, toks, pos, lay, mask)
        assert cb.per_layer and np.isfinite(np.asarray(la)).all()
        close(la, lb)
        for a, b in ((ca.k_std(), cb.k_std()), (ca.v_std(), cb.v_std())):
            for r, n in enumerate(np.asarray(cache.lengths) + T):  # committed + new slots
                close(np.asarray(a)[:, r, :, :n], np.asarray(b)[:, r, :, :n])
        ha, (ka, va) = forward_hidden(params, cfg, toks, pos, cache, mask, write=False)
        hb, (kb, vb) = forward_hidden(params, cfg, toks, pos, lay, mask, write=False)
        close(ha, hb)
        close(ka, kb)
        close(va, vb)
