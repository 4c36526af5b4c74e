"""Device roofline constants and SSSD's batch-aware speculation length (ALGORITHMS.md §5(b)).

Conventions:
  * `measure_roofline(dtype)` times a square GEMM (n = 1024 on CPU, 4096 on accelerators) for
    FLOP/s and an AXPY `y = a·x + y` over 2^22 elements (3 arrays touched) for bytes/s, on the
    default device, best of a few runs after a warm-up (compile time excluded).
  * `ratio` = FLOP/s ÷ bytes/s (SSSD's "GEMM GFLOP/s ÷ AXPY GB/s"). A decode step reads every
    weight once and does 2 FLOPs per weight per token, so verification stays memory-bound up to
    `knee_tokens = ratio · itemsize / 2` tokens per step across the batch (= ratio for bf16).
  * SSSD's rule, in tokens per row INCLUDING the root: s(b) = the largest value of
    {2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32} that is ≤ min(knee // b, cap(b)), with cap(b) = 32
    (b ≤ 1), 64/b (b = 2–3), 96/b (b = 4–6), 512/b (b ≥ 7). The knee is rounded down to a
    multiple of 16 and capped at 192 as in the reference when it is ≥ 16 (GPUs); below 16 (CPUs)
    it is used as measured. s(b) = 1 means no speculation (autoregressive decoding).
  * Tree depth from s: s ≤ 5 → s − 1; ≤ 8 → 5; ≤ 32 → 6 (no larger s is produced).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

S_VALUES = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)


@dataclasses.dataclass(frozen=True)
class Roofline:
    device: str
    dtype: str
    flops_per_s: float
    bytes_per_s: float

    @property
    def ratio(self) -> float:
        return self.flops_per_s / self.bytes_per_s

    @property
    def knee_tokens(self) -> float:
        return self.ratio * np.dtype(self.dtype).itemsize / 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"ratio": self.ratio, "knee_tokens": self.knee_tokens}


def _best_time(fn, *args, reps: int = 5) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


@functools.cache
def measure_roofline(dtype: str = "float32") -> Roofline:
    """GEMM FLOP/s and AXPY bytes/s of the default device (cached per process)."""
    dev = jax.devices()[0]
    n = 1024 if dev.platform == "cpu" else 4096
    a = jnp.ones((n, n), dtype)
    flops = 2 * n**3 / _best_time(jax.jit(lambda x: x @ x), a)
    m = 1 << 22
    x, y = jnp.ones((m,), dtype), jnp.ones((m,), dtype)
    axpy = jax.jit(lambda x, y: jnp.asarray(2, dtype) * x + y)
    bw = 3 * m * np.dtype(dtype).itemsize / _best_time(axpy, x, y)
    return Roofline(f"{dev.platform}:{dev.device_kind}", str(np.dtype(dtype)), flops, bw)


def round_knee(knee: float) -> int:
    if knee >= 16:
        return min(int(knee) // 16 * 16, 192)
    return int(knee)


def batch_cap(b: int) -> int:
    if b <= 1:
        return 32
    if b <= 3:
        return 64 // b
    if b <= 6:
        return 96 // b
    return 512 // b


def speculation_length(batch: int, knee_tokens: float) -> int:
    """s(b): tokens per row per step, root included (1 = autoregressive)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    limit = min(round_knee(knee_tokens) // batch, batch_cap(batch))
    fits = [s for s in S_VALUES if s <= limit]
    return fits[-1] if fits else 1


def tree_depth(s: int) -> int:
    if s <= 5:
        return max(s - 1, 0)
    if s <= 8:
        return 5
    return 6


def available_memory_bytes() -> int | None:
    """Memory the default device can still give: the accelerator's free bytes (bytes_limit −
    bytes_in_use), or on CPU the host's MemAvailable (/proc/meminfo). None when unknown."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
