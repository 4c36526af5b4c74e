"""Teacher data: the target's own continuations with its top-k next-token log-probs.

`teacher_generate(params, cfg, prompts, lengths, temperature, key, *, new_tokens, topk, chunk)`
is one jitted program: the chunked prefill of `jaxspec.prefill` then a `lax.scan` of
`new_tokens` single-token target forwards (jaxspec's own model and KV cache). At every step it
records the target's top-k log-probabilities (of the full softmax, at temperature 1) BEFORE
drawing the token, so training needs no teacher forward pass: recording costs one `top_k` per
step, a second forward over the sequences would cost a full target forward per token.
Rows draw greedily (temperature 0) or at their own temperature. Rows run the whole scan; what
follows a row's first EOS is cut off when the shard is stored.

Shapes: prompts int32[B, P] (right-padded, P a multiple of `chunk`), lengths int32[B];
returns tokens int32[B, N], logp float32[B, N, k], ids int32[B, N, k] where row b's
distribution at step i is the target's p(· | prompt_b, tokens[b, :i]).

`generate_shards` runs a prompt list in shards of `batch` prompts and writes one
`shard-XXXXX.npz` per shard (atomically), skipping shards already on disk: an interrupted run
resumes where it stopped. `load_shards` reads them back as one `TeacherData` (ragged rows
packed into fixed-length arrays).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.config import ModelConfig
from jaxspec.errors import CheckpointError
from jaxspec.kv_cache import advance
from jaxspec.model import forward, lm_head
from jaxspec.model.params import Params
from jaxspec.prefill import is_eos, prefill_cache
from jaxspec.types import Array, Float, Int, PRNGKeyArray


@functools.partial(jax.jit, static_argnames=("cfg", "new_tokens", "topk", "chunk"))
def teacher_generate(
    params: Params,
    cfg: ModelConfig,
    prompts: Int[Array, "B P"],
    lengths: Int[Array, " B"],
    temperature: Float[Array, " B"],
    key: PRNGKeyArray,
    *,
    new_tokens: int,
    topk: int,
    chunk: int,
):
    B, P = prompts.shape
    cache, last_h = prefill_cache(params, cfg, prompts, lengths, slots=P + new_tokens, chunk=chunk)
    logits0 = lm_head(params, last_h[:, None])[:, 0]
    temp = jnp.where(temperature > 0, temperature, 1.0)[:, None]

    def step(carry, k):
        cache, logits = carry
        logp = jax.nn.log_softmax(logits, axis=-1)
        vals, idx = jax.lax.top_k(logp, topk)
        drawn = jax.random.categorical(k, logits / temp, axis=-1)
        tok = jnp.where(temperature > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
        nxt, cache = forward(params, cfg, tok[:, None], cache.lengths[:, None], cache)
        return (advance(cache, jnp.ones((B,), jnp.int32)), nxt[:, 0]), (tok, vals, idx)

    keys = jax.random.split(key, new_tokens)
    _, (toks, vals, idx) = jax.lax.scan(step, (cache, logits0), keys)
    return toks.T, vals.transpose(1, 0, 2), idx.transpose(1, 0, 2).astype(jnp.int32)


def cut_at_eos(tokens: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Per row, the number of tokens up to and including the first EOS (all if none)."""
    eos = np.asarray(is_eos(jnp.asarray(tokens), cfg))
    n = tokens.shape[1]
    return np.where(eos.any(1), eos.argmax(1) + 1, n).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class TeacherData:
    """Packed sequences: tokens[i, :length[i]] = prompt ⊕ continuation (right-padded with 0);
    the teacher's top-k at sequence position t (predicting token t + 1) is logp/ids[i, t] for
    t in [prompt_len[i] - 1, length[i] - 1), elsewhere ids = -1."""

    tokens: np.ndarray  # int32 [N, T]
    length: np.ndarray  # int32 [N]
    prompt_len: np.ndarray  # int32 [N]
    logp: np.ndarray  # float16 [N, T, k]
    ids: np.ndarray  # int32 [N, T, k]

    @property
    def num_target_tokens(self) -> int:
        """Continuation tokens (teacher-labelled positions)."""
        return int((self.length - self.prompt_len).sum())


def _bucket(n: int, chunk: int) -> int:
    return max(chunk, -(-n // chunk) * chunk)


def generate_shards(
    params: Params,
    cfg: ModelConfig,
    prompt_ids: list[list[int]],
    out_dir: Path,
    *,
    batch: int,
    new_tokens: int,
    topk: int,
    temperatures: tuple[float, ...],
    seed: int,
    chunk: int = 32,
    progress: bool = True,
) -> list[Path]:
    """Generate every shard not yet on disk (see module docstring); returns all shard paths.
    Row r of the corpus draws at temperatures[r % len(temperatures)]."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(prompt_ids) // batch)
    paths = [out_dir / f"shard-{s:05d}.npz" for s in range(n_shards)]
    todo = [s for s in range(n_shards) if not paths[s].is_file()]
    bar = tqdm(total=n_shards, initial=n_shards - len(todo), desc="teacher", unit="shard",
               disable=not progress)  # fmt: skip
    for s in todo:
        rows = list(range(s * batch, min((s + 1) * batch, len(prompt_ids))))
        P = _bucket(max(len(prompt_ids[r]) for r in rows), chunk)
        arr = np.zeros((batch, P), np.int32)
        lens = np.zeros((batch,), np.int32)
        temps = np.zeros((batch,), np.float32)
        for i, r in enumerate(rows):
            arr[i, : len(prompt_ids[r])], lens[i] = prompt_ids[r], len(prompt_ids[r])
            temps[i] = temperatures[r % len(temperatures)]
        key = jax.random.fold_in(jax.random.key(seed), s)
        toks, vals, idx = teacher_generate(
            params, cfg, jnp.asarray(arr), jnp.asarray(lens), jnp.asarray(temps), key,
            new_tokens=new_tokens, topk=topk, chunk=chunk,
        )  # fmt: skip
        toks, vals, idx = np.asarray(toks), np.asarray(vals), np.asarray(idx)
        n = len(rows)
        keep = cut_at_eos(toks[:n], cfg)
        tmp = paths[s].with_name(f".tmp-{os.getpid()}-{paths[s].name}")
        with open(tmp, "wb") as f:
            np.savez(f, prompts=arr[:n], prompt_len=lens[:n], tokens=toks[:n], n_new=keep,
                     logp=vals[:n].astype(np.float16), ids=idx[:n])  # fmt: skip
        tmp.replace(paths[s])
        bar.update(1)
    bar.close()
    return paths


def load_shards(paths: list[Path], max_len: int | None = None) -> TeacherData:
    """Pack stored shards into `TeacherData` (T = the longest sequence, or `max_len`: longer
    sequences lose their tail)."""
    parts = []
    for p in paths:
        try:
            with np.load(p) as z:
                parts.append({k: z[k] for k in z.files})
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(
                f"{p}: unreadable teacher shard ({e}); delete it to regenerate"
            ) from None
    seqs, plens, lps, ids = [], [], [], []
    for z in parts:
        for i in range(len(z["prompt_len"])):
            pl, nn = int(z["prompt_len"][i]), int(z["n_new"][i])
            seqs.append(np.concatenate([z["prompts"][i, :pl], z["tokens"][i, :nn]]))
            plens.append(pl)
            lps.append(z["logp"][i, :nn])
            ids.append(z["ids"][i, :nn])
    if not seqs:
        raise CheckpointError("no teacher shards to load")
    T = max(len(s) for s in seqs) if max_len is None else max_len
    k = ids[0].shape[-1]
    N = len(seqs)
    tokens = np.zeros((N, T), np.int32)
    length = np.zeros((N,), np.int32)
    logp = np.zeros((N, T, k), np.float16)
    tid = np.full((N, T, k), -1, np.int32)
    for i, (s, pl, lp, ix) in enumerate(zip(seqs, plens, lps, ids, strict=True)):
        L = min(len(s), T)
        tokens[i, :L], length[i] = s[:L], L
        # position t = pl - 1 + j predicts continuation token j
        j = np.arange(len(lp))
        pos = pl - 1 + j
        ok = pos < L - 1
        logp[i, pos[ok]], tid[i, pos[ok]] = lp[ok], ix[ok]
    return TeacherData(tokens, length, np.asarray(plens, np.int32), logp, tid)
