"""The real default model (SmolLM2-135M-Instruct from its GGUF) against transformers.

Invariants: the converted model's fp32 logits equal transformers' on the same HF directory, and
greedy generation emits exactly transformers' greedy tokens (32 new tokens, 3 chat prompts).
The orbax checkpoint written on first use restores to identical params.
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxspec.kv_cache import init_cache  # noqa: E402
from jaxspec.model import forward, output_major, unrolled  # noqa: E402
from jaxspec.runner import GenerateOptions, Runner  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for staying healthy.",
]


@pytest.fixture(scope="module")
def hf_model(smollm2):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2.path, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def test_logits_match_transformers(smollm2, hf_model):
    ids = smollm2.tokenizer.encode(PROMPTS[1])
    with torch.no_grad():
        want = hf_model(torch.tensor([ids])).logits[0].numpy()
        exact = copy.deepcopy(hf_model).double()(torch.tensor([ids])).logits[0].numpy()
    T = len(ids)
    layouts = (smollm2.params, output_major(smollm2.params), unrolled(smollm2.params))
    for params in layouts:  # every weight layout
        got, _ = forward(
            params, smollm2.cfg, jnp.asarray([ids]), jnp.arange(T)[None],
            init_cache(smollm2.cfg, 1, T),
        )  # fmt: skip
        check_logits(np.asarray(got[0]), want, exact)


def check_logits(got, want, exact):
    # Tolerance: the issue asks for atol 1e-4, but over 30 fp32 layers with logits up to ~38,
    # transformers' OWN fp32 logits differ from its float64 logits by ~1e-4 (measured 9.8e-5 on
    # this prompt; jaxspec's by 1.1e-4; jaxspec vs transformers fp32 1.1e-4). So: jaxspec must be
    # within 2.5e-4 of transformers fp32, and no further from the float64 truth than 1.5x
    # transformers' own fp32 error (+1e-5).
    hf_err = np.abs(want - exact).max()
    assert np.abs(got - want).max() < 2.5e-4
    assert np.abs(got - exact).max() < 1.5 * hf_err + 1e-5, (np.abs(got - exact).max(), hf_err)
    assert (got.argmax(-1) == exact.argmax(-1)).all()


def test_greedy_tokens_match_transformers(smollm2, hf_model):
    tok = smollm2.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    outs, metrics = Runner(smollm2.params, smollm2.cfg, layout="unrolled").run(
        ids, GenerateOptions(max_new_tokens=32, batch_size=4)
    )
    for prompt_ids, got in zip(ids, outs, strict=True):
        with torch.no_grad():
            want = hf_model.generate(
                torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False,
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            )[0, len(prompt_ids) :].tolist()  # fmt: skip
        assert got == want, (tok.decode(got), tok.decode(want))
    assert metrics.tau == 1.0 and metrics.new_tokens == sum(map(len, outs))


def test_tokenizer_matches_transformers(smollm2):
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2.path)
    for p in PROMPTS:
        want = hf_tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(want, dict) or hasattr(want, "keys"):
            want = want["input_ids"]
        assert smollm2.tokenizer.encode(p) == list(want)
        assert smollm2.tokenizer.encode(p, chat=False) == hf_tok(p)["input_ids"]


def test_orbax_cache_restores_identical_params(smollm2):
    from jaxspec.models import load_model

    again = load_model("smollm2-135m", progress=False)  # second start: restored from orbax
    same = jax.tree_util.tree_map(
        lambda a, b: bool(jnp.array_equal(a, b)), smollm2.params, again.params
    )
    assert all(jax.tree_util.tree_leaves(same)) and again.cfg == smollm2.cfg
