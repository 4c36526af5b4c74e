"""Sharding (`jaxspec.sharding`): sharded == unsharded tokens on 8 simulated CPU devices for AR,
a token tree with a separate draft, SSSD n-gram drafting and MagicDec (its compact draft cache
next to a target cache over `seq`), on the meshes (data, model) = (8,1),
(4,2), (2,4), (1,8), and for the tree with the KV sequence over `seq` (2,1,4); the KV cache
really is spread over the devices; a state placed by `shard_state` decodes to the same tokens
with the draft replicated; two processes give the same tokens; orbax restores into shardings;
meshes that do not fit give clear errors. The device count is fixed when JAX starts, so the
work runs in fresh processes (`*_worker.py`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec

from jaxspec import sharding
from jaxspec.errors import ConfigError

WORKER = Path(__file__).with_name("sharding_worker.py")


@pytest.fixture(scope="module")
def worker():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(WORKER.parent.parent))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True,
                          env=env, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


DM = ("8x1", "4x2", "2x4", "1x8")
MESHES = {"ar": DM, "sssd": DM, "tree": (*DM, "2x1x4"), "magicdec": ("4x2", "2x1x4", "1x2x4")}


@pytest.mark.parametrize("method", list(MESHES))
def test_sharded_equals_unsharded(worker, method):
    assert worker["devices"] == 8
    runs = worker["runs"][method]
    base = runs["unsharded"]
    assert sum(len(r) for r in base) > 8  # rows produced tokens (not a degenerate comparison)
    for mesh in MESHES[method]:
        assert runs[mesh] == base, f"{method} on mesh {mesh}"
        assert runs[f"{mesh}_cache_devices"] == 8, f"{method} on {mesh}: cache not spread"


def test_state_placed_by_shard_state_decodes_the_same(worker):
    """...with the target sharded by the rules and the draft replicated (different placements)."""
    assert worker["stepwise"]["placed_on"] == 8
    assert worker["stepwise"]["tokens"] == worker["runs"]["tree"]["unsharded"]


def test_orbax_restore_lands_in_the_target_shardings(worker):
    r = worker["restore"]
    assert r["equal"] and r["wqkv_devices"] == 8
    assert r["wqkv_spec"] == str(PartitionSpec(None, None, "model", None, None))
    assert r["embed_spec"] == str(PartitionSpec("model", None))


def test_meshes_that_do_not_fit_are_clear_errors(worker):
    e = worker["errors"]
    assert "= 6 devices, but 8 are given" in e["devices"]
    assert "'model' has 4 devices, which does not divide the KV heads (2)" in e["heads"]
    assert "'data' has 8 devices, which does not divide the batch (6)" in e["batch"]
    assert "'pixels' has no sharding rule" in e["rule"]


def test_rules_map_logical_names():
    """The rules table in one place: batch over data, heads/KV heads/MLP/vocab over model, the
    KV sequence over seq, the rest replicated."""
    assert sharding.logical_to_pspec(("layers", "batch", "kv_heads", "kv_seq", None)) == (
        PartitionSpec(None, "data", "model", "seq", None)
    )
    assert sharding.logical_to_pspec(("vocab", "embed")) == PartitionSpec("model", None)
    with pytest.raises(ConfigError, match="no sharding rule"):
        sharding.logical_to_pspec(("tokens",))


def test_two_processes_give_the_same_tokens(worker, tmp_path):
    """Two JAX processes on localhost (4 CPU devices each) joined by jax.distributed, one
    (data=4, model=2) mesh over all 8 devices: the token tree's output equals the
    single-process unsharded one."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = WORKER.with_name("multiprocess_worker.py")
    out = tmp_path / "tokens.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(WORKER.parent.parent))
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(i), str(port), str(out)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    got = json.loads(out.read_text())
    assert got["cache_devices"] == 8
    assert got["tokens"] == worker["runs"]["tree"]["unsharded"]
