"""Acceptance profiles: Sequoia's positional acceptance vector, measured (ALGORITHMS.md §4(b)).

`profile_acceptance` decodes prompts with one-level trees of width W (`kary(W, 1)`): each step
the draft proposes W distinct children of the root (SWOR at T > 0, the draft's top-W at T = 0)
and the target verifies them (SWOR rule / greedy). The step's rank histogram
(`SpecState.rank_hist`) counts which rank was accepted, or none. Then
  p_k  = (steps accepting rank k) ÷ (steps),   none = 1 − Σ p_k,
pooled over every live step of every prompt. Profiles are TOML files
`configs/profiles/<target>__<draft>__T<temperature>.toml` holding `p`, `none`, the settings,
the step count and the command that made them; `read_profile` loads one back (checked).

`profile_device` times the compiled target forward (and a draft's) over n in-flight tokens per
row at batch and context buckets: t[b][ctx][n] in seconds (median of a few runs, compile
excluded), the table Sequoia's optimiser and the cost models read
(`configs/profiles/device__<device>__<model>.toml`, with the device's roofline constants).
"""

from __future__ import annotations

import datetime
import math
import tomllib
from pathlib import Path

import numpy as np

from jaxspec.errors import ConfigError

PROFILE_DIR = Path(__file__).resolve().parent.parent / "configs" / "profiles"


def profile_name(target: str, draft: str, temperature: float) -> str:
    clean = [s.replace("/", "_").replace(" ", "_") for s in (target, draft)]
    return f"{clean[0]}__{clean[1]}__T{temperature:g}"


def device_profile_path(model_name: str) -> Path:
    """configs/profiles/device__<platform>-<device kind>__<model>.toml for the default device."""
    import jax

    d = jax.devices()[0]
    device = f"{d.platform}-{d.device_kind}".replace(" ", "_").replace("/", "_")
    return PROFILE_DIR / f"device__{device}__{model_name}.toml"


def layerskip_name(keep: tuple[int, ...]) -> str:
    """`layerskip-0-14+20-29` for the kept layers 0..14 and 20..29."""
    runs, start = [], keep[0]
    for a, b in zip(keep, keep[1:] + (None,), strict=True):
        if b != a + 1:
            runs.append(f"{start}-{a}" if a != start else f"{a}")
            start = b
    return "layerskip-" + "+".join(runs)


def rank_profile(rank_hist: np.ndarray) -> tuple[list[float], float, int]:
    """(p_1..p_W, none, steps) from a summed rank histogram [W + 1] (last entry: none)."""
    h = np.asarray(rank_hist, np.float64)
    total = h.sum()
    if total <= 0:
        raise ConfigError("no speculative step was recorded: nothing to profile")
    p = (h[:-1] / total).tolist()
    return p, float(h[-1] / total), int(total)


def profile_acceptance(model, spec, draft_params, ids: list[list[int]], opts) -> dict:
    """Run the one-level-tree decode over `ids` and return the profile (see module docstring)."""
    from jaxspec.runner import Runner

    runner = Runner(model.params, model.cfg, spec, draft_params)
    _, m = runner.run(ids, opts)
    hist = runner.last_rank_hist
    p, none, steps = rank_profile(hist)
    return {"p": p, "none": none, "steps": steps, "tau": m.tau, "prompts": len(ids)}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(float(v)) if isinstance(v, float) else str(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def write_toml(path: Path, body: dict, header: list[str]) -> Path:
    """Write flat keys (numbers, strings, nested lists) as TOML, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {h}" for h in header]
    lines += [f"{k} = {_toml_value(v)}" for k, v in body.items() if v is not None]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def write_profile(path: Path, profile: dict, meta: dict) -> Path:
    """Write an acceptance profile TOML (`p` rounded to 6 digits)."""
    body = {**meta, "p": [round(x, 6) for x in profile["p"]], "none": round(profile["none"], 6),
            "steps": profile["steps"], "tau": round(profile["tau"], 4),
            "prompts": profile["prompts"], "created": _now()}  # fmt: skip
    return write_toml(path, body, [
        "Positional acceptance vector (Sequoia): p[k-1] = P(rank-k child accepted).",
        "Written by `jaxspec profile acceptance`; see jaxspec/profiling.py.",
    ])  # fmt: skip


def write_device_profile(path: Path, table: dict, meta: dict) -> Path:
    """Write a device timing table TOML (seconds rounded to 0.1 µs)."""
    body = {**meta, "created": _now(), **table}
    for k in ("target_s", "draft_s"):
        if k in body:
            body[k] = np.round(np.asarray(body[k]), 7).tolist()
    return write_toml(path, body, [
        "Measured forward time (s) over n in-flight tokens per row: t[batch][context][n].",
        "Written by `jaxspec profile device`; see jaxspec/profiling.py.",
    ])  # fmt: skip


def read_profile(path: str | Path) -> dict:
    """Load and check a profile TOML: `p` a non-empty list of probabilities summing to <= 1."""
    path = Path(path)
    if not path.is_file():
        cand = PROFILE_DIR / f"{path}.toml"  # a profile name (its T may hold a dot: T0.6)
        if path.suffix != ".toml" and cand.is_file():
            path = cand
        else:
            raise ConfigError(f"{path}: no such acceptance profile (make one with "
                              "`jaxspec profile acceptance`)")  # fmt: skip
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: unreadable acceptance profile ({e})") from None
    p = data.get("p")
    if (not isinstance(p, list) or not p or not all(isinstance(x, int | float) for x in p)
            or any(x < 0 or math.isnan(x) for x in p) or sum(p) > 1 + 1e-6):  # fmt: skip
        raise ConfigError(f"{path}: 'p' must be a non-empty list of probabilities summing to <= 1")
    data["path"] = str(path)
    return data


# ---- device timing tables (Sequoia's hardware-aware optimiser, MagicDec's cost model) ----------


def time_forward(params, cfg, batch: int, context: int, tokens: int, reps: int = 3,
                 layout: str = "auto") -> float:  # fmt: skip
    """Median seconds of one jitted forward of `tokens` in-flight tokens per row over a cache
    holding `context` committed tokens per row (compile and warm-up excluded), with the weights
    in the layout a `Runner(layout=...)` decodes with."""
    import time

    import jax
    import jax.numpy as jnp

    from jaxspec.drafting.vocab import draft_forward, in_layout, model_params
    from jaxspec.kv_cache import init_cache
    from jaxspec.model import k_slot_last_for
    from jaxspec.runner import resolve_layout

    params = in_layout(params, resolve_layout(layout))

    mp = model_params(params)
    cache = init_cache(cfg, batch, context + tokens, mp.embed.dtype, k_slot_last_for(mp))
    cache = cache.replace(lengths=jnp.full((batch,), context, jnp.int32))
    if k_slot_last_for(mp):  # unrolled weights decode a per-layer cache (`decode_layout`)
        cache = cache.layered()
    toks = jnp.ones((batch, tokens), jnp.int32)
    pos = context + jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))
    fn = jax.jit(lambda p, t, q, c: draft_forward(p, cfg, t, q, c)[0])  # any model or draft
    fn = fn.lower(params, toks, pos, cache)
    fn = fn.compile()
    jax.block_until_ready(fn(params, toks, pos, cache))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, toks, pos, cache))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def profile_device(params, cfg, batches, contexts, tokens, draft=None, reps: int = 3,
                   progress: bool = True, layout: str = "auto") -> dict:  # fmt: skip
    """t_target[b][c][n] (and t_draft, same shape, for a (cfg, params) draft) in seconds, with
    the weights in the layout a `Runner(layout=...)` decodes with."""
    from tqdm import tqdm

    from jaxspec.drafting.vocab import pair_in_layout
    from jaxspec.runner import resolve_layout

    layout = resolve_layout(layout)  # converted once here; time_forward's conversion: a no-op
    params, dparams = pair_in_layout(params, None if draft is None else draft[1], layout)
    if draft is not None:
        draft = (draft[0], dparams)

    grid = [(bi, ci, ni) for bi in range(len(batches)) for ci in range(len(contexts))
            for ni in range(len(tokens))]  # fmt: skip
    target = np.zeros((len(batches), len(contexts), len(tokens)))
    drafted = np.zeros_like(target) if draft is not None else None
    for bi, ci, ni in tqdm(grid, desc="profile device", disable=not progress):
        b, c, n = batches[bi], contexts[ci], tokens[ni]
        target[bi, ci, ni] = time_forward(params, cfg, b, c, n, reps, layout)
        if draft is not None:
            dcfg, dparams = draft
            drafted[bi, ci, ni] = time_forward(dparams, dcfg, b, c, n, reps, layout)
    out = {"batches": list(batches), "contexts": list(contexts), "tokens": list(tokens),
           "target_s": target.tolist()}  # fmt: skip
    if drafted is not None:
        out["draft_s"] = drafted.tolist()
    return out
