"""MagicDec's decode cost model and speedup model, and the (γ, draft KV budget) chooser
(ALGORITHMS.md §1(b)).

Conventions and units:
  * Seconds, bytes, FLOPs. F = `Roofline.flops_per_s`, BW = `Roofline.bytes_per_s`, and the ridge
    R = F / BW is in FLOPs per byte. An op takes max(FLOPs / F, bytes / BW). A layer's parameter
    op and its KV op do not overlap: their times add.
  * b = batch (rows). n = context: the cached tokens each query attends to. The s in-flight
    tokens' own keys are not added; that is negligible for n ≫ s. s = query tokens per row in
    one forward: 1 for an autoregressive step, γ + 1 to verify γ drafted tokens.
  * Model dims come from `ModelConfig`: d = hidden_size, H = num_heads, Hkv = num_kv_heads,
    e = head_dim, I = intermediate_size, V = vocab_size, g = H / Hkv.
  * Parameter counts are exact for a Llama-family layer's matmul weights:
      - wq d×H·e, wk and wv d×Hkv·e each, wo H·e×d;
      - the SwiGLU MLP, 3 matrices d×I;
      - the LM head V×d, once per step rather than per layer (also when it is tied to the
        embedding).
    Norm weights, biases, RoPE, softmax and the embedding lookup are O(d) per token; they are
    ignored. A weight is read once per step (`itemsize` bytes) and costs 2 FLOPs per query
    token, so the step's b·s query tokens share one weight read.
  * A cached token costs, per layer:
      - 2·Hkv·e·itemsize bytes of K and V, read once per row per step and shared by the row's
        s queries;
      - 4·H·e FLOPs per query (QKᵀ and PV).
  * The parameter op is compute-bound iff b·s ≥ R·itemsize/2 (`Roofline.knee_tokens`). The KV
    op is compute-bound iff s·g ≥ R·itemsize/2, which is rare.
  * Speedups compare the predicted time per generated token with autoregressive decoding,
    t_target(b, n, 1) per token. They assume i.i.d. per-token acceptance α (chain) or a given
    expected tokens per step G (tree).

Choosing γ and the draft KV budget (MagicDec, self-speculation with a K-slot sparse draft cache):
  * `choose_speculation(alphas, timing, batch, context)` maximises `speedup_chain` over γ ∈ 1..8
    and the measured budgets K. The timing source gives
      - t_target(b, n, s);
      - t_draft(b, K), one draft step over a K-slot cache.
    For self-speculation t_draft(b, K) = t_target(b, K, 1). At context n < K the draft cache
    holds only n tokens, so the chooser asks for t_draft(b, min(K, n)).
  * It returns None (decode autoregressively) unless the best predicted speedup exceeds 1.
  * Ties go to the smaller γ, then the smaller budget.
  * `AnalyticTiming` takes its times from `step_time` and a Roofline.
  * `MeasuredTiming` takes them from a `jaxspec profile device` table. It interpolates linearly in
    context and tokens between measured points, at a profiled batch only, and raises ConfigError
    outside the grid; it never extrapolates.
  * With a `StepTiming` (whole `spec_step`s timed on the real decode state, per batch, context
    and γ at one reference budget) the chooser predicts E(γ)·T_AR_step / T_step(γ, K) instead:
    the step's overheads outside the forwards (accept walk, commits, sink rotation) are then
    measured, not ignored, and E(γ) comes from the measured accepted-length histogram. The
    steps are read through a least-squares line over γ ≥ 1 (`StepTiming.t_step_fit`: a step
    is affine in γ), which averages the timing noise of the individual γ.
  * A static batch (the runner's, the bench's) steps until its slowest row is done. Given the
    tokens each row decodes (`tokens_per_row`), E is the batch's tokens per step,
    `batch_tokens_per_step`: tokens / E[max over rows of the steps a row needs], exact for
    i.i.d. steps. It falls with batch size; AR needs the same steps for every row.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from jaxspec.config import ModelConfig
from jaxspec.errors import ConfigError

if TYPE_CHECKING:
    from jaxspec.hardware import Roofline

GAMMAS = tuple(range(1, 9))  # MagicDec's γ search range
BUDGETS = (256, 512, 1024, 2048, 4096)  # MagicDec's draft KV budgets (α must be measured per K)


# ---- argument checks ---------------------------------------------------------------------------


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)


def _nonneg(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | np.number) or not v >= 0:
        raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
    return float(v)


def _time(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | np.number):
        raise ConfigError(f"{name} must be a time in seconds > 0, got {v!r}")
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{name} must be a time in seconds > 0, got {v!r}")
    return float(v)


def _alpha(v, what: str = "alpha") -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | np.number) or not 0 <= v <= 1:
        raise ConfigError(f"{what} must be an acceptance rate in [0, 1], got {v!r}")
    return float(v)


# ---- the analytic cost model -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeCost:
    """Byte and FLOP counts of a decoder for one forward (conventions in the module docstring)."""

    num_layers: int
    param_bytes: float  # one layer's weights, read once per step
    param_flops: float  # one layer's weight FLOPs per query token (2 per weight)
    kv_bytes: float  # K and V of one cached token in one layer (2·Hkv·e·itemsize)
    kv_flops: float  # one layer's attention FLOPs per (query token, cached token) (4·H·e)
    head_bytes: float = 0.0  # LM head weights, read once per step
    head_flops: float = 0.0  # LM head FLOPs per query token

    def layer_times(self, roofline: Roofline, batch: int, context: float, tokens: int
                    ) -> tuple[float, float]:  # fmt: skip
        """(parameter-op seconds, KV-op seconds) of one layer:
        max(s·b·FLOP_param/F, bytes_param/BW) and max(s·b·n·FLOP_kv/F, b·n·bytes_kv/BW)."""
        b, s = _positive_int("batch", batch), _positive_int("tokens", tokens)
        n = _nonneg("context", context)
        F, BW = roofline.flops_per_s, roofline.bytes_per_s
        t_param = max(s * b * self.param_flops / F, self.param_bytes / BW)
        t_kv = max(s * b * n * self.kv_flops / F, b * n * self.kv_bytes / BW)
        return t_param, t_kv

    def step_time(self, roofline: Roofline, batch: int, context: float, tokens: int) -> float:
        """Seconds of one forward: num_layers · (parameter op + KV op) + the LM head,
        max(s·b·FLOP_head/F, bytes_head/BW)."""
        t_param, t_kv = self.layer_times(roofline, batch, context, tokens)
        F, BW = roofline.flops_per_s, roofline.bytes_per_s
        head = max(tokens * batch * self.head_flops / F, self.head_bytes / BW)
        return self.num_layers * (t_param + t_kv) + head

    def critical_length(self, roofline: Roofline, batch: int, tokens: int) -> float:
        """The context n* at which a layer's KV-op time equals its parameter-op time. The KV op
        takes b·n·max(s·FLOP_kv/F, bytes_kv/BW), which is linear in n, so

            n* = max(s·b·FLOP_param/F, bytes_param/BW) / (b · max(s·FLOP_kv/F, bytes_kv/BW)).

        Each max picks its regime (compute- or memory-bound, see the module docstring), so this
        is exact in all four cases. Above n*, KV loading dominates the layer."""
        b, s = _positive_int("batch", batch), _positive_int("tokens", tokens)
        F, BW = roofline.flops_per_s, roofline.bytes_per_s
        t_param = max(s * b * self.param_flops / F, self.param_bytes / BW)
        return t_param / (b * max(s * self.kv_flops / F, self.kv_bytes / BW))


def decode_cost(cfg: ModelConfig, itemsize: int) -> DecodeCost:
    """Exact matmul-weight counts of `cfg` (see the module docstring) at `itemsize` bytes per
    weight and per cached K/V element."""
    if not isinstance(cfg, ModelConfig):
        raise ConfigError(f"decode_cost needs a ModelConfig, got {type(cfg).__name__}")
    item = _positive_int("itemsize", itemsize)
    d, e, H, Hkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    weights = d * H * e + 2 * d * Hkv * e + H * e * d + 3 * d * cfg.intermediate_size
    head = cfg.vocab_size * d
    return DecodeCost(
        num_layers=cfg.num_layers,
        param_bytes=float(weights * item),
        param_flops=float(2 * weights),
        kv_bytes=float(2 * Hkv * e * item),
        kv_flops=float(4 * H * e),
        head_bytes=float(head * item),
        head_flops=float(2 * head),
    )


def paper_decode_cost(hidden_size: int, group_size: int, itemsize: int = 2) -> DecodeCost:
    """MagicDec's Table 1 layer, with no LM head and num_layers = 1. It has (10d² + 2d²/g)
    weights: QKVO is 2d² + 2d²/g, and the MLP is 4d wide with two matrices (8d²). A cached
    token is 2·(d/g) K/V elements and 4d FLOPs per query. At itemsize 2 this is the table's
    2·(10d² + 2d²/g) bytes, 4·b·n·d/g KV bytes and 4·b·n·d KV FLOPs."""
    d, g = _positive_int("hidden_size", hidden_size), _positive_int("group_size", group_size)
    item = _positive_int("itemsize", itemsize)
    weights = 10 * d * d + 2 * d * d / g
    return DecodeCost(1, weights * item, 2 * weights, 2 * d / g * item, 4.0 * d)


def step_time(cfg: ModelConfig, roofline: Roofline, batch: int, context: float, tokens: int,
              itemsize: int) -> float:  # fmt: skip
    """Seconds of one forward of `tokens` query tokens per row for `batch` rows over `context`
    cached tokens: Σ_layers [max(s·b·FLOP_param/F, bytes_param/BW)
    + max(s·b·n·FLOP_kv/F, b·n·bytes_kv/BW)] + max(s·b·FLOP_head/F, bytes_head/BW)."""
    return decode_cost(cfg, itemsize).step_time(roofline, batch, context, tokens)


def critical_length(cfg: ModelConfig, roofline: Roofline, batch: int, tokens: int,
                    itemsize: int) -> float:  # fmt: skip
    """The context at which a layer's KV-op time equals its parameter-op time, from exact counts
    (`DecodeCost.critical_length`)."""
    return decode_cost(cfg, itemsize).critical_length(roofline, batch, tokens)


def paper_critical_length(hidden_size: int, group_size: int, ridge: float, batch: int,
                          tokens: int) -> float:  # fmt: skip
    """ALGORITHMS.md's closed form from Table 1 (bf16, KV op memory-bound, i.e. s·g < R):
    n* = s·(10g + 2)·d / (2R) when b·s ≥ R (compute-bound parameter GEMMs), else
    (10g + 2)·d / (2b)."""
    d, g = _positive_int("hidden_size", hidden_size), _positive_int("group_size", group_size)
    b, s = _positive_int("batch", batch), _positive_int("tokens", tokens)
    if isinstance(ridge, bool) or not isinstance(ridge, int | float) or not ridge > 0:
        raise ConfigError(f"ridge must be FLOPs per byte > 0, got {ridge!r}")
    if b * s >= ridge:
        return s * (10 * g + 2) * d / (2 * ridge)
    return (10 * g + 2) * d / (2 * b)


# ---- speedup models ----------------------------------------------------------------------------


def omega(alpha: float, gamma: int) -> float:
    """Ω(γ, α) = 1 + α + … + α^γ = (1 − α^{γ+1}) / (1 − α): the expected tokens per step
    (accepted drafts + the bonus token) with γ drafts accepted i.i.d. with rate α; γ + 1 at
    α = 1."""
    a, g = _alpha(alpha), _positive_int("gamma", gamma)
    return float(sum(a**i for i in range(g + 1)))


def speedup_chain(alpha: float, gamma: int, t_target_1: float, t_draft: float,
                  t_verify: float) -> float:  # fmt: skip
    """Ω(γ, α) · T_T(1) / (γ · T_D + T_V(γ + 1)). Here T_T(1) is the target's autoregressive step,
    T_D one draft step, and T_V(γ + 1) the target's verify step over γ + 1 tokens."""
    t1 = _time("t_target_1", t_target_1)
    td, tv = _time("t_draft", t_draft), _time("t_verify", t_verify)
    return omega(alpha, gamma) * t1 / (gamma * td + tv)


def speedup_tree(expected_tokens: float, depth: int, t_target_1: float, t_draft: float,
                 t_verify: float) -> float:  # fmt: skip
    """G / ((T_target(L) + D · T_draft) / T_target(1)). G is the tree's expected tokens per step
    (Sequoia's G*), D the number of draft passes (depth), and T_target(L) = `t_verify` the
    target's step over the L-node tree."""
    if isinstance(expected_tokens, bool) or not isinstance(expected_tokens, int | float):
        raise ConfigError(f"expected_tokens must be a number >= 1, got {expected_tokens!r}")
    if not expected_tokens >= 1:
        raise ConfigError(f"expected_tokens must be a number >= 1, got {expected_tokens!r}")
    D = _positive_int("depth", depth)
    t1 = _time("t_target_1", t_target_1)
    td, tv = _time("t_draft", t_draft), _time("t_verify", t_verify)
    return float(expected_tokens) / ((tv + D * td) / t1)


# ---- timing sources ----------------------------------------------------------------------------


class Timing(Protocol):
    """Seconds per forward: the target over `tokens` queries per row and `context` cached
    tokens, and one draft step over a `budget`-slot draft cache."""

    def t_target(self, batch: int, context: int, tokens: int) -> float: ...

    def t_draft(self, batch: int, budget: int) -> float: ...


@dataclasses.dataclass(frozen=True)
class AnalyticTiming:
    """Times from `step_time` on a Roofline. The draft is `draft_cfg` if given, else the target
    itself (self-speculation): t_draft(b, K) = step_time(draft, b, K, 1)."""

    cfg: ModelConfig
    roofline: Roofline
    itemsize: int
    draft_cfg: ModelConfig | None = None

    def t_target(self, batch: int, context: int, tokens: int) -> float:
        return step_time(self.cfg, self.roofline, batch, context, tokens, self.itemsize)

    def t_draft(self, batch: int, budget: int) -> float:
        cfg = self.draft_cfg or self.cfg
        return step_time(cfg, self.roofline, batch, budget, 1, self.itemsize)


def _axis(table: Mapping, key: str, source: str) -> tuple[int, ...]:
    v = table.get(key)
    if not isinstance(v, list | tuple) or not v:
        raise ConfigError(f"{source}: {key!r} must be a non-empty list, got {v!r}")
    vals = tuple(_positive_int(f"{source}: {key} entry", x) for x in v)
    if any(a >= b for a, b in zip(vals, vals[1:], strict=False)):
        raise ConfigError(f"{source}: {key!r} must be strictly increasing, got {list(vals)}")
    return vals


def _grid(table: Mapping, key: str, shape: tuple[int, ...], source: str) -> np.ndarray:
    try:
        arr = np.asarray(table[key], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{source}: {key!r} must be a [batch][context][tokens] table of "
                          f"seconds, got {table.get(key)!r:.80}") from None  # fmt: skip
    if arr.shape != shape:
        raise ConfigError(f"{source}: {key!r} has shape {arr.shape}, expected {shape} "
                          "(batches × contexts × tokens)")  # fmt: skip
    if not (np.all(np.isfinite(arr)) and np.all(arr > 0)):
        raise ConfigError(f"{source}: {key!r} holds a non-positive or non-finite time")
    return arr


@dataclasses.dataclass(frozen=True)
class MeasuredTiming:
    """Times from a `jaxspec profile device` table: `batches`, `contexts`, `tokens` (strictly
    increasing) and `target_s[b][c][n]` (optionally `draft_s`, same shape), in seconds.

    * t_target(b, n, s) takes the batch's plane and interpolates bilinearly in (context,
      tokens) between measured points. A batch that is not in the table raises ConfigError,
      since there is no interpolation across batches. So does a context or token count outside
      the measured range: nothing is extrapolated.
    * t_draft(b, K) is t_target(b, K, 1) under self-speculation (the default). With
      `self_spec=False` it is the table's `draft_s` at context K and 1 token."""

    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    tokens: tuple[int, ...]
    target_s: np.ndarray = dataclasses.field(compare=False, repr=False)
    draft_s: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    self_spec: bool = True
    source: str = "device timing table"

    @classmethod
    def from_table(cls, table: Mapping, self_spec: bool = True,
                   source: str = "device timing table") -> MeasuredTiming:  # fmt: skip
        """From the dict a `jaxspec profile device` TOML parses to (checked)."""
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: expected a table (dict), got {type(table).__name__}")
        axes = [_axis(table, k, source) for k in ("batches", "contexts", "tokens")]
        shape = tuple(len(a) for a in axes)
        target = _grid(table, "target_s", shape, source)
        draft = _grid(table, "draft_s", shape, source) if "draft_s" in table else None
        if not self_spec and draft is None:
            raise ConfigError(f"{source}: self_spec=False needs 'draft_s' (profile with a draft)")
        return cls(*axes, target, draft, self_spec, source)

    @classmethod
    def from_file(cls, path: str | Path, self_spec: bool = True) -> MeasuredTiming:
        """Read a `configs/profiles/device__*.toml` written by `jaxspec profile device`."""
        try:
            table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: unreadable device timing table ({e})") from None
        return cls.from_table(table, self_spec, str(path))

    def _lookup(self, grid: np.ndarray, batch: int, context: int, tokens: int) -> float:
        b = _positive_int("batch", batch)
        if b not in self.batches:
            raise ConfigError(f"{self.source}: batch {b} is not in the table "
                              f"(batches: {list(self.batches)})")  # fmt: skip
        for name, x, axis in (("context", context, self.contexts),
                              ("tokens", tokens, self.tokens)):  # fmt: skip
            if not axis[0] <= x <= axis[-1]:
                raise ConfigError(f"{self.source}: {name} {x} is outside the measured range "
                                  f"[{axis[0]}, {axis[-1]}] (no extrapolation)")  # fmt: skip
        plane = grid[self.batches.index(b)]  # [context][tokens]
        row = np.array([np.interp(tokens, self.tokens, plane[i]) for i in range(len(plane))])
        return float(np.interp(context, self.contexts, row))

    def t_target(self, batch: int, context: int, tokens: int) -> float:
        return self._lookup(self.target_s, batch, context, tokens)

    def t_draft(self, batch: int, budget: int) -> float:
        grid = self.target_s if self.self_spec else self.draft_s
        return self._lookup(grid, batch, budget, 1)


@dataclasses.dataclass(frozen=True)
class StepTiming:
    """Measured seconds of one whole speculative step, as `spec_step` runs it (the draft phase,
    the verify forward, the accept walk and both caches' commits), per (batch, context, γ) at
    one reference draft budget `budget`; γ = 0 is the autoregressive step. A table
    `step_s[b][c][g]` over `batches`, `contexts` (strictly increasing) and `gammas` (strictly
    increasing, starting at 0). Contexts interpolate linearly between measured points; a batch
    or γ that is not in the table, or a context outside it, raises ConfigError.

    Optionally the same steps at other draft budgets: `budget_step_s[b][c][k]`, one whole step
    of a chain of `budget_gamma` drafts (the largest γ of the table) at each budget of
    `step_budgets` (which holds `budget`), timed in the same interleaved rounds. Then
    `draft_delta(b, n, K)` = (T(γ_b, K) − T(γ_b, budget)) / γ_b is the measured change of one
    draft step's cost from budget to K, inside the step as it runs."""

    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    gammas: tuple[int, ...]
    step_s: np.ndarray = dataclasses.field(compare=False, repr=False)
    budget: int = 0
    source: str = "step timing table"
    budgets: tuple[int, ...] = ()
    budget_step_s: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    budget_gamma: int = 0

    @classmethod
    def from_table(cls, table: Mapping, source: str = "step timing table") -> StepTiming:
        """From {"step_batches", "step_contexts", "step_gammas", "step_s", "step_budget"} and,
        optionally, {"step_budgets", "budget_step_s", "budget_gamma"}."""
        g = table.get("step_gammas")
        if (not isinstance(g, list | tuple) or not g or isinstance(g[0], bool) or g[0] != 0
                or any(isinstance(x, bool) or not isinstance(x, int) for x in g)
                or any(a >= c for a, c in zip(g, g[1:], strict=False))):  # fmt: skip
            raise ConfigError(f"{source}: 'step_gammas' must be strictly increasing integers "
                              f"starting with 0 (the AR step), got {g!r}")  # fmt: skip
        axes = [_axis(table, "step_batches", source), _axis(table, "step_contexts", source),
                tuple(int(x) for x in g)]  # fmt: skip
        grid = _grid(table, "step_s", tuple(len(a) for a in axes), source)
        budget = _positive_int(f"{source}: step_budget", table.get("step_budget"))
        if "budget_step_s" not in table:
            return cls(*axes, grid, budget, source)
        ks = _axis(table, "step_budgets", source)
        if budget not in ks:
            raise ConfigError(f"{source}: 'step_budgets' {list(ks)} must hold the step_budget "
                              f"{budget}")  # fmt: skip
        gb = table.get("budget_gamma")
        if gb != axes[2][-1]:
            raise ConfigError(f"{source}: 'budget_gamma' must be the largest step γ "
                              f"({axes[2][-1]}), got {gb!r}")  # fmt: skip
        bgrid = _grid(table, "budget_step_s", (len(axes[0]), len(axes[1]), len(ks)), source)
        return cls(*axes, grid, budget, source, ks, bgrid, int(gb))

    def has_budget(self, budget: int) -> bool:
        """Whether steps at `budget` were timed (always true for the reference budget)."""
        return self.budget_step_s is not None and budget in self.budgets

    def draft_delta(self, batch: int, context: int, budget: int) -> float:
        """Seconds one draft step at `budget` costs more (negative: less) than at the table's
        reference budget, from the whole steps timed at both (see the class docstring)."""
        if not self.has_budget(budget):
            raise ConfigError(f"{self.source}: budget {budget} has no timed steps (budgets: "
                              f"{list(self.budgets)})")  # fmt: skip
        self.t_step(batch, context, 0)  # validates batch and context
        col = self.budget_step_s[self.batches.index(batch)]
        t = [float(np.interp(context, self.contexts, col[:, self.budgets.index(k)]))
             for k in (budget, self.budget)]  # fmt: skip
        return (t[0] - t[1]) / self.budget_gamma

    def t_step_fit(self, batch: int, context: int, gamma: int) -> float:
        """`t_step` smoothed over γ, what the chooser reads: for γ ≥ 1 the least-squares line
        a + b·γ through the table's γ ≥ 1 steps at this batch and context. A step is affine in
        γ (γ draft forwards, and a verify whose cost grows with its γ + 1 tokens), and the fit
        averages the per-γ timing noise of a short measurement (this VM timed 8K × 1 at
        γ = 2/3/4: 210/224/362 ms, though one draft step costs ~30 ms there). γ = 0 (the AR
        step), and tables with fewer than two γ ≥ 1, are returned as measured."""
        t = self.t_step(batch, context, gamma)  # validates batch, context and γ
        gs = [g for g in self.gammas if g >= 1]
        if gamma == 0 or len(gs) < 2:
            return t
        slope, icpt = np.polyfit(gs, [self.t_step(batch, context, g) for g in gs], 1)
        return float(icpt + slope * gamma)

    def t_step(self, batch: int, context: int, gamma: int) -> float:
        b = _positive_int("batch", batch)
        if b not in self.batches:
            raise ConfigError(f"{self.source}: batch {b} is not in the step table "
                              f"(batches: {list(self.batches)})")  # fmt: skip
        if gamma not in self.gammas:
            raise ConfigError(f"{self.source}: γ = {gamma} is not in the step table "
                              f"(gammas: {list(self.gammas)})")  # fmt: skip
        if not self.contexts[0] <= context <= self.contexts[-1]:
            raise ConfigError(
                f"{self.source}: context {context} is outside the measured range "
                f"[{self.contexts[0]}, {self.contexts[-1]}] (no extrapolation)"
            )
        col = self.step_s[self.batches.index(b), :, self.gammas.index(gamma)]
        return float(np.interp(context, self.contexts, col))


def expected_tokens_chain(accept_hist: Sequence[float], gamma: int) -> float:
    """Expected tokens per step (accepted drafts + the bonus token) of a greedy chain of γ
    drafts, from the accepted-length histogram [γ_ref + 1] measured with a chain of γ_ref ≥ γ
    drafts: 1 + Σ_{d=1..γ} P(A ≥ d). With greedy drafts a shorter chain is a prefix of the
    longer one, so it accepts min(A, γ) of them; no i.i.d. assumption is made."""
    h = np.asarray(accept_hist, np.float64)
    g = _positive_int("gamma", gamma)
    if h.ndim != 1 or h.size < 2 or not np.all(h >= 0) or h.sum() <= 0:
        raise ConfigError(f"accept_hist must be a non-negative histogram of >= 2 counts, got "
                          f"{list(h)}")  # fmt: skip
    if g > h.size - 1:
        raise ConfigError(f"γ = {g} is longer than the measured chain ({h.size - 1} drafts)")
    reach = h[::-1].cumsum()[::-1] / h.sum()  # reach[d] = P(A >= d)
    return float(1.0 + reach[1 : g + 1].sum())


def step_token_probs(
    gamma: int, accept_hist: Sequence[float] | None = None, alpha: float | None = None
) -> np.ndarray:
    """P(a step emits k tokens), k = 0..γ + 1 (entry 0 is 0): k = 1 + min(A, γ) for a greedy
    chain of γ drafts, A the accepted drafts. From the accepted-length histogram of a chain of
    γ_ref ≥ γ drafts (as `expected_tokens_chain`), else i.i.d. per-token acceptance α."""
    g = _positive_int("gamma", gamma)
    p = np.zeros(g + 2)
    if accept_hist is not None:
        h = np.asarray(accept_hist, np.float64)
        if h.ndim != 1 or h.size < g + 1 or not np.all(h >= 0) or h.sum() <= 0:
            raise ConfigError(f"accept_hist must be a non-negative histogram of >= γ + 1 = "
                              f"{g + 1} counts, got {list(h)}")  # fmt: skip
        for a, c in enumerate(h / h.sum()):
            p[1 + min(a, g)] += c
        return p
    if alpha is None:
        raise ConfigError("step_token_probs needs accept_hist or alpha")
    a = _alpha(alpha)
    for k in range(g):
        p[1 + k] = a**k * (1 - a)
    p[g + 1] = a**g
    return p


def batch_tokens_per_step(probs: Sequence[float], tokens: int, batch: int) -> float:
    """Tokens per step of a static batch in which every row decodes `tokens` tokens:
    tokens / E[max_i S_i], S_i the steps row i needs. A batch runs until its slowest row is
    done (AR needs exactly `tokens` steps for every row), and a row's last step may overshoot.
    Steps are taken i.i.d. with `probs[k]` = P(a step emits k ≥ 1 tokens) (`step_token_probs`),
    within and across rows: rows that differ in difficulty make the real tail longer still.

    Exact: P(S ≤ s) by dynamic programming over a row's emitted tokens (capped at `tokens`),
    E[max] = Σ_s (1 − P(S ≤ s)^batch). At batch 1 and tokens → ∞ this tends to Σ_k k·probs[k]."""
    p = np.asarray(probs, np.float64)
    T, B = _positive_int("tokens", tokens), _positive_int("batch", batch)
    if p.ndim != 1 or p.size < 2 or p[0] != 0 or np.any(p < 0) or abs(p.sum() - 1) > 1e-9:
        raise ConfigError(f"probs must be P(k tokens), k = 0.., with P(0) = 0, summing to 1, "
                          f"got {list(p)}")  # fmt: skip
    q = np.zeros(T + 1)  # q[t] = P(t tokens emitted so far), t = T absorbing (done)
    q[0] = 1.0
    e_max = 0.0
    for _ in range(T):  # every step emits >= 1 token: S <= T
        e_max += 1.0 - q[T] ** B  # P(max > s) for s = 0, 1, ..., T - 1
        nq = np.zeros(T + 1)
        nq[T] = q[T]
        for k in range(1, min(p.size, T + 1)):  # from t < T, k more tokens: t + k, capped at T
            nq[k:T] += p[k] * q[: T - k]
            nq[T] += p[k] * q[T - k : T].sum()
        nq[T] += p[T + 1 :].sum() * q[:T].sum()  # steps of more than T tokens finish any row
        q = nq
    return float(T / e_max)


# ---- the chooser -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pick:
    """The chosen chain speculation for one (batch, context) bucket and the timings used."""

    gamma: int  # drafted tokens per step
    budget: int  # draft KV budget K
    alpha: float  # α(K) used
    speedup: float  # predicted: Ω(γ, α) · target_1_s / (γ · draft_s + verify_s)
    target_1_s: float  # t_target(b, n, 1)
    draft_s: float  # t_draft(b, min(K, n))
    verify_s: float  # t_target(b, n, γ + 1)
    step_s: float | None = None  # with a StepTiming: the predicted whole step at budget K
    ar_step_s: float | None = None  # with a StepTiming: the measured autoregressive step

    def to_dict(self) -> dict:
        """The fields as plain numbers; the step fields only when a StepTiming was used."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _check_alphas(alphas: Mapping[int, float]) -> dict[int, float]:
    if not isinstance(alphas, Mapping) or not alphas:
        raise ConfigError(f"alphas must be a non-empty mapping budget -> acceptance rate, "
                          f"got {alphas!r}")  # fmt: skip
    out = {}
    for k, a in sorted(alphas.items()):
        out[_positive_int("draft KV budget", k)] = _alpha(a, f"alpha for budget {k}")
    return out


def _check_gammas(gammas: Iterable[int]) -> tuple[int, ...]:
    gs = tuple(gammas)
    if not gs:
        raise ConfigError("gammas must be a non-empty list of integers >= 1, got []")
    return tuple(sorted({_positive_int("gamma", g) for g in gs}))


def choose_speculation(alphas: Mapping[int, float], timing: Timing, batch: int, context: int,
                       gammas: Iterable[int] = GAMMAS, steps: StepTiming | None = None,
                       hists: Mapping[int, Sequence[float]] | None = None,
                       tokens_per_row: int | None = None) -> Pick | None:  # fmt: skip
    """The (γ, K) maximising the predicted speedup for one bucket. `alphas` maps each measured
    draft KV budget K to its acceptance rate α(K). Returns None (autoregressive) unless the best
    prediction exceeds 1. Ties go to the smaller γ, then the smaller K.

    Without `steps` the prediction is `speedup_chain` from isolated forward times. With a
    `StepTiming` (whole steps measured at budget K0) it is E(γ, K) · T_AR / T_step(γ, K), where
    T_step(γ, K) = step_s(γ) + γ · (t_draft(K) − t_draft(K0)) (only the γ draft forwards change
    with K; step_s is the table's line over γ ≥ 1, `StepTiming.t_step_fit`, and with whole steps
    timed at K the draft's change is the larger of theirs and the forwards') and
    E(γ, K) = `expected_tokens_chain(hists[K], γ)` when K's accepted-length histogram is given,
    else Ω(γ, α(K)). Only the γ the step table measured are considered.

    `tokens_per_row` (a static batch whose rows each decode that many tokens, as the runner's
    and the bench's batches do) replaces the mean tokens per step by the batch's,
    `batch_tokens_per_step`: the batch steps until its slowest row is done. None: the mean
    (no tail; e.g. a serving engine that refills finished rows)."""
    al, gs = _check_alphas(alphas), _check_gammas(gammas)
    b, n = _positive_int("batch", batch), _positive_int("context", context)
    if tokens_per_row is not None:
        _positive_int("tokens_per_row", tokens_per_row)
    if steps is not None:
        return _choose_by_steps(al, gs, timing, steps, hists or {}, b, n, tokens_per_row)
    t1 = _time(f"t_target(batch={b}, context={n}, tokens=1)", timing.t_target(b, n, 1))
    best = None
    for g in gs:
        tv = _time(f"t_target(batch={b}, context={n}, tokens={g + 1})",
                   timing.t_target(b, n, g + 1))  # fmt: skip
        for k, a in al.items():
            kk = min(k, n)
            td = _time(f"t_draft(batch={b}, budget={kk})", timing.t_draft(b, kk))
            s = speedup_chain(a, g, t1, td, tv)
            if tokens_per_row is not None:  # the batch's tokens per step, not the mean row's
                e = batch_tokens_per_step(step_token_probs(g, alpha=a), tokens_per_row, b)
                s *= e / omega(a, g)
            if best is None or s > best.speedup:
                best = Pick(g, k, a, s, t1, td, tv)
    return best if best is not None and best.speedup > 1 else None


def predict_by_steps(alpha: float, hist: Sequence[float] | None, timing: Timing,
                     steps: StepTiming, batch: int, context: int, gamma: int, budget: int,
                     tokens_per_row: int | None = None,
                     ) -> tuple[float, float, float, float]:  # fmt: skip
    """The step-timed prediction of `choose_speculation` for one (γ, K):
    (speedup, T_step(γ, K), T_AR step, t_draft(K)). T_step(γ, K) = `StepTiming.t_step_fit`(γ)
    + γ·δ(K), δ(K) the draft step's cost change from the table's budget (see the code). With
    `tokens_per_row`, E is the static batch's tokens per step (`batch_tokens_per_step`), else
    the mean row's."""
    b, n, g, k = batch, context, gamma, budget
    t_ar = _time(f"step_s(batch={b}, context={n}, γ=0)", steps.t_step(b, n, 0))
    td0 = _time(f"t_draft(batch={b}, budget={min(steps.budget, n)})",
                timing.t_draft(b, min(steps.budget, n)))  # fmt: skip
    ts0 = _time(f"step_s(batch={b}, context={n}, γ={g})", steps.t_step_fit(b, n, g))
    td = _time(f"t_draft(batch={b}, budget={min(k, n)})", timing.t_draft(b, min(k, n)))
    # the draft's cost change from the reference budget: from isolated forwards over K-slot
    # caches, and where the table has whole steps at K the larger of the two (the dearer draft:
    # no saving that only one noisy measurement shows, e.g. 8K × 1 here timed γ = 4 at K = 256
    # 91 ms below K = 512, where the isolated draft forwards differ by under 1 ms)
    delta = max(steps.draft_delta(b, n, k), td - td0) if steps.has_budget(k) else td - td0
    ts = _time(f"the predicted step at γ={g}, budget {k}", ts0 + g * delta)
    hist = hist if hist is not None and len(hist) > g else None
    if tokens_per_row is not None:
        probs = step_token_probs(g, hist, None if hist is not None else alpha)
        e = batch_tokens_per_step(probs, tokens_per_row, b)
    else:
        e = expected_tokens_chain(hist, g) if hist is not None else omega(alpha, g)
    return e * t_ar / ts, ts, t_ar, td


def _choose_by_steps(al: dict[int, float], gs: tuple[int, ...], timing: Timing,
                     steps: StepTiming, hists: Mapping[int, Sequence[float]], b: int,
                     n: int, tokens_per_row: int | None) -> Pick | None:  # fmt: skip
    best = None
    for g in (g for g in gs if g in steps.gammas):
        for k, a in al.items():
            s, ts, t_ar, td = predict_by_steps(a, hists.get(k), timing, steps, b, n, g, k,
                                               tokens_per_row)  # fmt: skip
            if best is None or s > best.speedup:
                tv = timing.t_target(b, n, g + 1)
                best = Pick(g, k, a, s, t_ar, td, tv, step_s=ts, ar_step_s=t_ar)
    return best if best is not None and best.speedup > 1 else None


def speculation_table(
    alphas: Mapping[int, float],
    timing: Timing,
    batches: Sequence[int],
    contexts: Sequence[int],
    gammas: Iterable[int] = GAMMAS,
) -> list[dict]:
    """`choose_speculation` for every (batch, context). Returns one plain dict per bucket (TOML-
    and JSON-friendly): batch, context, gamma, budget, alpha, speedup, target_1_s, draft_s,
    verify_s. An autoregressive bucket has gamma = budget = 0, alpha = draft_s = 0,
    speedup = 1 and verify_s = target_1_s."""
    if not list(batches) or not list(contexts):
        raise ConfigError(f"batches and contexts must be non-empty, got {list(batches)} and "
                          f"{list(contexts)}")  # fmt: skip
    gs = _check_gammas(gammas)
    rows = []
    for b in batches:
        for c in contexts:
            pick = choose_speculation(alphas, timing, b, c, gs)
            if pick is None:
                t1 = timing.t_target(b, c, 1)
                pick = Pick(0, 0, 0.0, 1.0, t1, 0.0, t1)
            rows.append({"batch": int(b), "context": int(c), **pick.to_dict()})
    return rows
