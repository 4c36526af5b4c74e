"""Draft distillation (jaxspec.distill) and reduced-vocabulary drafts (jaxspec.drafting.vocab).

Invariants, on tiny fp32 models:
* The teacher's recorded top-k log-probs at step i are the target's log-softmax after
  prompt ⊕ tokens[:i] (a fresh full forward), and greedy rows emit jaxspec's AR greedy tokens.
* Teacher shards resume: a second run generates nothing; a deleted shard is regenerated equal.
* Training is a pure function of (config, data, step): an interrupted run resumed from its latest
  orbax checkpoint ends with exactly the params of an uninterrupted run; a few steps lower the KL.
* A reduced-vocabulary draft puts zero mass outside its vocabulary, and speculative decoding with
  it is lossless: greedy output == AR, and the sampled joint of three tokens matches the target.
* The built draft is a normal checkpoint: `load_model` + `load_draft` give a `VocabDraft` that
  drives speculative generation with greedy output identical to AR; resume/config errors name
  the file and the setting.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.distill import DistillConfig, build_draft
from jaxspec.distill.teacher import generate_shards, load_shards, teacher_generate
from jaxspec.distill.train import choose_vocab, export_params, train
from jaxspec.drafting.vocab import VocabDraft, draft_forward, load_draft, make_vocab_draft
from jaxspec.errors import CheckpointError, ConfigError
from jaxspec.kv_cache import init_cache
from jaxspec.model import forward, init_params
from jaxspec.models import LoadedModel, load_model
from jaxspec.sampling import SamplingParams
from jaxspec.speculative import SpecConfig, spec_generate
from jaxspec.testing import TINY
from jaxspec.trees import chain, kary

CFG = dataclasses.replace(TINY, num_layers=3)
PARAMS = init_params(CFG, jax.random.key(0), scale=0.5)
RNG = np.random.default_rng(0)
PROMPTS = [RNG.integers(4, CFG.vocab_size, n).tolist() for n in (5, 9, 3, 12, 7, 6, 10, 4)]
SMALL = dict(num_prompts=8, new_tokens=12, topk=6, gen_batch=4, layers=(0, 2), draft_vocab=40,
             steps=6, batch_size=2, max_len=32, lr=3e-3, warmup=1, checkpoint_every=2)  # fmt: skip


def outputs(state):
    toks, n = np.asarray(state.tokens), np.asarray(state.n_out)
    return [toks[i, : n[i]].tolist() for i in range(toks.shape[0])]


def run_spec(draft_cfg, draft_params, tree, prompts=PROMPTS[:4], max_new=16):
    P = 16
    arr = np.zeros((len(prompts), P), np.int32)
    for i, p in enumerate(prompts):
        arr[i, : len(p)] = p
    spec = SpecConfig(CFG, draft_cfg, tree, "greedy")
    st = spec_generate(PARAMS, draft_params, jnp.asarray(arr),
                       jnp.asarray([len(p) for p in prompts]), jax.random.key(0),
                       SamplingParams.make(len(prompts)), jnp.full((len(prompts),), max_new),
                       spec=spec, max_new_tokens=max_new, chunk=8)  # fmt: skip
    return outputs(st), st


def test_teacher_records_target_logprobs_and_greedy_tokens():
    prompts = PROMPTS[:3]
    arr = np.zeros((3, 16), np.int32)
    for i, p in enumerate(prompts):
        arr[i, : len(p)] = p
    lens = jnp.asarray([len(p) for p in prompts])
    temps = jnp.asarray([0.0, 0.8, 0.0])
    toks, logp, ids = teacher_generate(
        PARAMS, CFG, jnp.asarray(arr), lens, temps, jax.random.key(3), new_tokens=10, topk=5,
        chunk=8,
    )  # fmt: skip
    toks, logp, ids = map(np.asarray, (toks, logp, ids))
    for b, p in enumerate(prompts):
        seq = np.asarray(p + toks[b].tolist(), np.int32)[None]
        T = seq.shape[1]
        full, _ = forward(PARAMS, CFG, jnp.asarray(seq), jnp.arange(T)[None], init_cache(CFG, 1, T))
        ref = np.asarray(jax.nn.log_softmax(full[0, len(p) - 1 : len(p) - 1 + 10], axis=-1))
        np.testing.assert_allclose(np.take_along_axis(ref, ids[b], -1), logp[b], atol=1e-4)
        assert (ids[b, :, 0] == ref.argmax(-1)).all()
        if temps[b] == 0:
            assert (toks[b] == ids[b, :, 0]).all()  # greedy: the teacher's top-1
    ar, _ = run_spec(CFG, PARAMS, chain(0), prompts, max_new=10)
    for b in (0, 2):
        assert toks[b][: len(ar[b])].tolist() == ar[b]


def test_teacher_shards_resume(tmp_path):
    kw = dict(batch=4, new_tokens=8, topk=4, temperatures=(0.0, 0.7), seed=1, progress=False)
    paths = generate_shards(PARAMS, CFG, PROMPTS, tmp_path, **kw)
    assert len(paths) == 2
    before = {p: p.stat().st_mtime_ns for p in paths}
    first = dict(np.load(paths[1]))
    assert generate_shards(PARAMS, CFG, PROMPTS, tmp_path, **kw) == paths
    assert {p: p.stat().st_mtime_ns for p in paths} == before  # nothing regenerated
    paths[1].unlink()
    generate_shards(PARAMS, CFG, PROMPTS, tmp_path, **kw)
    again = dict(np.load(paths[1]))
    assert first.keys() == again.keys()
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    data = load_shards(paths)
    assert len(data.length) == len(PROMPTS)
    lab = data.ids[..., 0] >= 0  # position t is labelled iff token t + 1 is a continuation token
    assert lab.sum() == data.num_target_tokens
    for i in range(len(PROMPTS)):
        assert lab[i].nonzero()[0].tolist() == list(range(data.prompt_len[i] - 1,
                                                          data.length[i] - 1))  # fmt: skip
    with pytest.raises(CheckpointError, match="shard-00000"):
        paths[0].write_bytes(b"not an npz")
        load_shards(paths)


def _data(tmp_path):
    paths = generate_shards(PARAMS, CFG, PROMPTS, tmp_path / "teacher", batch=4, new_tokens=12,
                            topk=6, temperatures=(0.0, 0.7), seed=0, progress=False)  # fmt: skip
    return load_shards(paths)


def test_training_resumes_exactly_and_lowers_kl(tmp_path):
    data = _data(tmp_path)
    cfg = DistillConfig(**SMALL)
    ids = choose_vocab(data, cfg.draft_vocab, CFG)
    assert len(ids) == 40 and set(CFG.eos_token_ids) <= set(ids.tolist())
    full = train(PARAMS, CFG, data, ids, cfg, tmp_path / "a", progress=False, log_every=1)
    cut = train(PARAMS, CFG, data, ids, cfg, tmp_path / "b", progress=False, stop_after=3)
    assert cut.steps == 3  # "interrupted" after step 3; the latest checkpoint is step 2
    rest = train(PARAMS, CFG, data, ids, cfg, tmp_path / "b", progress=False)
    assert rest.steps == cfg.steps
    for x, y in zip(jax.tree.leaves(full.train), jax.tree.leaves(rest.train), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    kls = [h[1] for h in full.history]
    assert kls[-1] < kls[0], kls
    # the recipe of a work directory cannot change under it (but `steps` may grow)
    with pytest.raises(ConfigError, match="train_config.json.*lr"):
        train(PARAMS, CFG, data, ids, dataclasses.replace(cfg, lr=1e-2), tmp_path / "b",
              progress=False)  # fmt: skip
    more = train(PARAMS, CFG, data, ids, dataclasses.replace(cfg, steps=8), tmp_path / "b",
                 progress=False)  # fmt: skip
    assert more.steps == 8


def test_vocab_draft_zero_mass_outside_and_greedy_lossless():
    ids = np.arange(4, CFG.vocab_size, 2)  # half the vocabulary, EOS (3) excluded
    draft = make_vocab_draft(PARAMS, ids)
    T = 5
    toks = jnp.asarray([PROMPTS[0][:T]])
    pos = jnp.arange(T)[None]
    logits, _ = draft_forward(draft, CFG, toks, pos, init_cache(CFG, 1, T))
    full, _ = forward(PARAMS, CFG, toks, pos, init_cache(CFG, 1, T))
    out = np.setdiff1d(np.arange(CFG.vocab_size), ids)
    assert np.isneginf(np.asarray(logits)[..., out]).all()
    np.testing.assert_allclose(logits[..., ids], full[..., ids], atol=1e-5)
    ar, _ = run_spec(CFG, PARAMS, chain(0))
    got, st = run_spec(CFG, draft, chain(3))
    assert got == ar
    assert int(np.asarray(st.accepted).sum()) > 0  # the draft is the target on its subset


@pytest.mark.slow
@pytest.mark.parametrize("verifier,tree", [("swor", "kary2x2"), ("rrs", "chain2")])
def test_vocab_draft_sampling_is_lossless(verifier, tree):
    """Joint of the first three tokens with a draft that scores only 5 of 8 tokens: equal to the
    target's (chi-square), and no zero-probability token is ever emitted. (Slow: the node rules
    with zero-mass drafts are enumerated exactly in test_verify_rules, case `q_zeros`.)"""
    from tests_helpers_joint import chi_square_ok, exact_joint, sample_counts

    cfg8 = dataclasses.replace(TINY, vocab_size=8, eos_token_ids=(), num_layers=2)
    target = init_params(cfg8, jax.random.key(0), scale=0.6)
    draft = make_vocab_draft(init_params(cfg8, jax.random.key(7), scale=0.6), [0, 1, 3, 4, 6])
    t = {"kary2x2": kary(2, 2), "chain2": chain(2)}[tree]
    ok, chi2, dof = chi_square_ok(sample_counts(target, draft, cfg8, verifier, t),
                                  exact_joint(target, cfg8))  # fmt: skip
    assert ok, (chi2, dof)


class _Tok:
    """A stand-in tokenizer: one token per character (mod the tiny vocabulary)."""

    def encode(self, text, chat=True):
        return [4 + ord(c) % (CFG.vocab_size - 4) for c in text[:12]]


def test_build_draft_checkpoint_drives_lossless_speculation(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "prompts.jsonl"
    corpus.write_text("".join(json.dumps({"prompt": f"prompt number {i} " * (1 + i % 3)}) + "\n"
                              for i in range(10)))  # fmt: skip
    model = LoadedModel("tiny", CFG, PARAMS, _Tok(), tmp_path)
    cfg = DistillConfig(**{**SMALL, "prompts": str(corpus)})
    out = build_draft(model, cfg, progress=False)
    assert out == tmp_path / "cache" / "tiny" / "draft"
    meta = json.loads((out / "distill.json").read_text())
    assert meta["teacher_sequences"] == 8 and meta["draft_vocab"] == 40
    loaded = load_model(str(out))
    dcfg, dparams = load_draft(loaded)
    assert isinstance(dparams, VocabDraft) and dcfg.num_layers == 2
    assert dcfg.vocab_size == CFG.vocab_size
    ar, _ = run_spec(CFG, PARAMS, chain(0))
    assert run_spec(dcfg, dparams, kary(2, 2))[0] == ar
    # the full-vocabulary view of the same checkpoint is an ordinary (lossless) draft too
    fcfg, fparams = load_draft(loaded, full_vocab=True)
    assert run_spec(fcfg, fparams, chain(3))[0] == ar
    # a second build is a no-op; a changed teacher setting in the same work dir is an error
    assert build_draft(model, cfg, progress=False) == out
    with pytest.raises(ConfigError, match="teacher/config.json.*new_tokens"):
        build_draft(model, dataclasses.replace(cfg, new_tokens=5), overwrite=True,
                    progress=False)  # fmt: skip


def test_export_keeps_head_columns_and_zero_elsewhere(tmp_path):
    data = _data(tmp_path)
    cfg = DistillConfig(**{**SMALL, "steps": 1})
    ids = choose_vocab(data, 40, CFG)
    res = train(PARAMS, CFG, data, ids, cfg, tmp_path / "w", progress=False)
    params = export_params(res)
    head = np.asarray(params.lm_head)
    np.testing.assert_array_equal(head[:, ids], np.asarray(res.train.head))
    assert not head[:, np.setdiff1d(np.arange(CFG.vocab_size), ids)].any()


def test_named_draft_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="train-draft"):
        load_model("smollm2-135m-draft")
    with pytest.raises(ConfigError, match="layers"):
        DistillConfig(layers=(3, 1))


def test_eval_script_chain_walk():
    """scripts/eval_draft.py's greedy chain walk: token 0 comes from prefill; each step accepts
    the run of correct drafts (at most γ) and adds the bonus token."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "eval_draft.py"
    spec = importlib.util.spec_from_file_location("eval_draft", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    match = np.asarray([0, 1, 1, 0, 1, 1, 1, 1, 0], bool)  # 9 tokens, 8 after prefill
    # γ = 2: [1,2 ok → +bonus 3] [4,5 ok → bonus 6] [7 ok, 8 wrong → bonus 8]: 3 steps
    steps, emitted, hist = mod.chain_walk(match, 2)
    assert (steps, emitted, hist.tolist()) == (3, 8, [0, 1, 2])
    steps, emitted, hist = mod.chain_walk(np.zeros(5, bool), 3)
    assert (steps, emitted, hist.tolist()) == (4, 4, [4, 0, 0, 0])
