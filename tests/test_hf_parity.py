"""Conversion parity: tiny random HF checkpoints (made by transformers from a config) converted by
jaxspec give the same fp32 logits as transformers, for every supported architecture.

Invariant: for any supported config, `forward(load_hf(dir))` == `AutoModelForCausalLM(dir)` logits
(atol 1e-4), also when the tokens arrive in several chunks through the KV cache.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from jaxspec.convert.hf import load_hf  # noqa: E402
from jaxspec.kv_cache import init_cache  # noqa: E402
from jaxspec.model import forward  # noqa: E402

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=False),
    "llama3_scaled_tied": lambda: transformers.LlamaConfig(
        **COMMON,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    ),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "mistral_window": lambda: transformers.MistralConfig(**COMMON, sliding_window=8),
}


def make_hf(name, tmp_path):
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # random biases so the Qwen2 bias path is exercised
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    model = make_hf(name, tmp_path)
    cfg, params = load_hf(tmp_path)
    ids = np.random.default_rng(0).integers(0, 128, size=(2, 20))
    with torch.no_grad():
        want = model(torch.tensor(ids)).logits.numpy()
    B, T = ids.shape
    cache = init_cache(cfg, B, 32)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    got, _ = forward(params, cfg, jnp.asarray(ids), pos, cache)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)

    # the same tokens in chunks of 7, 1 and 12 through the cache give the same logits
    cache = init_cache(cfg, B, 32)
    outs = []
    for a, b in [(0, 7), (7, 8), (8, 20)]:
        logits, cache = forward(params, cfg, jnp.asarray(ids[:, a:b]), pos[:, a:b], cache)
        cache = cache.replace(lengths=cache.lengths + (b - a))
        outs.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(outs, 1), want, atol=1e-4, rtol=0)
