"""Pure jnp building blocks: RMSNorm, rotary embeddings (incl. Llama-3 scaling), SwiGLU MLP.

Conventions match Hugging Face Llama exactly (the parity tests depend on it): RMSNorm computes in
float32 and casts back before the weight multiply; RoPE uses the "rotate half" layout (the first and
second halves of the head dim form the pairs), with inverse frequencies computed in numpy once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.config import ModelConfig
from jaxspec.types import Array, Float, Int


def rms_norm(
    x: Float[Array, "*B M"], weight: Float[Array, " M"], eps: float
) -> Float[Array, "*B M"]:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [E/2] (float32), with the configured scaling applied."""
    E = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, E, 2, dtype=np.float64) / E))
    rs = cfg.rope_scaling
    if rs is None:
        pass
    elif rs.kind == "linear":
        inv = inv / rs.factor
    elif rs.kind == "llama3":
        old = rs.original_max_position_embeddings
        low_wavelen, high_wavelen = old / rs.low_freq_factor, old / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(
    x: Float[Array, "B T N E"], positions: Int[Array, "B T"], inv_freq: np.ndarray
) -> Float[Array, "B T N E"]:
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, E/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, E]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def swiglu(
    x: Float[Array, "B T M"], w_gate_up: Float[Array, "M 2 F"], w_down: Float[Array, "F M"]
) -> Float[Array, "B T M"]:
    gate_up = jnp.einsum("btm,mcf->btcf", x, w_gate_up)
    return jnp.einsum("btf,fm->btm", jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1], w_down)


def swiglu_output_major(
    x: Float[Array, "B T M"], w_gate_up: Float[Array, "2 F M"], w_down: Float[Array, "M F"]
) -> Float[Array, "B T M"]:
    """`swiglu` with output-major weights (`jaxspec.model.output_major`): each weight is its
    dot's left operand, the faster form on XLA:CPU."""
    gate_up = jnp.einsum("cfm,btm->cfbt", w_gate_up, x)
    a = jax.nn.silu(gate_up[0]) * gate_up[1]
    return jnp.einsum("mf,fbt->mbt", w_down, a).transpose(1, 2, 0)
