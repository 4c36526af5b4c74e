"""`scripts/batch_infer.py` on SmolLM2 in a fresh process with 2 simulated CPU devices (mesh
data=2): SSSD's greedy outputs equal single-device AR's, every request gets its metrics, a rerun
skips the ids already written and appends only new ones, and bad input is one clear error."""

import json
import os
import subprocess
import sys
from pathlib import Path

from jaxspec.runner import GenerateOptions, Runner

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "batch_infer.py"
PROMPTS = {"a": "Name three colors.", "b": "What is 2 + 2?", "c": "Say hello in French."}


def infer(tmp_path, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2")
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--input", str(tmp_path / "req.jsonl"), "--output",
         str(tmp_path / "out.jsonl"), "--mesh", "2,1", "--batch-size", "2",
         "--max-new-tokens", "6", *extra],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip


def write_requests(tmp_path, ids):
    (tmp_path / "req.jsonl").write_text(
        "".join(json.dumps({"id": i, "prompt": PROMPTS[i]}) + "\n" for i in ids)
    )


def test_batch_infer_sharded_resumable(smollm2, tmp_path):
    ids = {k: smollm2.tokenizer.encode(t) for k, t in PROMPTS.items()}
    runner = Runner(smollm2.params, smollm2.cfg)
    want, _ = runner.run(list(ids.values()), GenerateOptions(max_new_tokens=6))
    want = dict(zip(ids, want, strict=True))
    write_requests(tmp_path, ["a", "b"])
    proc = infer(tmp_path, "--method", "sssd")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'data': 2" in proc.stderr
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    for r in rows:
        assert r["token_ids"] == want[r["id"]], r["id"]  # greedy SSSD == AR, sharded
        m = r["metrics"]
        assert m["new_tokens"] == len(r["token_ids"]) and m["prompt_tokens"] == len(ids[r["id"]])
        assert m["steps"] >= 1 and m["tau"] >= 1.0 and m["batch_size"] == 2
    first = (tmp_path / "out.jsonl").read_text()
    write_requests(tmp_path, ["a", "b", "c"])
    proc = infer(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 requests, 2 already done" in proc.stderr
    text = (tmp_path / "out.jsonl").read_text()
    assert text.startswith(first)  # earlier results untouched
    rows = [json.loads(x) for x in text.splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert rows[2]["token_ids"] == want["c"]


def test_batch_infer_bad_input(tmp_path):
    (tmp_path / "req.jsonl").write_text('{"id": 1, "prompt": "x"}\n{"id": 1, "prompt": "y"}\n')
    proc = infer(tmp_path)
    assert proc.returncode == 2 and "id '1' appears twice" in proc.stderr
    assert "Traceback" not in proc.stderr
    write_requests(tmp_path, ["a"])
    proc = infer(tmp_path, "--mesh", "3")
    assert proc.returncode == 2 and "--mesh must be DATA,MODEL" in proc.stderr
    proc = infer(tmp_path, "--mesh", "4,1")
    assert proc.returncode == 2 and "but 2 are given" in proc.stderr
