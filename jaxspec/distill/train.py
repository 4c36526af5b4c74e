"""Distil a small draft from the target's own outputs (optax, orbax checkpoints, resumable).

The draft (`init_draft`): the target layers `cfg.layers` at the target's width (a layer-skip
draft, `jaxspec.drafting.layer_skip`), the target's final norm, the target's (frozen) input
embedding, and an untied head over `ids` (the draft vocabulary, initialised from the target's
tied embedding rows). Trained: layers, final norm, head.

Loss: at every continuation position the KL divergence KL(p̃ ‖ q) from the teacher's stored
top-k distribution p̃ (the top-k probabilities of the target's full softmax restricted to the
draft vocabulary and renormalised) to the draft's softmax q over its vocabulary. Tokens outside
the draft vocabulary carry no loss (the draft gives them zero mass at decoding time).
`agree` is the fraction of positions whose draft argmax is the teacher's top-1 token (the
greedy acceptance of a one-token draft, teacher-forced).

Batches: sequences sorted by length, cut into fixed batches of `batch_size` (each padded to a
multiple of 32 tokens, so few shapes compile), visited in a seeded random order per epoch:
step s reads a batch that depends only on (seed, s), so a resumed run sees the same data.
Checkpoints: orbax `CheckpointManager` under `<work>/ckpt` every `checkpoint_every` steps and at
the end ({trainable params, optimiser state}); `train` restores the latest one and continues.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct

from jaxspec.config import ModelConfig
from jaxspec.distill.config import TEACHER_FIELDS, DistillConfig, check_resume
from jaxspec.distill.teacher import TeacherData
from jaxspec.drafting.model import layer_skip
from jaxspec.errors import ConfigError
from jaxspec.kv_cache import init_cache
from jaxspec.model import forward_hidden
from jaxspec.model.params import LayerParams, Params
from jaxspec.types import Array, Float, Int

PAD_TO = 32


@struct.dataclass
class Trainable:
    layers: LayerParams
    final_norm: Float[Array, " M"]
    head: Float[Array, "M V2"]


def choose_vocab(data: TeacherData, size: int, cfg: ModelConfig) -> np.ndarray:
    """The `size` most frequent tokens of the teacher's continuations (ties and the rest by the
    teacher's top-k counts, then by id), EOS ids always included; sorted ids. size 0 = all."""
    V = cfg.vocab_size
    if size <= 0 or size >= V:
        return np.arange(V, dtype=np.int32)
    gen = np.zeros(V, np.int64)
    for i in range(len(data.length)):
        np.add.at(gen, data.tokens[i, data.prompt_len[i] : data.length[i]], 1)
    topk = np.bincount(data.ids[data.ids >= 0].ravel(), minlength=V)
    score = gen * (len(data.length) * 1000 + 1.0) + topk  # generated counts first
    for e in cfg.eos_token_ids:
        score[e] = np.inf
    order = np.lexsort((np.arange(V), -score))
    return np.sort(order[:size]).astype(np.int32)


def init_draft(params: Params, cfg: ModelConfig, layers: tuple[int, ...], ids: np.ndarray):
    """(draft config, trainable params, frozen input embedding); see module docstring."""
    dcfg, dparams = layer_skip(params, cfg, layers)
    dcfg = dataclasses.replace(dcfg, tie_word_embeddings=False)
    head = params.embed[jnp.asarray(ids)].T if params.lm_head is None else params.lm_head[:, ids]
    train = Trainable(layers=dparams.layers, final_norm=dparams.final_norm, head=head)
    return dcfg, jax.tree_util.tree_map(jnp.array, train), params.embed


def draft_scores(train: Trainable, embed, dcfg: ModelConfig, tokens: Int[Array, "B T"]):
    """Draft logits over its vocabulary [B, T, V'] for whole sequences (causal, from position 0)."""
    B, T = tokens.shape
    params = Params(embed=embed, layers=train.layers, final_norm=train.final_norm, lm_head=None)
    cache = init_cache(dcfg, B, 1, embed.dtype)  # empty (lengths 0): in-flight attention only
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    h, _ = forward_hidden(params, dcfg, tokens, pos, cache)
    return jnp.einsum("btm,mv->btv", h, train.head).astype(jnp.float32)


def kl_loss(z: Float[Array, "B T V2"], tid: Int[Array, "B T K"], tlogp: Float[Array, "B T K"],
            top1: Int[Array, "B T"], ids: Int[Array, " V2"]):  # fmt: skip
    """(mean KL over labelled positions, (sum KL, agreements, positions)). `tid` are teacher
    token ids mapped to draft-vocabulary columns (-1: not in it / no label); `top1` is the
    teacher's top-1 token id (-1: no label)."""
    logq = jax.nn.log_softmax(z, axis=-1)
    p = jnp.where(tid >= 0, jnp.exp(tlogp.astype(jnp.float32)), 0.0)
    mass = p.sum(-1)
    pn = p / jnp.maximum(mass, 1e-20)[..., None]
    lq = jnp.take_along_axis(logq, jnp.maximum(tid, 0), axis=-1)
    kl = jnp.sum(jnp.where(pn > 0, pn * (jnp.log(jnp.maximum(pn, 1e-30)) - lq), 0.0), axis=-1)
    labelled = top1 >= 0
    use = labelled & (mass > 0)
    n = jnp.maximum(use.sum(), 1)
    agree = (ids[jnp.argmax(z, axis=-1)] == top1) & labelled
    stats = (jnp.sum(jnp.where(use, kl, 0.0)), agree.sum(), labelled.sum())
    return jnp.sum(jnp.where(use, kl, 0.0)) / n, stats


@dataclasses.dataclass(frozen=True)
class Batches:
    """Length-sorted fixed batches (see module docstring)."""

    order: np.ndarray  # sequence indices sorted by length
    batch_size: int
    seed: int

    @property
    def count(self) -> int:
        return max(1, len(self.order) // self.batch_size)

    def at(self, step: int) -> np.ndarray:
        epoch, j = divmod(step, self.count)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.count)
        b = perm[j]
        return self.order[b * self.batch_size : (b + 1) * self.batch_size]


def make_arrays(data: TeacherData, ids: np.ndarray, vocab_size: int):
    """(tokens, mapped teacher ids, teacher log-probs, teacher top-1) as numpy arrays."""
    col = np.full(vocab_size, -1, np.int32)
    col[ids] = np.arange(len(ids), dtype=np.int32)
    mapped = np.where(data.ids >= 0, col[np.maximum(data.ids, 0)], -1)
    return data.tokens, mapped, data.logp, data.ids[..., 0]


def _slice(arrays, idx: np.ndarray, lengths: np.ndarray):
    T = int(-(-lengths[idx].max() // PAD_TO) * PAD_TO)
    T = min(T, arrays[0].shape[1])
    return tuple(jnp.asarray(a[idx, :T]) for a in arrays)


def optimizer(cfg: DistillConfig) -> optax.GradientTransformation:
    """AdamW, linear warm-up then cosine decay to lr / 10, global-norm clipping at 1."""
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, max(cfg.steps, 2),
                                               cfg.lr * 0.1)  # fmt: skip
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))


@functools.partial(jax.jit, static_argnames=("dcfg", "cfg"), donate_argnums=(0, 1))
def train_step(train: Trainable, opt_state, embed, ids, tokens, tid, tlogp, top1, *,
               dcfg: ModelConfig, cfg: DistillConfig):  # fmt: skip
    """One optax step on one batch; returns (train, opt_state, (sum KL, agreements, labels))."""

    def loss(t):
        return kl_loss(draft_scores(t, embed, dcfg, tokens), tid, tlogp, top1, ids)

    (_, stats), g = jax.value_and_grad(loss, has_aux=True)(train)
    upd, opt_state = optimizer(cfg).update(g, opt_state, train)
    return optax.apply_updates(train, upd), opt_state, stats


@dataclasses.dataclass
class TrainResult:
    dcfg: ModelConfig
    train: Trainable
    embed: jax.Array
    ids: np.ndarray
    steps: int
    seconds: float  # training wall time of this call (compile included)
    history: list  # (step, mean KL, agreement) of the logged intervals


def train(target_params: Params, target_cfg: ModelConfig, data: TeacherData, ids: np.ndarray,
          cfg: DistillConfig, work: Path, *, progress: bool = True, log_every: int = 20,
          stop_after: int | None = None) -> TrainResult:  # fmt: skip
    """Train (or resume training) the draft; `stop_after` ends the call after that many steps
    of THIS call (a simulated interruption, for tests). See module docstring."""
    from tqdm import tqdm

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    run_cfg = work / "train_config.json"
    if run_cfg.is_file():
        check_resume(run_cfg, cfg, tuple(f.name for f in dataclasses.fields(cfg)
                                         if f.name not in ("steps",) + TEACHER_FIELDS))  # fmt: skip
    run_cfg.write_text(json.dumps(cfg.to_dict(), indent=1))
    if len(data.length) < cfg.batch_size:
        raise ConfigError(f"distill: {len(data.length)} teacher sequences are fewer than "
                          f"batch_size={cfg.batch_size}")  # fmt: skip
    dcfg, trainable, embed = init_draft(target_params, target_cfg, cfg.layers, ids)
    opt_state = optimizer(cfg).init(trainable)
    ids_j = jnp.asarray(ids)
    mgr = ocp.CheckpointManager(
        (work / "ckpt").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
    )
    start = mgr.latest_step() or 0
    if start:
        restored = mgr.restore(start, args=ocp.args.StandardRestore(
            {"train": trainable, "opt": opt_state}))  # fmt: skip
        trainable, opt_state = restored["train"], restored["opt"]
    arrays = make_arrays(data, ids, target_cfg.vocab_size)
    batches = Batches(np.argsort(data.length, kind="stable"), cfg.batch_size, cfg.seed)
    t0 = time.perf_counter()
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    history, acc = [], np.zeros(3)
    bar = tqdm(total=cfg.steps, initial=start, desc="distill", unit="step", disable=not progress)
    for s in range(start, end):
        idx = batches.at(s)
        trainable, opt_state, stats = train_step(trainable, opt_state, embed, ids_j,
                                                 *_slice(arrays, idx, data.length),
                                                 dcfg=dcfg, cfg=cfg)  # fmt: skip
        acc += np.asarray([float(x) for x in stats])
        done = s + 1
        if done % log_every == 0 or done == end:
            kl, agree = acc[0] / max(acc[2], 1), acc[1] / max(acc[2], 1)
            history.append((done, float(kl), float(agree)))
            bar.set_postfix(kl=f"{kl:.3f}", agree=f"{agree:.3f}")
            acc[:] = 0
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            mgr.save(done, args=ocp.args.StandardSave({"train": trainable, "opt": opt_state}))
        bar.update(1)
    bar.close()
    mgr.wait_until_finished()
    mgr.close()
    with open(work / "train_log.jsonl", "a", encoding="utf-8") as f:
        for h in history:
            f.write(json.dumps({"step": h[0], "kl": h[1], "agree": h[2]}) + "\n")
    return TrainResult(dcfg, trainable, embed, ids, end, time.perf_counter() - t0, history)


def export_params(res: TrainResult) -> Params:
    """A normal full-vocabulary jaxspec `Params` of the trained draft: the target's embedding,
    the trained layers and norm, and an untied head whose draft-vocabulary columns are the trained
    head and whose other columns are zero."""
    M = res.train.head.shape[0]
    V = res.dcfg.vocab_size
    head = jnp.zeros((M, V), res.train.head.dtype).at[:, jnp.asarray(res.ids)].set(res.train.head)
    return Params(embed=res.embed, layers=res.train.layers, final_norm=res.train.final_norm,
                  lm_head=head)  # fmt: skip
