"""The SSSD datastore: lookups and continuations equal a brute-force scan of the corpus (small
vocabularies, so keys repeat a lot; documents shorter than the key), the empty datastore, the
on-disk round trip, every bad datastore's message, corpus reading and the `datastore` CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.cli import main
from jaxspec.drafting.datastore import (
    KEY_LENGTH,
    PAD,
    Datastore,
    build_arrays,
    build_datastore,
    continuations,
    load_datastore,
    load_datastore_np,
    lookup_interval,
    lookup_interval_np,
    read_corpus,
)
from jaxspec.errors import CheckpointError, InputError

N_TOKENS, BATCH = 150, 200  # every random corpus has the same shapes: one compile per m


def random_docs(seed):
    """A vocabulary of 5-7 tokens and 12 documents (lengths 0, 1, 2, 3 and 8 random ones)."""
    rng = np.random.default_rng(seed)
    V = int(rng.integers(5, 8))
    lengths = [0, 1, 2, 3, *rng.multinomial(N_TOKENS - 6, [1 / 8] * 8)]
    rng.shuffle(lengths)
    return V, [rng.integers(0, V, size=n).tolist() for n in lengths]


def brute_matches(tokens, q):
    m = len(q)
    return [
        p
        for p in range(len(tokens) - m + 1)
        if tokens[p] != -1 and tokens[p : p + m].tolist() == list(q)
    ]


def queries_for(tokens, V, m, rng):
    """Every m-gram of the corpus, random ones, then rows of -1 ("no query") up to BATCH."""
    seen = {tuple(tokens[p : p + m].tolist()) for p in range(len(tokens) - m + 1)}
    qs = sorted(q for q in seen if min(q) >= 0)
    qs += [tuple(rng.integers(0, V + 1, size=m).tolist()) for _ in range(20)]  # V: never seen
    assert len(qs) <= BATCH
    return np.asarray(qs + [(-1,) * m] * (BATCH - len(qs)), np.int32)


def key_of(tokens, p):
    return tuple(tokens[p : p + KEY_LENGTH].tolist())


@pytest.mark.parametrize("seed", range(8))
def test_index_layout(seed):
    _, docs = random_docs(seed)
    tokens, index = build_arrays(docs)
    n = sum(map(len, docs))
    assert tokens.dtype == index.dtype == np.int32
    assert len(tokens) == n + len(docs) + PAD and np.all(tokens[-PAD:] == -1)
    assert np.array_equal(tokens[tokens != -1], np.concatenate([np.asarray(d) for d in docs]))
    assert sorted(index.tolist()) == np.flatnonzero(tokens != -1).tolist()
    pairs = [(key_of(tokens, p), p) for p in index.tolist()]
    assert pairs == sorted(pairs)  # -1 sorts first; ties by position


@pytest.mark.parametrize("seed", range(8))
def test_lookup_and_continuations_equal_brute_force(seed):
    V, docs = random_docs(seed)
    tokens, index = build_arrays(docs)
    ds = Datastore.from_arrays(tokens, index)
    rng = np.random.default_rng(100 + seed)
    num, length = 3, 6
    for m in range(1, KEY_LENGTH + 1):
        qs = queries_for(tokens, V, m, rng)
        lo, hi = jax.device_get(lookup_interval(ds, jnp.asarray(qs)))
        cont, valid = jax.device_get(
            continuations(ds, jnp.asarray(lo), jnp.asarray(hi), m, num, length)
        )
        for b, q in enumerate(qs.tolist()):
            if q[0] < 0:
                assert lo[b] == hi[b] == 0 and not valid[b].any()
                continue
            want = brute_matches(tokens, q)
            assert lookup_interval_np(tokens, index, q) == (lo[b], hi[b])
            assert sorted(index[lo[b] : hi[b]].tolist()) == want, (m, q)
            count = hi[b] - lo[b]
            k = min(num, count)
            for i in range(num):
                if i >= k:
                    assert not valid[b, i].any() and not cont[b, i].any()
                    continue
                p = index[lo[b] + (i * count) // k]
                after = tokens[p + m : p + m + length].tolist()
                expect = after[: after.index(-1)] if -1 in after else after
                assert valid[b, i].tolist() == [j < len(expect) for j in range(length)]
                assert cont[b, i, : len(expect)].tolist() == expect
                assert not cont[b, i, len(expect) :].any()
            if count >= num:  # distinct, evenly spread matches
                assert len({lo[b] + (i * count) // num for i in range(num)}) == num


def test_no_query_rows_and_empty_datastore():
    tokens, index = build_arrays([[1, 2, 3, 1, 2]])
    ds = Datastore.from_arrays(tokens, index)
    lo, hi = lookup_interval(ds, jnp.asarray([[1, 2], [-1, 2], [1, -1]]))
    assert lo.tolist() == [0, 0, 0] and hi.tolist() == [2, 0, 0]
    assert lookup_interval_np(tokens, index, [1, -1]) == (0, 0)
    empty = Datastore.empty()
    for ds_ in (empty, Datastore.from_arrays(*build_arrays([[], []]))):
        for m in range(1, KEY_LENGTH + 1):
            q = jnp.asarray(np.random.default_rng(m).integers(0, 9, size=(5, m)), jnp.int32)
            lo, hi = lookup_interval(ds_, q)
            assert jnp.all(lo == hi)
            _, valid = continuations(ds_, lo, hi, m, 4, 8)
            assert not valid.any()
    assert lookup_interval_np(np.asarray(empty.tokens), np.asarray(empty.index), [0, 1]) == (1, 1)


class FakeTokenizer:
    """Characters 'a'.. as ids 0..; what build_datastore needs."""

    vocab_size = 6
    source = "fake"

    def encode_batch(self, texts):
        return [[ord(c) - ord("a") for c in t] for t in texts]


TEXTS = ["abcab", "", "ab", "fedcbafedcba", "c"]


def test_build_load_round_trip(tmp_path):
    out = tmp_path / "ds"
    meta = build_datastore(
        TEXTS, out, FakeTokenizer(), corpus_names=["x"], command="t", progress=False
    )
    assert meta["num_tokens"] == sum(map(len, TEXTS)) and meta["num_documents"] == len(TEXTS)
    assert meta["vocab_size"] == 6 and meta["tokenizer"] == "fake" and meta["corpus"] == ["x"]
    ds, meta2 = load_datastore(out, expected_vocab=6)
    assert meta2 == meta == json.loads((out / "meta.json").read_text())
    tokens, index = build_arrays(FakeTokenizer().encode_batch(TEXTS))
    assert np.array_equal(ds.tokens, tokens) and np.array_equal(ds.index, index)
    t_np, i_np, _ = load_datastore_np(out)
    assert isinstance(t_np, np.memmap) and np.array_equal(i_np, index)
    lo, hi = jax.jit(lookup_interval)(ds, jnp.asarray([[0, 1]]))  # a pytree argument
    assert int(hi[0] - lo[0]) == 3
    # replacing: only with overwrite; never a non-datastore directory
    with pytest.raises(InputError, match="--overwrite"):
        build_datastore(["ab"], out, FakeTokenizer(), progress=False)
    build_datastore(["ab"], out, FakeTokenizer(), overwrite=True, progress=False)
    assert load_datastore(out)[1]["num_tokens"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary directories left
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(InputError, match=f"{other} exists and is not a jaxspec datastore"):
        build_datastore(["ab"], other, FakeTokenizer(), overwrite=True, progress=False)
    with pytest.raises(InputError, match="no tokens"):
        build_datastore(["", ""], tmp_path / "e", FakeTokenizer(), progress=False)
    with pytest.raises(InputError, match="outside its vocabulary"):
        build_datastore(["az"], tmp_path / "e", FakeTokenizer(), progress=False)


def _edit_meta(path, **kv):
    meta = json.loads((path / "meta.json").read_text())
    meta.update(kv)
    (path / "meta.json").write_text(json.dumps(meta))


def test_bad_datastores(tmp_path):
    good = tmp_path / "good"
    build_datastore(TEXTS, good, FakeTokenizer(), progress=False)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope'}: no such datastore"):
        load_datastore(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="built with a tokenizer of 6 tokens"):
        load_datastore(good, expected_vocab=49152)

    def broken(name, fix):
        d = tmp_path / name
        build_datastore(TEXTS, d, FakeTokenizer(), progress=False)
        fix(d)
        return d

    cases = [
        ("nometa", lambda d: (d / "meta.json").unlink(), "no meta.json"),
        ("corrupt", lambda d: (d / "meta.json").write_text("{oops"), "meta.json: cannot read"),
        ("format", lambda d: _edit_meta(d, format="other"), "format is 'other'"),
        ("version", lambda d: _edit_meta(d, version=7), "version 7 is not supported"),
        ("notokens", lambda d: (d / "tokens.npy").unlink(), "tokens.npy is missing"),
        ("noindex", lambda d: (d / "index.npy").unlink(), "index.npy is missing"),
        ("shape", lambda d: _edit_meta(d, num_tokens=3), "shapes do not match"),
        ("junk", lambda d: (d / "index.npy").write_bytes(b"junk"), "index.npy: cannot read"),
        ("key", lambda d: _edit_meta(d, num_documents="x"), "'num_documents' must be"),
    ]
    for name, fix, needle in cases:
        d = broken(name, fix)
        with pytest.raises(CheckpointError, match=needle) as e:
            load_datastore(d)
        assert str(d) in str(e.value)
    with pytest.raises(
        CheckpointError, match=r"supported: 1\); rebuild it with `jaxspec datastore"
    ):
        load_datastore(tmp_path / "version")


def test_read_corpus(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "one"}\n\n{"text": "two", "body": "b"}\n')
    assert [t for _, t in read_corpus([f])] == ["one", "two"]
    f.write_text('{"body": "b"}\n')
    assert [(n, t) for n, t in read_corpus([f], field="body")] == [(f"{f}:1", "b")]
    with pytest.raises(InputError, match=f"{f}:1: expected an object with a string 'text'"):
        list(read_corpus([f]))
    f.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(InputError, match=f"{f}:2: not valid JSON"):
        list(read_corpus([f]))
    with pytest.raises(InputError, match="/no/such/dir: no such corpus"):
        read_corpus([f, "/no/such/dir"])  # checked before anything is read
    d = tmp_path / "src"
    for rel in ("b.py", "a.md", "z.bin", "pkg/c.txt", "pkg/test/t.py", "test/u.py", "pkg/x.py"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(rel)
    (d / "bad.py").write_bytes(b"\xff\xfe")
    with pytest.warns(UserWarning, match="bad.py: not UTF-8"):
        docs = list(read_corpus([d], exclude=["test", "x.*"]))
    assert [t for _, t in docs] == ["a.md", "b.py", "pkg/c.txt"]
    assert [t for _, t in read_corpus([d / "z.bin"])] == ["z.bin"]


def byte_tokenizer_dir(path):
    """A tiny byte-level tokenizer.json (256 tokens, one per byte)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    return path


def test_cli_build_and_info(tmp_path, capsys):
    tok = byte_tokenizer_dir(tmp_path / "tok")
    src = tmp_path / "src"
    (src / "tests").mkdir(parents=True)
    (src / "a.py").write_text("def f(x):\n    return x + 1\n")
    (src / "b.py").write_text("import os\nprint(os.sep)\n")
    (src / "tests" / "t.py").write_text("skipped")
    out = tmp_path / "ds"
    argv = ["datastore", "build", "--corpus", str(src), "--out", str(out), "--model", str(tok)]
    assert main([*argv, "--exclude", "tests"]) == 0
    stdout = capsys.readouterr().out
    n = len((src / "a.py").read_bytes()) + len((src / "b.py").read_bytes())
    assert stdout.startswith(f"wrote {out}: {n} tokens, 2 documents,") and "MiB" in stdout
    assert main(["datastore", "info", str(out)]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["num_tokens"] == n and meta["vocab_size"] == 256 and meta["corpus"] == [str(src)]
    assert meta["command"].startswith("jaxspec datastore build --corpus")
    assert meta["tokenizer"] == str(tok.resolve())
    for bad, needle in [
        (argv, "--overwrite"),
        (["datastore", "info", str(tmp_path / "none")], str(tmp_path / "none")),
        ([*argv[:-1], str(tmp_path / "nomodel"), "--overwrite"], str(tmp_path / "nomodel")),
        (["datastore", "build", "--corpus", "/no/such.jsonl", "--out", str(out)], "/no/such.jsonl"),
    ]:
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and "Traceback" not in err
    assert main([*argv, "--overwrite"]) == 0


def test_cli_help():
    for argv in (["datastore", "--help"], ["datastore", "build", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
