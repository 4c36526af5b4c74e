"""Frozen, hashable configuration dataclasses.

Everything that changes the compiled program (model dims, architecture details) lives in a frozen
dataclass built from tuples and scalars so it can be a static `jax.jit` argument: changing it
recompiles, two equal configs share one compilation.

`ModelConfig.from_hf(config_dict, source)` reads a Hugging Face `config.json` dict and rejects
architectures and RoPE scalings jaxspec does not implement, naming the file and the key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxspec.errors import ConfigError

# HF `architectures[0]` → jaxspec architecture family. Qwen2 adds q/k/v biases; Mistral may use a
# sliding window. Llama covers Llama 2/3 and SmolLM2.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. kind: "llama3" (Llama 3.1 style) or "linear"."""

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


ATTENTION_IMPLS = ("auto", "pallas", "reference")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a Llama-family decoder."""

    arch: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projection biases (Qwen2)
    sliding_window: int | None = None  # keys older than this many positions are masked
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Run-time choice, not part of the checkpoint: the attention op's implementation.
    attention: str = "auto"  # "auto" | "pallas" | "reference" (see jaxspec/model/attention.py)
    prefill: Any = None  # a jaxspec.critiprefill.CritiPrefill for sparse prefill; None = dense

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(
                f"attention must be one of {', '.join(ATTENTION_IMPLS)}, got {self.attention!r}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = hf.get("architectures") or []
        arch_name = archs[0] if archs else None
        if arch_name not in ARCHITECTURES:
            raise ConfigError(
                f"{source}: unsupported architecture {arch_name!r}; "
                f"supported: {', '.join(sorted(ARCHITECTURES))}"
            )
        arch = ARCHITECTURES[arch_name]

        def need(key: str):
            if key not in hf:
                raise ConfigError(f"{source}: missing required key {key!r}")
            return hf[key]

        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        head_dim = hf.get("head_dim") or hidden // num_heads
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        window = hf.get("sliding_window")
        if arch == "qwen2" and not hf.get("use_sliding_window", False):
            window = None
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:  # transformers >= 5 may nest it in rope_parameters
            rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            arch=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=_rope_scaling(hf, source),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
            sliding_window=int(window) if window else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _rope_scaling(hf: dict[str, Any], source: str) -> RopeScaling | None:
    rs = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type")
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return RopeScaling("linear", factor=float(rs["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            factor=float(rs["factor"]),
            low_freq_factor=float(rs["low_freq_factor"]),
            high_freq_factor=float(rs["high_freq_factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
        )
    raise ConfigError(
        f"{source}: unsupported rope_scaling type {kind!r} (supported: llama3, linear)"
    )
