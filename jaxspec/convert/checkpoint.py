"""orbax save/restore of converted params, so later starts skip conversion.

Layout of a jaxspec checkpoint directory:
  jaxspec.json   {"format": 1, "dtype": "float32", "config": <ModelConfig as a dict>}
  params/        an orbax PyTree checkpoint of `Params`
Restoring builds the abstract target from the config (shapes, dtype and, optionally, shardings),
so the arrays land directly where they belong.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxspec.config import ModelConfig, RopeScaling
from jaxspec.errors import CheckpointError
from jaxspec.fsutil import move_into_place
from jaxspec.model.params import Params, param_shapes

FORMAT = 2  # 2: fused wqkv / w_gate_up layout
MARKER = "jaxspec.json"


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def checkpoint_format(path: Path) -> int | None:
    """The format number of a jaxspec checkpoint directory (None if unreadable)."""
    try:
        return json.loads((Path(path) / MARKER).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def save_params(path: str | Path, cfg: ModelConfig, params: Params) -> Path:
    """Write atomically: a temp sibling directory renamed into place when complete."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "params", params)
        ckptr.wait_until_finished()
        meta = {"format": FORMAT, "dtype": str(params.embed.dtype), "config": _cfg_dict(cfg)}
        (tmp / MARKER).write_text(json.dumps(meta, indent=1))
        move_into_place(tmp, path)  # an old checkpoint is replaced only once this is complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_params(path: str | Path, shardings=None) -> tuple[ModelConfig, Params]:
    """Restore (config, params); `shardings` (a pytree of `jax.sharding.Sharding` matching
    `Params`, or one sharding for every leaf) places each array directly."""
    path = Path(path)
    marker = path / MARKER
    try:
        meta = json.loads(marker.read_text())
        if meta.get("format") != FORMAT:
            raise CheckpointError(
                f"{marker}: checkpoint format {meta.get('format')!r}, this jaxspec reads {FORMAT}; "
                "convert the model again (jaxspec convert)"
            )
        cfg = _cfg_from_dict(meta["config"])
        dtype = jnp.dtype(meta["dtype"])
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{marker}: unreadable jaxspec checkpoint metadata ({e!r})") from None
    shapes = param_shapes(cfg)
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)  # noqa: E731
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        sharding = shardings or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s, dtype, sharding=sharding), shapes, is_leaf=is_shape
        )
    else:
        target = jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s, dtype, sharding=sh),
            shapes, shardings, is_leaf=is_shape,
        )  # fmt: skip
    try:
        params = ocp.StandardCheckpointer().restore(path.absolute() / "params", target)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path / 'params'}: cannot restore params ({e})") from None
    return cfg, params


def _cfg_dict(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    del d["attention"], d["prefill"]  # run-time choices, not part of the model
    return d


def _cfg_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    d.pop("attention", None), d.pop("prefill", None)
    if d.get("rope_scaling"):
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
    return ModelConfig(**d)
