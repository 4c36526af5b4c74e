"""The model's attention: the in-flight tokens attend to the committed prefix plus each other.

One call per layer into `pallas_kernels.tree_attention` (queries = the T in-flight tokens, keys =
the row's committed prefix, `lengths[b]` cache slots, plus the in-flight tokens under `inflight`:
causal for plain decoding and prefill chunks, the ancestor mask for a token tree). The cache is
only read here; the new K/V are written once after the layer loop. `cfg.attention` picks the
implementation: "reference" (pure jnp, the CPU path), "pallas" (the Pallas kernel; interpret mode
off the GPU) or "auto" (on a GPU the kernel for bf16/fp16 models; the reference on CPU, for
float32 models and where the kernel does not cover the configuration, e.g. a sliding window).
"""

from __future__ import annotations

from jaxspec.config import ModelConfig
from jaxspec.types import Array, Bool, Float, Int
from pallas_kernels.tree_attention import tree_attention


def attend(
    cfg: ModelConfig,
    q: Float[Array, "B T H E"],
    k_cache: Float[Array, "B K S E"],
    v_cache: Float[Array, "B K S E"],
    lengths: Int[Array, " B"],
    k_new: Float[Array, "B T K E"],
    v_new: Float[Array, "B T K E"],
    inflight: Bool[Array, "#B T T"],
    positions: Int[Array, "B T"],
    k_slot_last: bool = False,
    finite_values: bool = False,
) -> Float[Array, "B T H E"]:
    """`k_slot_last`: `k_cache` is [B, K, E, S] (`KVCache.k_slot_last`). `finite_values`: the
    cache holds finite values only (a per-layer `KVCache`)."""
    return tree_attention(
        q, k_cache, v_cache, lengths, k_new, v_new, inflight, positions,
        sliding_window=cfg.sliding_window, impl=cfg.attention, k_slot_last=k_slot_last,
        finite_values=finite_values,
    )  # fmt: skip
