"""Hugging Face checkpoint directory (config.json + *.safetensors) → jaxspec `Params`.

One declarative `WEIGHT_MAP` per architecture maps each HF key (`{}` = layer index) to a jaxspec
leaf and a named part (q/k/v go into the fused `wqkv`, gate/up into `w_gate_up`; see
`jaxspec/model/params.py`); `None` drops a key. Loading is strict: every key in the files
must be consumed, every expected key must be present, and every shape must match, or a
`CheckpointError` names the key, the file and both shapes. Per-layer tensors are stacked on `L`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxspec.config import ModelConfig
from jaxspec.errors import CheckpointError, ConfigError
from jaxspec.model.params import LayerParams, Params

# HF key → (jaxspec leaf, part). A leaf with parts is assembled from several HF tensors
# (`_ASSEMBLY`); `None` drops a key. `_PARTS` gives each part's HF shape and its layout transform.
_LLAMA = {
    "model.embed_tokens.weight": ("embed", "embed"),
    "model.norm.weight": ("final_norm", "norm"),
    "lm_head.weight": ("lm_head", "head"),
    "model.layers.{}.input_layernorm.weight": ("layers.attn_norm", "norm"),
    "model.layers.{}.self_attn.q_proj.weight": ("layers.wqkv", "q"),
    "model.layers.{}.self_attn.k_proj.weight": ("layers.wqkv", "k"),
    "model.layers.{}.self_attn.v_proj.weight": ("layers.wqkv", "v"),
    "model.layers.{}.self_attn.o_proj.weight": ("layers.wo", "o"),
    "model.layers.{}.post_attention_layernorm.weight": ("layers.mlp_norm", "norm"),
    "model.layers.{}.mlp.gate_proj.weight": ("layers.w_gate_up", "gate"),
    "model.layers.{}.mlp.up_proj.weight": ("layers.w_gate_up", "up"),
    "model.layers.{}.mlp.down_proj.weight": ("layers.w_down", "down"),
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,  # recomputed from the config
}
_QWEN2 = {
    **_LLAMA,
    "model.layers.{}.self_attn.q_proj.bias": ("layers.bqkv", "q_bias"),
    "model.layers.{}.self_attn.k_proj.bias": ("layers.bqkv", "k_bias"),
    "model.layers.{}.self_attn.v_proj.bias": ("layers.bqkv", "v_bias"),
}
WEIGHT_MAP = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _QWEN2}

# fused leaf → (its parts in order, the per-layer axis they are concatenated on)
_ASSEMBLY = {
    "layers.wqkv": (("q", "k", "v"), 2),  # [M, K, G | 1 | 1, E]
    "layers.bqkv": (("q_bias", "k_bias", "v_bias"), 1),  # [K, G | 1 | 1, E]
    "layers.w_gate_up": (("gate", "up"), 1),  # [M, 1 | 1, F]
}


def _parts(cfg: ModelConfig) -> dict:
    """part → (HF shape, transform from HF's [out, in] layout to ours)."""
    H, K, E, M = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    G, F, V = cfg.group_size, cfg.intermediate_size, cfg.vocab_size
    # HF orders query heads h = k * G + g (GQA), so [H*E, M] → [K, G, E, M] groups them per KV head
    return {
        "embed": ((V, M), lambda x: x),
        "norm": ((M,), lambda x: x),
        "head": ((V, M), lambda x: x.T),
        "q": ((H * E, M), lambda x: x.reshape(K, G, E, M).transpose(3, 0, 1, 2)),
        "k": ((K * E, M), lambda x: x.reshape(K, 1, E, M).transpose(3, 0, 1, 2)),
        "v": ((K * E, M), lambda x: x.reshape(K, 1, E, M).transpose(3, 0, 1, 2)),
        "q_bias": ((H * E,), lambda x: x.reshape(K, G, E)),
        "k_bias": ((K * E,), lambda x: x.reshape(K, 1, E)),
        "v_bias": ((K * E,), lambda x: x.reshape(K, 1, E)),
        "o": ((M, H * E), lambda x: x.reshape(M, H, E).transpose(1, 2, 0)),
        "gate": ((F, M), lambda x: x.T[:, None, :]),
        "up": ((F, M), lambda x: x.T[:, None, :]),
        "down": ((M, F), lambda x: x.T),
    }


def read_config(path: Path) -> ModelConfig:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    try:
        return ModelConfig.from_hf(raw, str(cfg_file))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _tensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({e!r})") from None
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the shard index but missing")
    return files


def _match(key: str, table: dict) -> tuple[str | None, int | None]:
    """(map entry, layer index) for an HF key, or (None, None) when the key is unknown."""
    if key in table:
        return key, None
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
    if m:
        pattern = "model.layers.{}." + m.group(2)
        if pattern in table:
            return pattern, int(m.group(1))
    return None, None


def load_hf(path: str | Path, dtype=jnp.float32) -> tuple[ModelConfig, Params]:
    """Read an HF checkpoint directory into (config, params) with strict key/shape checks."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    cfg = read_config(path)
    table, parts = WEIGHT_MAP[cfg.arch], _parts(cfg)
    L = cfg.num_layers
    # every (leaf, part, layer) the config needs → its array once read
    wanted = {
        (leaf, part, layer): None
        for leaf, part in {e for e in table.values() if e is not None}
        if _needed(leaf, cfg)
        for layer in (range(L) if leaf.startswith("layers.") else [None])
    }
    np_dtype = jnp.dtype(dtype)
    for file in _tensor_files(path):
        try:
            handle = safe_open(str(file), framework="np")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None
        with handle as f:
            for key in f.keys():
                pattern, layer = _match(key, table)
                if pattern is None:
                    raise CheckpointError(f"{file}: unexpected tensor {key!r} for {cfg.arch}")
                if table[pattern] is None:
                    continue
                leaf, part = table[pattern]
                if leaf == "lm_head" and cfg.tie_word_embeddings:
                    continue  # tied: the head is the embedding
                if (leaf, part, layer) not in wanted:
                    raise CheckpointError(f"{file}: tensor {key!r} does not fit the config")
                x = f.get_tensor(key)
                hf_shape, transform = parts[part]
                if tuple(x.shape) != hf_shape:
                    raise CheckpointError(
                        f"{file}: tensor {key!r} has shape {tuple(x.shape)}, expected {hf_shape}"
                    )
                wanted[(leaf, part, layer)] = transform(x).astype(np_dtype)
    for (leaf, part, layer), x in wanted.items():
        if x is None:
            raise CheckpointError(f"{path}: missing tensor {_hf_key(table, leaf, part, layer)!r}")
    return cfg, _unflat(_assemble(wanted, L))


def _needed(leaf: str, cfg: ModelConfig) -> bool:
    if leaf == "lm_head":
        return not cfg.tie_word_embeddings
    return leaf != "layers.bqkv" or cfg.attention_bias


def _assemble(found: dict, L: int) -> dict[str, np.ndarray]:
    """Concatenate fused leaves' parts, then stack layers on the leading axis."""
    leaves = {leaf for leaf, _, _ in found}
    out = {}
    for leaf in leaves:
        order, axis = _ASSEMBLY.get(leaf, ((None,), 0))
        layers = range(L) if leaf.startswith("layers.") else [None]
        per_layer = []
        for layer in layers:
            pieces = [found[(leaf, part or _only_part(found, leaf), layer)] for part in order]
            per_layer.append(pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis))
        out[leaf] = np.stack(per_layer) if leaf.startswith("layers.") else per_layer[0]
    return out


def _only_part(found: dict, leaf: str) -> str:
    return next(part for lf, part, _ in found if lf == leaf)


def _hf_key(table: dict, leaf: str, part: str, layer: int | None) -> str:
    for pattern, entry in table.items():
        if entry == (leaf, part):
            return pattern.format(layer)
    return leaf


def _unflat(arrays: dict[str, np.ndarray]) -> Params:
    layer_kw = {k.split(".", 1)[1]: jnp.asarray(v) for k, v in arrays.items() if "." in k}
    return Params(
        embed=jnp.asarray(arrays["embed"]),
        layers=LayerParams(**layer_kw),
        final_norm=jnp.asarray(arrays["final_norm"]),
        lm_head=jnp.asarray(arrays["lm_head"]) if "lm_head" in arrays else None,
    )
