"""The continuous-batching engine on a tiny model.

Invariants: every request's tokens equal autoregressive greedy decoding of its prompt alone
(truncated at its own max_tokens or EOS), whatever arrives, finishes or is cancelled around it
and whichever bucket's speculation runs; active rows stay packed; a freed slot is reused at
once; bad requests and configurations fail with errors that name the value.
"""

import numpy as np
import pytest

from jaxspec.drafting import NgramConfig
from jaxspec.errors import ConfigError, InputError
from jaxspec.magicdec import MagicDec
from jaxspec.runner import GenerateOptions, Runner
from jaxspec.serving import Engine, EngineConfig, QueueFull, Request
from jaxspec.speculative import SpecConfig
from jaxspec.testing import tiny_model
from jaxspec.trees import chain, load_tree

CFG, PARAMS = tiny_model()
MAX = 24


@pytest.fixture(scope="module")
def prompts_and_ref():
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(4, CFG.vocab_size, size=int(n))]
               for n in rng.integers(3, 40, size=9)]  # fmt: skip
    prompts.append([5, 6, 7, 8] * 6)  # repetitive: n-gram drafts get accepted
    ref, _ = Runner(PARAMS, CFG).run(prompts, GenerateOptions(max_new_tokens=MAX, batch_size=4))
    return prompts, ref


def _ngram(n, **kw):
    ngram = NgramConfig(num_nodes=n, branch_length=3, **kw)
    return SpecConfig(CFG, CFG, chain(0), "point_mass", ngram=ngram)


def _serve(engine, prompts, max_tokens, temperature=None, cancel_after=None):
    """Submit half, run two iterations, submit the rest, run to the end (staggered arrivals)."""
    outs = [[] for _ in prompts]
    reasons = [None] * len(prompts)
    reqs = []
    for i, p in enumerate(prompts):
        t = 0.0 if temperature is None else temperature[i]

        def fin(r, n, i=i):
            reasons[i] = r

        reqs.append(Request(p, max_tokens[i], temperature=t, seed=i, on_tokens=outs[i].extend,
                            on_finish=fin))  # fmt: skip
    half = len(reqs) // 2
    for r in reqs[:half]:
        engine.submit(r)
    for _ in range(2):
        engine._iteration()
        assert sorted(engine._active) == list(range(engine.active))  # packed rows
    if cancel_after is not None:
        engine.cancel(reqs[cancel_after])
    for r in reqs[half:]:
        engine.submit(r)
    while engine.queue_length or engine.active:
        engine._iteration()
        assert sorted(engine._active) == list(range(engine.active))
        assert engine.active <= engine.rows in engine.buckets  # the state is a bucket's size
    return outs, reasons


def _expected(ref, max_tokens):
    return [r[:m] for r, m in zip(ref, max_tokens, strict=True)]


@pytest.mark.parametrize(
    "name,spec_for,draft",
    [
        ("ar", None, None),
        ("sssd+ar buckets", lambda b: _ngram(4) if b <= 2 else None, None),
        (
            "sssd adaptive widths",
            lambda b: _ngram(4, widths=(0, 1, 4), width_cost=(1, 1.05, 1.1)),
            None,
        ),
        ("chain draft model", lambda b: SpecConfig(CFG, CFG, chain(3), "swor"), PARAMS),
        # AR at bucket 4: the draft cache must stay in step through AR steps
        (
            "chain draft + ar buckets",
            lambda b: SpecConfig(CFG, CFG, chain(3), "greedy") if b < 4 else None,
            PARAMS,
        ),
        ("tree draft model", lambda b: SpecConfig(CFG, CFG, load_tree("kary_2x3"), "swor"), PARAMS),
    ],
)
def test_engine_equals_greedy_ar(prompts_and_ref, name, spec_for, draft):
    prompts, ref = prompts_and_ref
    eng = Engine(PARAMS, CFG, EngineConfig(max_batch=4, max_context=96, admit_per_step=2),
                 spec_for=spec_for, draft=draft)  # fmt: skip
    max_tokens = [MAX - 3 * (i % 4) for i in range(len(prompts))]  # rows finish at different steps
    outs, reasons = _serve(eng, prompts, max_tokens)
    assert outs == _expected(ref, max_tokens)
    for o, r, m in zip(outs, reasons, max_tokens, strict=True):
        assert r == ("stop" if o[-1] in CFG.eos_token_ids else "length"), (o, r)
        assert len(o) == m or r == "stop"
    assert eng.metrics.completion_tokens == sum(map(len, outs))
    assert eng.metrics.resizes >= 2  # grew 1 → 2 → 4
    if name.startswith("sssd"):
        assert eng.metrics.accepted > 0  # the repetitive prompt's drafts were accepted
        assert eng.metrics.tau > 1


@pytest.mark.parametrize(
    "spec_for,draft",
    [
        (
            lambda b: _ngram(4, widths=(0, 1, 4), width_cost=(1, 1.05, 1.1)) if b <= 2 else None,
            None,
        ),
        (lambda b: SpecConfig(CFG, CFG, load_tree("kary_2x3"), "swor") if b < 4 else None, PARAMS),
    ],
)
def test_engine_with_unrolled_layers_equals_greedy_ar(prompts_and_ref, spec_for, draft):
    """The CPU default: unrolled weights and slot-last K caches, whose rows (chunked prefill) are
    inserted into the batch state and reshaped between buckets."""
    prompts, ref = prompts_and_ref
    eng = Engine(PARAMS, CFG, EngineConfig(max_batch=4, max_context=96, admit_per_step=2),
                 spec_for=spec_for, draft=draft, layout="unrolled")  # fmt: skip
    max_tokens = [MAX - 3 * (i % 4) for i in range(len(prompts))]
    outs, _ = _serve(eng, prompts, max_tokens)
    assert outs == _expected(ref, max_tokens)
    assert eng.state.cache.k_slot_last


def test_mixed_sampled_and_greedy_rows(prompts_and_ref):
    """Greedy rows stay exact beside sampled rows (point-mass verification, one batch)."""
    prompts, ref = prompts_and_ref
    eng = Engine(PARAMS, CFG, EngineConfig(max_batch=4, max_context=96),
                 spec_for=lambda b: _ngram(4))  # fmt: skip
    temps = [0.0 if i % 2 == 0 else 1.0 for i in range(len(prompts))]
    outs, _ = _serve(eng, prompts, [MAX] * len(prompts), temperature=temps)
    for i, o in enumerate(outs):
        if temps[i] == 0:
            assert o == ref[i]
        else:
            assert 1 <= len(o) <= MAX and all(0 <= t < CFG.vocab_size for t in o)
    sampled = [o for o, t in zip(outs, temps, strict=True) if t > 0]
    assert any(o != ref[i] for i, o in zip(range(1, len(prompts), 2), sampled, strict=True))


def test_cancel_frees_slot_and_stop_token(prompts_and_ref):
    prompts, ref = prompts_and_ref
    eng = Engine(PARAMS, CFG, EngineConfig(max_batch=2, max_context=96))
    outs, reasons = _serve(eng, prompts[:6], [MAX] * 6, cancel_after=0)
    assert reasons[0] == "cancelled" and len(outs[0]) < MAX
    assert outs[1:] == ref[1:6]
    assert eng.metrics.requests["cancelled"] == 1
    # a stop token ends the request after it, and its slot is freed
    stop = ref[1][5]
    got, reason = [], []
    eng.submit(Request(prompts[1], MAX, stop_token_ids=(stop,), on_tokens=got.extend,
                       on_finish=lambda r, n: reason.append(r)))  # fmt: skip
    eng.run_until_idle()
    assert got == ref[1][: ref[1].index(stop) + 1] and reason == ["stop"] and eng.active == 0


def test_queue_full_and_bad_requests():
    eng = Engine(PARAMS, CFG, EngineConfig(max_batch=1, max_context=64, max_queue=2))
    eng.submit(Request([5, 6], 4))
    eng.submit(Request([5, 6], 4))
    with pytest.raises(QueueFull):
        eng.submit(Request([5, 6], 4))
    with pytest.raises(InputError, match="context of 64"):
        eng.check(Request([5] * 60, 5))
    with pytest.raises(InputError, match="max_tokens must be >= 1"):
        eng.check(Request([5], 0))
    with pytest.raises(InputError, match="temperature"):
        eng.check(Request([5], 3, temperature=-1.0))
    with pytest.raises(InputError, match="token id 64 is outside"):
        eng.check(Request([5, 64], 3))
    with pytest.raises(InputError, match="empty"):
        eng.check(Request([], 3))


def test_bad_configs():
    small = EngineConfig(max_context=64)
    with pytest.raises(ConfigError, match="max_context 1000 exceeds the model's context of 512"):
        Engine(PARAMS, CFG, EngineConfig(max_context=1000))
    with pytest.raises(ConfigError, match="max_batch must be >= 1"):
        Engine(PARAMS, CFG, EngineConfig(max_batch=0))
    md = SpecConfig(CFG, CFG, chain(2), magicdec=MagicDec(budget=32, sink=4))
    with pytest.raises(ConfigError, match="does not run MagicDec"):
        Engine(PARAMS, CFG, small, spec_for=lambda b: md, draft=PARAMS)


def test_threaded_engine_drains_on_stop(prompts_and_ref):
    prompts, ref = prompts_and_ref
    eng = Engine(PARAMS, CFG, EngineConfig(max_batch=2, max_context=96),
                 spec_for=lambda b: _ngram(3)).start()  # fmt: skip
    outs = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        eng.submit(Request(p, MAX, on_tokens=outs[i].extend))
    eng.stop(drain=True, timeout=120)
    assert outs == ref
    with pytest.raises(RuntimeError, match="shutting down"):
        eng.submit(Request(prompts[0], 4))


def test_cost_model_gate(prompts_and_ref):
    """compile_steps times every bucket's steps; a bucket whose predicted speedup
    tau_est · t_AR / t_spec is < 1 decodes AR, but speculates every explore_every-th step, and its
    tau estimate follows what it observes. Outputs stay exact either way."""
    prompts, ref = prompts_and_ref
    config = EngineConfig(max_batch=2, max_context=96, explore_every=4, expected_tau=1.5)
    eng = Engine(PARAMS, CFG, config, spec_for=lambda b: _ngram(4))
    eng.compile_steps()
    assert set(eng.step_s) == {(1, True), (1, False), (2, True), (2, False)}
    assert eng.rows == 1 and eng.compile_s > 0
    eng.step_s[(1, False)] = eng.step_s[(1, True)] * 3  # speculation "costs" 3 AR steps
    eng.step_s[(2, False)] = eng.step_s[(2, True)] * 1.2
    assert eng.predicted_speedup(1) == pytest.approx(0.5)
    assert eng.predicted_speedup(2) == pytest.approx(1.25)
    picks = [eng._choose(1) for _ in range(8)]
    assert [p is not None for p in picks] == [False, False, False, True] * 2
    assert eng._choose(2) is eng.specs[2]
    outs, _ = _serve(eng, prompts, [MAX] * len(prompts))
    assert outs == ref
    assert eng.tau_est[2] != 1.5  # observed while speculating


def test_chunked_prefill_interleaves_with_decoding(prompts_and_ref):
    """16-token chunks, one per iteration: long prompts prefill across several decode steps of
    the running rows, and every output is still exact."""
    prompts, ref = prompts_and_ref
    config = EngineConfig(max_batch=4, max_context=96, chunk=16, prefill_budget=16)
    eng = Engine(PARAMS, CFG, config, spec_for=lambda b: _ngram(3))
    outs = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        eng.submit(Request(p, MAX, on_tokens=outs[i].extend))
    overlapped = 0
    while eng.queue_length or eng._prefilling or eng.active:
        steps = eng.metrics.steps
        mid = [p for p in eng._prefilling if 0 < p.done_chunks]
        eng._iteration()
        overlapped += bool(mid) and eng.metrics.steps > steps
    assert outs == ref
    assert overlapped > 0  # decode steps ran while a prompt was half prefilled
    assert max(len(p) for p in prompts) > 16  # (some prompts need several chunks)
