"""Strict conversion: every HF key consumed, every shape checked, sharded checkpoints read, and
every broken checkpoint gives a CheckpointError naming the file/key/shapes. orbax save/restore
round-trips and never leaves a half-written directory."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxspec.convert.checkpoint import load_params, save_params
from jaxspec.convert.hf import load_hf
from jaxspec.errors import CheckpointError
from jaxspec.testing import tiny_model

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}


def hf_tensors(seed=0):
    rng = np.random.default_rng(seed)
    t = {
        "model.embed_tokens.weight": (64, 32),
        "model.norm.weight": (32,),
        "lm_head.weight": (64, 32),
    }
    for i in range(2):
        p = f"model.layers.{i}."
        t |= {
            p + "input_layernorm.weight": (32,),
            p + "post_attention_layernorm.weight": (32,),
            p + "self_attn.q_proj.weight": (32, 32),
            p + "self_attn.k_proj.weight": (16, 32),
            p + "self_attn.v_proj.weight": (16, 32),
            p + "self_attn.o_proj.weight": (32, 32),
            p + "mlp.gate_proj.weight": (48, 32),
            p + "mlp.up_proj.weight": (48, 32),
            p + "mlp.down_proj.weight": (32, 48),
        }
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in t.items()}


def write(path, tensors, config=CONFIG):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_valid_checkpoint_loads(tmp_path):
    cfg, params = load_hf(write(tmp_path / "ok", hf_tensors()))
    # K=2 KV heads, G=2 query heads each (+ key + value), head dim 8
    assert params.layers.wqkv.shape == (2, 32, 2, 4, 8) and params.lm_head.shape == (32, 64)


def test_sharded_checkpoint_equals_single_file(tmp_path):
    t = hf_tensors()
    keys = sorted(t)
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    half = len(keys) // 2
    save_file({k: t[k] for k in keys[:half]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: t[k] for k in keys[half:]}, str(d / "model-00002-of-00002.safetensors"))
    wmap = {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(keys)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    _, a = load_hf(d)
    _, b = load_hf(write(tmp_path / "single", t))
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(jnp.array_equal, a, b)))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor 'model.layers.1"),
        (lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}), "model.extra.weight"),
        (
            lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32))}),
            "has shape (32, 32), expected (16, 32)",
        ),
        (lambda t: t.update({"model.layers.5.input_layernorm.weight": np.zeros(32)}), "layers.5"),
    ],
)
def test_key_and_shape_mismatches_are_loud(tmp_path, mutate, message):
    t = hf_tensors()
    mutate(t)
    d = write(tmp_path / "bad", {k: np.asarray(v, np.float32) for k, v in t.items()})
    with pytest.raises(CheckpointError) as e:
        load_hf(d)
    assert message in str(e.value)


def test_broken_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf(tmp_path / "nope")
    d = write(tmp_path / "arch", hf_tensors(), {**CONFIG, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(CheckpointError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_hf(d)
    d = write(tmp_path / "corrupt", hf_tensors())
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read"):
        load_hf(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_hf(d)
    d = write(
        tmp_path / "nokey", hf_tensors(), {k: v for k, v in CONFIG.items() if k != "vocab_size"}
    )
    with pytest.raises(CheckpointError, match="missing required key 'vocab_size'"):
        load_hf(d)
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_hf(d)


def test_bf16_checkpoint_loads_as_requested_dtype(tmp_path):
    import ml_dtypes

    t = {k: v.astype(ml_dtypes.bfloat16) for k, v in hf_tensors().items()}
    _, p = load_hf(write(tmp_path / "bf16", t), dtype=jnp.bfloat16)
    assert p.embed.dtype == jnp.bfloat16
    ref = load_file(str(tmp_path / "bf16" / "model.safetensors"))["model.embed_tokens.weight"]
    np.testing.assert_array_equal(np.asarray(p.embed), ref)


def test_orbax_round_trip_and_atomic_failure(tmp_path, monkeypatch):
    cfg, params = tiny_model()
    save_params(tmp_path / "ck", cfg, params)
    cfg2, params2 = load_params(tmp_path / "ck")
    assert cfg2 == cfg
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(jnp.array_equal, params, params2)))

    import orbax.checkpoint as ocp

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", boom)
    with pytest.raises(OSError):
        save_params(tmp_path / "ck2", cfg, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    (tmp_path / "ck" / "jaxspec.json").write_text("{}")
    with pytest.raises(CheckpointError, match="jaxspec.json"):
        load_params(tmp_path / "ck")
