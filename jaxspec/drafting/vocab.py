"""Reduced-vocabulary draft heads: a draft that scores only a subset of the target's tokens.

A trained draft (`jaxspec train-draft`) is a normal jaxspec checkpoint (full vocabulary, untied
head) plus, optionally, `draft_vocab.npy`: the sorted int32 token ids [V'] its head was trained
on. Loaded with that file (`load_draft`), the draft becomes a `VocabDraft`: the model's params
with the head replaced by the columns `head [M, V']` of those tokens, so a draft step reads
M·V' head weights instead of M·V (on SmolLM2 the full 49152-token head is ~28M of the 135M
weights: no full-head draft can cost much less than ~20% of a target step on a memory-bound CPU).

`draft_forward` returns full-vocabulary logits [B, T, V]: the V' scores scattered into their
token ids and -inf elsewhere. The draft's distribution therefore has exactly zero mass outside
its vocabulary, which every verification rule accepts as is: a drafted token always has q > 0,
tokens outside the subset are never proposed, the target's residual keeps their mass.
Decoding stays lossless; only acceptance depends on the subset (its coverage caps it).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.config import ModelConfig
from jaxspec.errors import CheckpointError
from jaxspec.kv_cache import KVCache
from jaxspec.model import forward, forward_hidden
from jaxspec.model.params import Params
from jaxspec.types import Array, Bool, Float, Int

VOCAB_FILE = "draft_vocab.npy"


@struct.dataclass
class VocabDraft:
    params: Params  # the draft model; its own lm_head is unused (None)
    ids: Int[Array, " V2"]  # token id of each head column, sorted, distinct
    head: Float[Array, "M V2"]


def model_params(params_d) -> Params:
    """The transformer params of a draft (a `Params` or a `VocabDraft`)."""
    return params_d.params if isinstance(params_d, VocabDraft) else params_d


def in_layout(params_d, layout: str):
    """A model or draft's params in `layout`, "input", "output" (`jaxspec.model.output_major`) or
    "unrolled" (`jaxspec.model.unrolled`): a `Params`, a `VocabDraft` (its transformer converted)
    or anything else (an n-gram datastore: unchanged). Params already in the layout are returned
    as they are."""
    from jaxspec.model import input_major, output_major, unrolled

    convert = {"output": output_major, "unrolled": unrolled}.get(layout, input_major)
    if isinstance(params_d, VocabDraft):
        return params_d.replace(params=convert(params_d.params))
    return convert(params_d) if isinstance(params_d, Params) else params_d


def pair_in_layout(params: Params, draft, layout: str) -> tuple:
    """(target, draft) params in `layout`; a self-speculation draft (the target's own params
    object) stays the same object, so only one converted copy is made."""
    converted = in_layout(params, layout)
    return converted, converted if draft is params else in_layout(draft, layout)


def draft_forward(
    params_d,
    cfg: ModelConfig,
    tokens: Int[Array, "B T"],
    positions: Int[Array, "B T"],
    cache: KVCache,
    inflight: Bool[Array, "#B T T"] | None = None,
) -> tuple[Float[Array, "B T V"], KVCache]:
    """`jaxspec.model.forward` for any draft: full-vocabulary float32 logits (-inf outside a
    `VocabDraft`'s subset) and the cache with the in-flight K/V written."""
    if not isinstance(params_d, VocabDraft):
        return forward(params_d, cfg, tokens, positions, cache, inflight)
    h, cache = forward_hidden(params_d.params, cfg, tokens, positions, cache, inflight)
    z = jnp.einsum("btm,mv->btv", h, params_d.head).astype(jnp.float32)
    full = jnp.full(z.shape[:2] + (cfg.vocab_size,), -jnp.inf, jnp.float32)
    return full.at[:, :, params_d.ids].set(z), cache


def make_vocab_draft(params: Params, ids: np.ndarray) -> VocabDraft:
    """A `VocabDraft` from full-vocabulary params (tied or untied head) and token ids."""
    ids = jnp.asarray(np.asarray(ids, np.int32))
    head = params.embed[ids].T if params.lm_head is None else params.lm_head[:, ids]
    return VocabDraft(params=params.replace(lm_head=None), ids=ids, head=head)


def check_ids(ids: np.ndarray, vocab_size: int, source: str) -> np.ndarray:
    ids = np.asarray(ids)
    if (ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer)
            or ids.min() < 0 or ids.max() >= vocab_size or np.any(np.diff(ids) <= 0)):  # fmt: skip
        raise CheckpointError(
            f"{source}: draft vocabulary must be sorted distinct token ids in "
            f"[0, {vocab_size}), got shape {ids.shape} dtype {ids.dtype}"
        )
    return ids.astype(np.int32)


def read_vocab(path: Path, vocab_size: int) -> np.ndarray | None:
    """The ids of `<checkpoint>/draft_vocab.npy` (None when the checkpoint has no such file)."""
    f = Path(path) / VOCAB_FILE
    if not f.is_file():
        return None
    try:
        ids = np.load(f, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable draft vocabulary ({e})") from None
    return check_ids(ids, vocab_size, str(f))


def load_draft(model, full_vocab: bool = False):
    """(cfg, draft params) of a loaded draft checkpoint (`jaxspec.models.LoadedModel`): a
    `VocabDraft` when it has `draft_vocab.npy` (unless `full_vocab`), else its params."""
    ids = None if full_vocab else read_vocab(model.path, model.cfg.vocab_size)
    if ids is None:
        return model.cfg, model.params
    return model.cfg, make_vocab_draft(model.params, ids)
