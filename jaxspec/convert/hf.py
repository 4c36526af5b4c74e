"""Hugging Face checkpoint directory (config.json + *.safetensors) → jaxspec `Params`.

One declarative `WEIGHT_MAP` per architecture maps each HF key (`{}` = layer index) to a jaxspec
leaf and a named layout transform; `None` drops a key. Loading is strict: every key in the files
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

# HF key → (jaxspec leaf, transform). Transforms turn HF's [out, in] nn.Linear layout into ours.
_LLAMA = {
    "model.embed_tokens.weight": ("embed", "none"),
    "model.norm.weight": ("final_norm", "none"),
    "lm_head.weight": ("lm_head", "transpose"),
    "model.layers.{}.input_layernorm.weight": ("layers.attn_norm", "none"),
    "model.layers.{}.self_attn.q_proj.weight": ("layers.wq", "in_heads"),
    "model.layers.{}.self_attn.k_proj.weight": ("layers.wk", "in_kv_heads"),
    "model.layers.{}.self_attn.v_proj.weight": ("layers.wv", "in_kv_heads"),
    "model.layers.{}.self_attn.o_proj.weight": ("layers.wo", "heads_out"),
    "model.layers.{}.post_attention_layernorm.weight": ("layers.mlp_norm", "none"),
    "model.layers.{}.mlp.gate_proj.weight": ("layers.w_gate", "transpose"),
    "model.layers.{}.mlp.up_proj.weight": ("layers.w_up", "transpose"),
    "model.layers.{}.mlp.down_proj.weight": ("layers.w_down", "transpose"),
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,  # recomputed from the config
}
_QWEN2 = {
    **_LLAMA,
    "model.layers.{}.self_attn.q_proj.bias": ("layers.bq", "bias_heads"),
    "model.layers.{}.self_attn.k_proj.bias": ("layers.bk", "bias_kv_heads"),
    "model.layers.{}.self_attn.v_proj.bias": ("layers.bv", "bias_kv_heads"),
}
WEIGHT_MAP = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _QWEN2}


def _hf_shape(transform: str, shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...]:
    """The HF tensor shape (one layer) whose transform yields our per-layer `shape`."""
    H, K, E, M = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    return {
        "none": shape,
        "transpose": shape[::-1],
        "in_heads": (H * E, M),
        "in_kv_heads": (K * E, M),
        "heads_out": (M, H * E),
        "bias_heads": (H * E,),
        "bias_kv_heads": (K * E,),
    }[transform]


def _apply(transform: str, x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    H, K, E, M = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    if transform == "none":
        return x
    if transform == "transpose":
        return x.T
    if transform == "in_heads":  # [H*E, M] → [M, H, E]
        return x.reshape(H, E, M).transpose(2, 0, 1)
    if transform == "in_kv_heads":
        return x.reshape(K, E, M).transpose(2, 0, 1)
    if transform == "heads_out":  # [M, H*E] → [H, E, M]
        return x.reshape(M, H, E).transpose(1, 2, 0)
    if transform == "bias_heads":
        return x.reshape(H, E)
    if transform == "bias_kv_heads":
        return x.reshape(K, E)
    raise AssertionError(transform)


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
    table = WEIGHT_MAP[cfg.arch]
    from jaxspec.model.params import param_shapes

    shapes = _flat(param_shapes(cfg))
    L = cfg.num_layers
    found: dict[str, list] = {
        leaf: [None] * L if leaf.startswith("layers.") else [None]
        for leaf, s in shapes.items()
        if s is not None
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
                leaf, transform = table[pattern]
                if leaf == "lm_head" and cfg.tie_word_embeddings:
                    continue  # tied: the head is the embedding
                if leaf not in found or (layer is not None and layer >= L):
                    raise CheckpointError(f"{file}: tensor {key!r} does not fit the config")
                want = shapes[leaf][1:] if layer is not None else shapes[leaf]
                x = f.get_tensor(key)
                hf_want = _hf_shape(transform, want, cfg)
                if tuple(x.shape) != hf_want:
                    raise CheckpointError(
                        f"{file}: tensor {key!r} has shape {tuple(x.shape)}, expected {hf_want}"
                    )
                found[leaf][layer or 0] = _apply(transform, x, cfg).astype(np_dtype)
    for leaf, parts in found.items():
        for i, part in enumerate(parts):
            if part is None:
                hf_key = _hf_key(table, leaf, i)
                raise CheckpointError(f"{path}: missing tensor {hf_key!r}")
    arrays = {
        leaf: np.stack(p) if leaf.startswith("layers.") else p[0] for leaf, p in found.items()
    }
    return cfg, _unflat(arrays)


def _hf_key(table: dict, leaf: str, layer: int) -> str:
    for pattern, entry in table.items():
        if entry is not None and entry[0] == leaf:
            return pattern.format(layer)
    return leaf


def _flat(p: Params) -> dict[str, tuple | None]:
    out = {"embed": p.embed, "final_norm": p.final_norm, "lm_head": p.lm_head}
    for name in LayerParams.__dataclass_fields__:
        out[f"layers.{name}"] = getattr(p.layers, name)
    return out


def _unflat(arrays: dict[str, np.ndarray]) -> Params:
    layer_kw = {k.split(".", 1)[1]: jnp.asarray(v) for k, v in arrays.items() if "." in k}
    return Params(
        embed=jnp.asarray(arrays["embed"]),
        layers=LayerParams(**layer_kw),
        final_norm=jnp.asarray(arrays["final_norm"]),
        lm_head=jnp.asarray(arrays["lm_head"]) if "lm_head" in arrays else None,
    )
