"""The SSSD token datastore: a tokenized corpus plus an index of its positions sorted by the
KEY = 4 tokens that start there, so the corpus positions whose next m <= 4 tokens equal a query
form one contiguous interval of the index (found by binary search); the draft continuations are
read from the token array right after each match.

On-disk format (a directory, version 1):

    meta.json   {"format": "jaxspec-datastore", "version": 1, "key_length": 4, "vocab_size": V,
                 "num_tokens": n, "num_documents": d, "tokenizer": ..., "corpus": [...],
                 "command": ..., "created": ISO date}
    tokens.npy  int32[n + d + PAD]: the documents concatenated, each followed by one separator
                -1, then PAD = KEY + MAX_CONTINUATION (= 20) more -1, so `tokens[p : p + KEY + L]`
                stays in range for every indexed p and L <= MAX_CONTINUATION.
    index.npy   int32[n]: every real-token position p (tokens[p] != -1), sorted lexicographically
                by (tokens[p], ..., tokens[p + 3]) with -1 sorting before every real token, ties
                by p ascending (a stable `np.lexsort`).

Conventions:
* Queries are token ids >= 0, so a key never matches across a separator or into the padding.
  A query row holding any entry < 0 means "no query" and gets the empty interval (0, 0).
* An interval (lo, hi) is half-open over index positions: the matches are index[lo:hi].
* The host side (`load_datastore_np`, `lookup_interval_np`) reads the .npy files memory-mapped;
  `Datastore` holds the same arrays on the device and is a pytree, so it passes into jitted
  functions; `lookup_interval` and `continuations` are jitted and batched over rows B.
* `build_datastore` writes atomically: a temporary sibling directory renamed into place.
* Bad corpus paths or output directories raise `InputError`; a missing, corrupt, outdated or
  mismatched datastore raises `CheckpointError`; both name the file, key or value at fault.
"""

from __future__ import annotations

import datetime
import fnmatch
import functools
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from tqdm import tqdm

from jaxspec.errors import CheckpointError, InputError
from jaxspec.fsutil import apply_umask, iter_jsonl, move_into_place
from jaxspec.types import Array, Bool, Int

FORMAT = "jaxspec-datastore"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
KEY_LENGTH = 4
MAX_CONTINUATION = 16
PAD = KEY_LENGTH + MAX_CONTINUATION  # -1 entries after the last document
SEPARATOR = -1
CORPUS_SUFFIXES = (".py", ".txt", ".md")
_BATCH_DOCS = 256  # documents per tokenizer batch
_BATCH_CHARS = 8_000_000  # ... or fewer, once this many characters are gathered


# ----------------------------------------------------------------------------------------------
# Building


def build_arrays(documents: Iterable[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, index) of token-id documents, laid out as `tokens.npy` / `index.npy` are."""
    parts = []
    for doc in documents:
        parts.append(np.asarray(doc, np.int32).reshape(-1))
        parts.append(np.full(1, SEPARATOR, np.int32))
    parts.append(np.full(PAD, SEPARATOR, np.int32))
    tokens = np.concatenate(parts)
    return tokens, _sort_index(tokens)


def _sort_index(tokens: np.ndarray) -> np.ndarray:
    pos = np.flatnonzero(tokens != SEPARATOR).astype(np.int32)
    # np.lexsort: the last key is the primary one; stable, and `pos` is ascending
    order = np.lexsort(tuple(tokens[pos + j] for j in reversed(range(KEY_LENGTH))))
    return pos[order]


def build_datastore(
    texts: Iterable[str],
    out_dir: str | os.PathLike[str],
    tokenizer: Any,
    *,
    corpus_names: Sequence[str] = (),
    vocab_size: int | None = None,
    tokenizer_name: str | None = None,
    command: str = "",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize `texts` (one document each) and write a datastore directory `out_dir`; return
    its meta.

    `tokenizer` needs `encode_batch(list[str]) -> list[list[int]]` (raw text, no special
    tokens: `jaxspec.tokenizer.Tokenizer` has it); `vocab_size` defaults to its `vocab_size`,
    and `tokenizer_name` (recorded in the meta) to its `source`. An existing datastore at
    `out_dir` is replaced only with `overwrite`; any other existing non-empty path is refused.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    if vocab_size is None:
        vocab_size = getattr(tokenizer, "vocab_size", None)
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise InputError(f"vocab_size must be a positive integer, got {vocab_size!r}")

    parts: list[np.ndarray] = []
    num_docs = 0
    batch: list[str] = []
    chars = 0

    def flush():
        for ids in tokenizer.encode_batch(batch):
            parts.append(np.asarray(ids, np.int32).reshape(-1))
            parts.append(np.full(1, SEPARATOR, np.int32))
        batch.clear()

    for text in tqdm(texts, desc="Tokenizing", unit="doc", disable=not progress):
        batch.append(text)
        chars += len(text)
        num_docs += 1
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            flush()
            chars = 0
    flush()
    parts.append(np.full(PAD, SEPARATOR, np.int32))
    tokens = np.concatenate(parts)
    parts.clear()
    if tokens.size >= 2**31:
        raise InputError(f"corpus too large: {tokens.size} tokens do not fit int32 positions")
    real = tokens[tokens != SEPARATOR]
    if real.size == 0:
        raise InputError(f"corpus {list(corpus_names)} has no tokens (no documents, or all empty)")
    if real.min() < 0 or real.max() >= vocab_size:
        bad = int(real.min() if real.min() < 0 else real.max())
        raise InputError(
            f"the tokenizer produced id {bad}, outside its vocabulary [0, {vocab_size})"
        )
    index = _sort_index(tokens)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "key_length": KEY_LENGTH,
        "vocab_size": vocab_size,
        "num_tokens": int(real.size),
        "num_documents": num_docs,
        "tokenizer": tokenizer_name or str(getattr(tokenizer, "source", type(tokenizer).__name__)),
        "corpus": [str(c) for c in corpus_names],
        "command": command,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    _write(out_dir, tokens, index, meta)
    return meta


def _is_datastore(path: Path) -> bool:
    try:
        return json.loads((path / "meta.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return
    if not _is_datastore(out_dir):
        raise InputError(f"{out_dir} exists and is not a jaxspec datastore; refusing to replace it")
    if not overwrite:
        raise InputError(f"{out_dir}: a datastore already exists there (pass --overwrite)")


def _write(out_dir: Path, tokens: np.ndarray, index: np.ndarray, meta: dict) -> None:
    out_dir = out_dir.absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        np.save(tmp / "tokens.npy", tokens)
        np.save(tmp / "index.npy", index)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        apply_umask(tmp)  # mkdtemp made it 0700
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def disk_size(path: str | os.PathLike[str]) -> int:
    """Bytes taken by the files of a datastore directory."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


# ----------------------------------------------------------------------------------------------
# Corpus files


def read_corpus(
    paths: Iterable[str | os.PathLike[str]],
    *,
    field: str = "text",
    exclude: Sequence[str] = (),
) -> Iterator[tuple[str, str]]:
    """(name, text) per document of the corpus `paths` (checked to exist before anything is read):

    * a `.jsonl` file: one document per non-blank line, its string field `field`;
    * a directory: every `*.py`, `*.txt`, `*.md` file below it, in sorted order, skipping any
      file or directory whose name, or path relative to the directory, matches a glob in
      `exclude` (e.g. "test", "site-packages", "*/data/*"); files that are not UTF-8 are skipped
      with a warning;
    * any other file: its whole text, one document.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("no corpus paths given")
    for p in paths:
        if not p.exists():
            raise InputError(f"{p}: no such corpus file or directory")
    return _iter_corpus(paths, field, tuple(exclude))


def _iter_corpus(paths: list[Path], field: str, exclude: tuple[str, ...]):
    for p in paths:
        if p.is_dir():
            for f in _walk(p, exclude):
                try:
                    text = f.read_text(encoding="utf-8")
                except UnicodeDecodeError:
                    warnings.warn(f"{f}: not UTF-8 text, skipped", stacklevel=2)
                    continue
                except OSError as e:
                    raise InputError(f"{f}: cannot read corpus file ({e})") from None
                yield str(f), text
        elif p.suffix == ".jsonl":
            yield from _read_jsonl(p, field)
        else:
            try:
                yield str(p), p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise InputError(f"{p}: cannot read corpus file ({e})") from None


def _excluded(name: str, rel: str, exclude: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, g) or fnmatch.fnmatch(rel, g) for g in exclude)


def _walk(root: Path, exclude: tuple[str, ...]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        rel = "" if rel == "." else rel + "/"
        dirnames[:] = sorted(d for d in dirnames if not _excluded(d, rel + d, exclude))
        for name in sorted(filenames):
            if name.endswith(CORPUS_SUFFIXES) and not _excluded(name, rel + name, exclude):
                yield Path(dirpath) / name


def _read_jsonl(path: Path, field: str) -> Iterator[tuple[str, str]]:
    for n, rec in iter_jsonl(path, "corpus file"):
        if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
            raise InputError(f"{path}:{n}: expected an object with a string {field!r}")
        yield f"{path}:{n}", rec[field]


# ----------------------------------------------------------------------------------------------
# Loading


@struct.dataclass
class Datastore:
    """The datastore's arrays on the device (a pytree: pass it into jitted functions)."""

    tokens: Int[Array, " n"]  # documents, -1 separators, -1 padding
    index: Int[Array, " m"]  # real-token positions sorted by their next KEY_LENGTH tokens

    @classmethod
    def from_arrays(cls, tokens, index) -> Datastore:
        tokens = np.asarray(tokens, np.int32)
        index = np.asarray(index, np.int32)
        if index.size == 0:
            return cls.empty()
        return cls(jnp.asarray(tokens), jnp.asarray(index))

    @classmethod
    def empty(cls) -> Datastore:
        """A datastore with no matches: all tokens are -1 and the one index entry points at one.
        Its key (-1, -1, -1, -1) sorts below every query (entries >= 0), so the lower and upper
        bounds of any query are both 1: every interval is [1, 1), and no continuation is valid.
        """
        return cls(jnp.full(PAD + 1, SEPARATOR, jnp.int32), jnp.zeros(1, jnp.int32))


def read_meta(path: str | os.PathLike[str]) -> dict:
    """The checked meta.json of a datastore directory."""
    path = Path(path)
    how = "build one with `jaxspec datastore build`"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such datastore directory ({how})")
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: no meta.json, not a jaxspec datastore ({how})")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_file}: cannot read datastore meta ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{meta_file}: format is {got!r}, not {FORMAT!r}")
    if meta.get("version") not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{meta_file}: datastore version {meta.get('version')!r} is not supported (supported: "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}); rebuild it with `jaxspec datastore build`"
        )
    for key in ("key_length", "vocab_size", "num_tokens", "num_documents"):
        if not isinstance(meta.get(key), int) or meta[key] < 0:
            raise CheckpointError(
                f"{meta_file}: {key!r} must be an integer >= 0, got {meta.get(key)!r}"
            )
    if meta["key_length"] != KEY_LENGTH:
        raise CheckpointError(
            f"{meta_file}: key_length {meta['key_length']} is not supported (only {KEY_LENGTH})"
        )
    return meta


def load_datastore_np(
    path: str | os.PathLike[str], expected_vocab: int | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(tokens, index, meta) with the arrays memory-mapped read-only on the host, checked against
    the meta (and against `expected_vocab`, the tokenizer's vocabulary size, when given)."""
    path = Path(path)
    meta = read_meta(path)
    if expected_vocab is not None and meta["vocab_size"] != expected_vocab:
        raise CheckpointError(
            f"{path}: built with a tokenizer of {meta['vocab_size']} tokens "
            f"({meta.get('tokenizer')!r}), but the model's has {expected_vocab}: rebuild it with "
            "the model's tokenizer (`jaxspec datastore build --model ...`)"
        )
    arrays = []
    for name in ("tokens", "index"):
        f = path / f"{name}.npy"
        if not f.is_file():
            raise CheckpointError(f"{path}: {f.name} is missing")
        try:
            a = np.load(f, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read ({e})") from None
        if a.dtype != np.int32 or a.ndim != 1:
            raise CheckpointError(f"{f}: expected a 1-D int32 array, got {a.dtype}{list(a.shape)}")
        arrays.append(a)
    tokens, index = arrays
    n, d = meta["num_tokens"], meta["num_documents"]
    if index.shape[0] != n or tokens.shape[0] < n + d + PAD:
        raise CheckpointError(
            f"{path}: shapes do not match meta.json (num_tokens {n}, num_documents {d}): "
            f"index has {index.shape[0]} entries (expected {n}), tokens {tokens.shape[0]} "
            f"(expected >= {n + d + PAD})"
        )
    return tokens, index, meta


def load_datastore(
    path: str | os.PathLike[str], expected_vocab: int | None = None
) -> tuple[Datastore, dict]:
    """(the datastore on the device, its meta); see `load_datastore_np` for the checks."""
    tokens, index, meta = load_datastore_np(path, expected_vocab)
    return Datastore.from_arrays(tokens, index), meta


# ----------------------------------------------------------------------------------------------
# Lookup


def _check_m(m: int) -> None:
    if not 1 <= m <= KEY_LENGTH:
        raise InputError(f"query length must be in 1..{KEY_LENGTH}, got {m}")


def lookup_interval_np(
    tokens: np.ndarray, index: np.ndarray, query: Sequence[int]
) -> tuple[int, int]:
    """Host reference: the index interval [lo, hi) of the positions whose next len(query) tokens
    equal `query` (a binary search; (0, 0) if any query entry is < 0)."""
    q = tuple(int(x) for x in query)
    m = len(q)
    _check_m(m)
    if min(q) < 0:
        return 0, 0

    def key(i):
        p = int(index[i])
        return tuple(int(x) for x in tokens[p : p + m])

    def bound(upper):
        lo, hi = 0, len(index)
        while lo < hi:
            mid = (lo + hi) // 2
            k = key(mid)
            if k < q or (upper and k == q):
                lo = mid + 1
            else:
                hi = mid
        return lo

    return bound(False), bound(True)


def _keys_at(ds: Datastore, at: Int[Array, " B"], m: int) -> Int[Array, "B m"]:
    p = ds.index[jnp.clip(at, 0, ds.index.shape[0] - 1)]
    return jnp.take(ds.tokens, p[:, None] + jnp.arange(m), mode="fill", fill_value=SEPARATOR)


@jax.jit
def lookup_interval(
    ds: Datastore, query: Int[Array, "B m"]
) -> tuple[Int[Array, " B"], Int[Array, " B"]]:
    """The index interval [lo, hi) per row of the positions whose next m tokens equal the row's
    query (m = query.shape[1], static, 1..4): a vectorised lower/upper-bound binary search over
    ceil(log2(len(index) + 1)) steps. A row with any entry < 0 gets (0, 0)."""
    B, m = query.shape
    _check_m(m)
    query = query.astype(jnp.int32)
    M = ds.index.shape[0]

    def compare(key):  # (key < query, key <= query), lexicographic over the m tokens
        lt = jnp.zeros(B, bool)
        eq = jnp.ones(B, bool)
        for j in range(m):
            lt = lt | (eq & (key[:, j] < query[:, j]))
            eq = eq & (key[:, j] == query[:, j])
        return lt, lt | eq

    def step(_, c):
        lo_l, hi_l, lo_u, hi_u = c
        mid_l, mid_u = (lo_l + hi_l) // 2, (lo_u + hi_u) // 2
        go_l = compare(_keys_at(ds, mid_l, m))[0]  # lower bound: first key >= query
        go_u = compare(_keys_at(ds, mid_u, m))[1]  # upper bound: first key > query
        act_l, act_u = lo_l < hi_l, lo_u < hi_u
        return (
            jnp.where(act_l & go_l, mid_l + 1, lo_l),
            jnp.where(act_l & ~go_l, mid_l, hi_l),
            jnp.where(act_u & go_u, mid_u + 1, lo_u),
            jnp.where(act_u & ~go_u, mid_u, hi_u),
        )

    zeros, full = jnp.zeros(B, jnp.int32), jnp.full(B, M, jnp.int32)
    lo, _, hi, _ = jax.lax.fori_loop(0, M.bit_length(), step, (zeros, full, zeros, full))
    ok = jnp.all(query >= 0, axis=1)
    return jnp.where(ok, lo, 0), jnp.where(ok, hi, 0)


@functools.partial(jax.jit, static_argnames=("m", "num", "length"))
def continuations(
    ds: Datastore, lo: Int[Array, " B"], hi: Int[Array, " B"], m: int, num: int, length: int
) -> tuple[Int[Array, "B num length"], Bool[Array, "B num length"]]:
    """The `length` tokens after up to `num` evenly spaced matches of [lo, hi), each match being
    m tokens long. With count = hi - lo and k = min(num, count), match i < k is index position
    lo + (i * count) // k: every match when count <= num, else num spread evenly (distinct, the
    first always included); slots i >= k (rows with fewer than `num` matches) are invalid. An
    entry is valid up to (not including) the first separator; invalid entries hold 0."""
    count = jnp.maximum(hi - lo, 0)[:, None]
    k = jnp.maximum(jnp.minimum(count, num), 1)
    i = jnp.arange(num)[None, :]
    at = lo[:, None] + i * (count // k) + (i * (count % k)) // k  # (i * count) // k, no overflow
    has = i < jnp.minimum(count, num)
    p = ds.index[jnp.clip(at, 0, ds.index.shape[0] - 1)]
    cont = jnp.take(
        ds.tokens, p[..., None] + m + jnp.arange(length), mode="fill", fill_value=SEPARATOR
    )
    valid = has[..., None] & (jnp.cumsum(cont == SEPARATOR, axis=-1) == 0)
    return jnp.where(valid, cont, 0), valid
