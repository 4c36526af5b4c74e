"""SSSD's draft length from measurements: N per (batch, context) bucket (`--draft-tokens auto`).

ALGORITHMS.md §5(b) sizes the n-gram tree from the device's roofline (`jaxspec.hardware`). On a
CPU that rule over-drafts: XLA's small-M matmuls reach far less than the GEMM peak, so verifying
N + 1 tokens costs much more than one. This module replaces the roofline by two measurements:

  * t(b, c, n): the target forward over n in-flight tokens per row at batch b and context c
    (`jaxspec profile device`, the `target_s` table; seconds);
  * tau(N): tokens per target step (bonus included) of greedy SSSD with N draft tokens on the
    tuning prompts (`jaxspec profile sssd`: `configs/profiles/<model>__sssd[-ds]__T<temp>.toml`,
    keys `draft_tokens` and `tau`; `-ds` with a datastore).

Conventions:
  * N = draft tokens per row (tree nodes below the root); a step verifies n = N + 1 tokens.
  * predicted speedup(N) = tau(N) · t(b, c, 1) / t(b, c, N + 1), t interpolated linearly in n
    between the table's columns (an N + 1 beyond the largest column is not considered). The
    n-gram lookup and tree build (< 1 ms a step here) and the accept walk are not in t.
  * The choice is the N of the largest prediction, or 0 (decode autoregressively) when no
    prediction exceeds `min_speedup` (default 1).
  * Buckets as `--tree auto`: the smallest profiled batch >= b (else the largest), likewise the
    context.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path

import numpy as np

from jaxspec.errors import ConfigError


def _bucket(values, x: int) -> int:
    values = sorted(set(values))
    return next((v for v in values if v >= x), values[-1])


def interp_time(tokens, times, n: int) -> float:
    """t(n) from measured (tokens[i], times[i]) by linear interpolation; nan beyond the ends."""
    tokens, times = np.asarray(tokens, np.float64), np.asarray(times, np.float64)
    if n < tokens[0] or n > tokens[-1]:
        return math.nan
    return float(np.interp(n, tokens, times))


@dataclasses.dataclass(frozen=True)
class SssdChoice:
    """N for one bucket (0: autoregressive) and its predicted speedup over AR."""

    batch: int
    context: int
    draft_tokens: int
    tau: float
    speedup: float


@dataclasses.dataclass(frozen=True)
class SssdAuto:
    """tau(N) and the device's t(b, c, n): the per-bucket choice of N."""

    draft_tokens: tuple[int, ...]  # measured N, increasing
    tau: tuple[float, ...]
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    tokens: tuple[int, ...]  # n columns of the timing table
    target_s: tuple  # [batch][context][n] seconds
    min_speedup: float = 1.0

    def __post_init__(self):
        if len(self.draft_tokens) != len(self.tau) or not self.draft_tokens:
            raise ConfigError("the SSSD profile needs one tau per draft_tokens entry")
        if list(self.draft_tokens) != sorted(set(self.draft_tokens)) or self.draft_tokens[0] < 1:
            raise ConfigError(f"draft_tokens must be increasing integers >= 1: {self.draft_tokens}")
        if any(not (t >= 1.0) for t in self.tau):
            raise ConfigError(f"tau must be >= 1 (tokens per step): {self.tau}")
        if 1 not in self.tokens:
            raise ConfigError("the device timing table needs n = 1 (the autoregressive step)")
        shape = np.shape(self.target_s)
        want = (len(self.batches), len(self.contexts), len(self.tokens))
        if shape != want:
            raise ConfigError(f"target_s has shape {shape}, expected {want}")

    def choose(self, batch: int, context: int) -> SssdChoice:
        b, c = _bucket(self.batches, batch), _bucket(self.contexts, context)
        t = self.target_s[self.batches.index(b)][self.contexts.index(c)]
        t1 = interp_time(self.tokens, t, 1)
        best = SssdChoice(b, c, 0, 1.0, 1.0)
        for n_draft, tau in zip(self.draft_tokens, self.tau, strict=True):
            tn = interp_time(self.tokens, t, n_draft + 1)
            if not math.isfinite(tn):
                continue
            s = tau * t1 / tn
            if s > max(best.speedup, self.min_speedup) * (1 + 1e-9):
                best = SssdChoice(b, c, n_draft, tau, s)
        return best

    def table(self) -> list[SssdChoice]:
        return [self.choose(b, c) for b in self.batches for c in self.contexts]


def _read_toml(path: Path, what: str, make: str) -> dict:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(
            f"{path}: no readable {what} ({e.strerror}); make one with {make}"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: unreadable {what} ({e})") from None


def load_sssd_auto(profile: str | Path, device: str | Path, min_speedup: float = 1.0) -> SssdAuto:
    """An `SssdAuto` from an SSSD tau profile and a device timing table (both TOML)."""
    prof = _read_toml(profile, "SSSD profile", "`jaxspec profile sssd`")
    for k in ("draft_tokens", "tau"):
        if not isinstance(prof.get(k), list):
            raise ConfigError(f"{profile}: no {k!r} list: not a `jaxspec profile sssd` file")
    dev = load_device_table(device)
    try:
        return SssdAuto(
            tuple(int(x) for x in prof["draft_tokens"]), tuple(float(x) for x in prof["tau"]),
            tuple(dev["batches"]), tuple(dev["contexts"]), tuple(dev["tokens"]),
            tuple(tuple(tuple(r) for r in rows) for rows in dev["target_s"]), min_speedup,
        )  # fmt: skip
    except ConfigError as e:
        raise ConfigError(f"{profile} / {device}: {e}") from None


def ngram_config(draft_tokens: int):
    """The n-gram drafter's config for N draft tokens (depth from SSSD's rule)."""
    from jaxspec.drafting.ngram import NgramConfig
    from jaxspec.hardware import tree_depth

    return NgramConfig(num_nodes=draft_tokens, branch_length=max(tree_depth(draft_tokens + 1), 1))


@dataclasses.dataclass(frozen=True)
class AutoSssdSpecs:
    """`--method sssd --draft-tokens auto` for the Runner: (batch bucket, context) ->
    SpecConfig, or None where the choice is autoregressive decoding."""

    cfg: object  # the target's ModelConfig
    auto: SssdAuto
    verifier: str

    def __call__(self, batch: int, context: int):
        from jaxspec.speculative import SpecConfig
        from jaxspec.trees import chain

        n = self.auto.choose(batch, context).draft_tokens
        if n == 0:
            return None
        return SpecConfig(self.cfg, self.cfg, chain(0), self.verifier, ngram=ngram_config(n))

    def describe(self) -> str:
        parts = [f"b{c.batch}/ctx{c.context}: "
                 + (f"N={c.draft_tokens} ({c.speedup:.2f}x)" if c.draft_tokens else "AR")
                 for c in self.auto.table()]  # fmt: skip
        return "draft tokens per bucket from the measured tables: " + ", ".join(parts)


# verify widths offered to the adaptive drafter (w + 1 tokens per row must be in the device table)
ADAPTIVE_WIDTHS = (0, 1, 3, 7, 15)


def load_device_table(device: str | Path) -> dict:
    """The `jaxspec profile device` table: batches, contexts, tokens, target_s (checked)."""
    dev = _read_toml(device, "device timing table", "`jaxspec profile device`")
    for k in ("batches", "contexts", "tokens", "target_s"):
        if k not in dev:
            raise ConfigError(f"{device}: no {k!r}: not a `jaxspec profile device` table")
    shape = np.shape(dev["target_s"])
    want = (len(dev["batches"]), len(dev["contexts"]), len(dev["tokens"]))
    if shape != want:
        raise ConfigError(f"{device}: target_s has shape {shape}, expected {want}")
    if 1 not in dev["tokens"]:
        raise ConfigError(f"{device}: the timing table needs n = 1 (the autoregressive step)")
    return dev


@dataclasses.dataclass(frozen=True)
class AdaptiveSssdSpecs:
    """`--draft-tokens adaptive` for the Runner: per (batch, context) bucket an n-gram drafter
    whose verify width is chosen every step (`NgramConfig.widths`, `ngram.choose_width`) among
    `ADAPTIVE_WIDTHS`, each costed by the measured t(b, c, w + 1) / t(b, c, 1) of the device
    table (buckets as `--draft-tokens auto`; widths beyond the table's largest n are dropped).
    `objective` (`NgramConfig.objective`): "slowest" for the runner's static batches (the
    default), "sum" for the serving engine, whose finished rows are replaced at once."""

    cfg: object  # the target's ModelConfig
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    tokens: tuple[int, ...]
    target_s: tuple
    verifier: str
    objective: str = "slowest"

    @classmethod
    def load(cls, device: str | Path, cfg, verifier: str,
             objective: str = "slowest") -> AdaptiveSssdSpecs:  # fmt: skip
        dev = load_device_table(device)
        target_s = tuple(tuple(tuple(r) for r in rows) for rows in dev["target_s"])
        return cls(cfg, tuple(dev["batches"]), tuple(dev["contexts"]), tuple(dev["tokens"]),
                   target_s, verifier, objective)  # fmt: skip

    def costs(self, batch: int, context: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
        b, c = _bucket(self.batches, batch), _bucket(self.contexts, context)
        t = self.target_s[self.batches.index(b)][self.contexts.index(c)]
        t1 = interp_time(self.tokens, t, 1)
        pairs = [(w, interp_time(self.tokens, t, w + 1) / t1) for w in ADAPTIVE_WIDTHS]
        pairs = [(w, cost) for w, cost in pairs if math.isfinite(cost)]
        # more tokens never cost less: a noisy row (t(2) < t(1) was measured once at batch 8)
        # would make a wider verify look free, so costs are made non-decreasing in w
        costs = np.maximum.accumulate([max(cost, 1e-6) for _, cost in pairs])
        return tuple(w for w, _ in pairs), tuple(float(c) for c in costs)

    def ngram(self, batch: int, context: int):
        from jaxspec.drafting.ngram import NgramConfig
        from jaxspec.hardware import tree_depth

        widths, costs = self.costs(batch, context)
        n = max(widths[-1], 1)
        return NgramConfig(num_nodes=n, branch_length=max(tree_depth(n + 1), 1),
                           widths=widths, width_cost=costs, objective=self.objective)  # fmt: skip

    def __call__(self, batch: int, context: int):
        from jaxspec.speculative import SpecConfig
        from jaxspec.trees import chain

        return SpecConfig(self.cfg, self.cfg, chain(0), self.verifier,
                          ngram=self.ngram(batch, context))  # fmt: skip

    def describe(self) -> str:
        parts = []
        for b in self.batches:
            for c in self.contexts:
                w, cost = self.costs(b, c)
                parts.append(
                    f"b{b}/ctx{c}: "
                    + " ".join(f"{x}:{y:.2f}" for x, y in zip(w, cost, strict=True))
                )
        return ("verify width chosen per step; width:relative cost per bucket: "
                + ", ".join(parts))  # fmt: skip


def sssd_profile_name(model: str, datastore: bool, temperature: float = 0.0) -> str:
    return f"{model}__sssd{'-ds' if datastore else ''}__T{temperature:g}"


def measure_tau(model, ids: list[list[int]], draft_tokens, opts, datastore=None,
                progress: bool = True) -> list[float]:  # fmt: skip
    """tau(N) for each N: tokens per target step of SSSD (greedy at opts.temperature == 0, the
    point-mass rule otherwise) over `ids`."""
    from tqdm import tqdm

    from jaxspec.runner import Runner
    from jaxspec.speculative import SpecConfig
    from jaxspec.trees import chain

    verifier = "greedy" if opts.temperature == 0 else "point_mass"
    out = []
    for n in tqdm(list(draft_tokens), desc="profile sssd", disable=not progress):
        spec = SpecConfig(model.cfg, model.cfg, chain(0), verifier, ngram=ngram_config(n))
        runner = Runner(model.params, model.cfg, spec, datastore, time_phases=False)
        _, m = runner.run(ids, opts)
        out.append(float(m.tau))
    return out
