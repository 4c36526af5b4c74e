"""Acceptance profiling (Sequoia's positional vector): exact on a draft equal to the target,
a probability vector otherwise, TOML round trip, clear errors, and the CLI on SmolLM2."""

import json
import types

import jax
import numpy as np
import pytest

from jaxspec.errors import ConfigError
from jaxspec.model import init_params
from jaxspec.profiling import (
    layerskip_name,
    profile_acceptance,
    rank_profile,
    read_profile,
    write_profile,
)
from jaxspec.runner import GenerateOptions
from jaxspec.speculative import SpecConfig
from jaxspec.testing import TINY
from jaxspec.trees import kary

PARAMS = init_params(TINY, jax.random.key(0), scale=0.5)
OTHER = init_params(TINY, jax.random.key(3), scale=0.5)
MODEL = types.SimpleNamespace(params=PARAMS, cfg=TINY)
IDS = [[5, 9, 11, 4], [7, 7, 30, 21, 2, 8]]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_draft_equal_to_target_always_accepts_rank_one(temperature):
    """q = p: SWOR accepts the first child with probability 1 (ALGORITHMS.md §4(b) robustness
    property 1); greedy's top-1 draft child is the target's argmax."""
    verifier = "swor" if temperature else "greedy"
    spec = SpecConfig(TINY, TINY, kary(4, 1), verifier)
    opts = GenerateOptions(max_new_tokens=16, temperature=temperature, batch_size=2)
    prof = profile_acceptance(MODEL, spec, PARAMS, IDS, opts)
    assert prof["p"] == [1.0, 0.0, 0.0, 0.0] and prof["none"] == 0.0 and prof["steps"] > 10


def test_unrelated_draft_gives_a_probability_vector():
    spec = SpecConfig(TINY, TINY, kary(4, 1), "swor")
    opts = GenerateOptions(max_new_tokens=24, temperature=0.8, batch_size=2)
    prof = profile_acceptance(MODEL, spec, OTHER, IDS, opts)
    assert sum(prof["p"]) + prof["none"] == pytest.approx(1.0)
    assert 0 < prof["p"][0] < 1 and prof["none"] > 0


def test_toml_round_trip_and_errors(tmp_path):
    prof = {"p": [0.5, 0.2], "none": 0.3, "steps": 10, "tau": 1.7, "prompts": 2}
    path = write_profile(tmp_path / "a.toml", prof, {"target": "t", "draft": "d",
                                                     "command": 'jaxspec "x"'})  # fmt: skip
    back = read_profile(path)
    assert back["p"] == [0.5, 0.2] and back["none"] == 0.3 and back["command"] == 'jaxspec "x"'
    with pytest.raises(ConfigError, match="no such acceptance profile"):
        read_profile(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("p = [0.9, 0.5]\n")
    with pytest.raises(ConfigError, match="summing"):
        read_profile(tmp_path / "bad.toml")
    (tmp_path / "junk.toml").write_text("p = [\n")
    with pytest.raises(ConfigError, match="unreadable"):
        read_profile(tmp_path / "junk.toml")
    with pytest.raises(ConfigError, match="nothing to profile"):
        rank_profile(np.zeros(3))


def test_layerskip_name():
    assert layerskip_name(tuple(range(15)) + tuple(range(20, 30))) == "layerskip-0-14+20-29"
    assert layerskip_name((0, 2, 3)) == "layerskip-0+2-3"


def test_profile_acceptance_cli(smollm2, tmp_path, capsys):
    from jaxspec.cli import main

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "Name three colors."}) + "\n")
    out = tmp_path / "prof.toml"
    code = main(["profile", "acceptance", "--prompts-file", str(f), "--width", "3",
                 "--max-new-tokens", "12", "--draft-layers", ",".join(map(str, range(20))),
                 "--out", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0 and str(out) in text
    prof = read_profile(out)
    assert len(prof["p"]) == 3 and prof["width"] == 3 and prof["temperature"] == 0.6
    assert prof["draft"] == "layerskip-0-19" and prof["command"].startswith("jaxspec profile")
    assert sum(prof["p"]) + prof["none"] == pytest.approx(1.0, abs=1e-5)


def test_profile_device_cli(smollm2, tmp_path, capsys):
    import tomllib

    from jaxspec.cli import main

    out = tmp_path / "dev.toml"
    code = main(["profile", "device", "--batches", "1,2", "--contexts", "16", "--tokens", "1,4",
                 "--reps", "1", "--draft-layers", "0,1,2", "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    t = tomllib.loads(out.read_text())
    assert t["batches"] == [1, 2] and t["contexts"] == [16] and t["tokens"] == [1, 4]
    for k in ("target_s", "draft_s"):
        arr = np.asarray(t[k])
        assert arr.shape == (2, 1, 2) and (arr > 0).all()
    assert t["flops_per_s"] > 0 and t["bytes_per_s"] > 0 and t["draft"] == "layerskip-0-2"


@pytest.mark.parametrize("argv,needle", [
    (["--tokens", "1,x"], "--tokens"), (["--batches", "0"], "--batches"),
    (["--reps", "0"], "--reps"), (["--drafter", "model"], "--draft"),
])  # fmt: skip
def test_profile_device_errors(capsys, argv, needle):
    from jaxspec.cli import main

    assert main(["profile", "device", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_profile_topology_cli(tmp_path, capsys):
    import tomllib

    from jaxspec.cli import main
    from jaxspec.profiling import write_device_profile
    from jaxspec.trees import TreeSpec

    prof = {"p": [0.6, 0.15, 0.07], "none": 0.18, "steps": 100, "tau": 1.8, "prompts": 3}
    acc = write_profile(tmp_path / "acc.toml", prof, {})
    dev = write_device_profile(tmp_path / "dev.toml", {
        "batches": [1, 8], "contexts": [256], "tokens": [1, 4, 16],
        "target_s": [[[0.01, 0.011, 0.02]], [[0.02, 0.06, 0.2]]],
        "draft_s": [[[0.001, 0.001, 0.002]], [[0.002, 0.004, 0.02]]]}, {})  # fmt: skip
    out = tmp_path / "topo.toml"
    code = main(["profile", "topology", "--acceptance", str(acc), "--device", str(dev),
                 "--max-depth", "5", "--out", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0 and "| 1 | 256 | 4 |" in text and "| 8 | 256 | 1 |" in text
    t = tomllib.loads(out.read_text())
    assert TreeSpec(tuple(t["b1_ctx256"])).num_nodes == 4 and t["b8_ctx256"] == [-1]
    assert main(["profile", "topology", "--acceptance", str(acc), "--device",
                 str(tmp_path / "none.toml")]) == 2  # fmt: skip
    assert "unreadable device timing table" in capsys.readouterr().err


def test_tree_auto_on_smollm2_equals_ar(smollm2, tmp_path, capsys):
    """`--tree auto` with an acceptance profile and a device table (written here) picks the
    bucket's DP tree; greedy output is AR's. A table where nothing pays decodes as AR."""
    from jaxspec.cli import main
    from jaxspec.profiling import write_device_profile

    prof = {"p": [0.5, 0.2, 0.1], "none": 0.2, "steps": 100, "tau": 1.8, "prompts": 3}
    acc = write_profile(tmp_path / "acc.toml", prof, {})
    fast = write_device_profile(tmp_path / "fast.toml", {
        "batches": [1], "contexts": [512], "tokens": [1, 4],
        "target_s": [[[0.01, 0.011]]], "draft_s": [[[0.001, 0.001]]]}, {})  # fmt: skip
    slow = write_device_profile(tmp_path / "slow.toml", {
        "batches": [1], "contexts": [512], "tokens": [1, 4],
        "target_s": [[[0.01, 0.04]]], "draft_s": [[[0.01, 0.01]]]}, {})  # fmt: skip
    common = ["generate", "--prompt", "Name three colors.", "--max-new-tokens", "16", "--json",
              "--batch-size", "1"]  # fmt: skip
    assert main(common) == 0
    want = json.loads(capsys.readouterr().out)["results"][0]["token_ids"]
    for dev, tree_used in ((fast, True), (slow, False)):
        code = main([*common, "--method", "tree", "--tree", "auto", "--draft-layers",
                     ",".join(map(str, range(20))), "--acceptance-profile", str(acc),
                     "--device-profile", str(dev)])  # fmt: skip
        out = capsys.readouterr()
        assert code == 0, out.err
        obj = json.loads(out.out)
        assert obj["results"][0]["token_ids"] == want
        assert (obj["metrics"]["acceptance_rate"] is not None) == tree_used
    code = main([*common, "--method", "tree", "--tree", "auto", "--device-profile",
                 str(tmp_path / "missing.toml"), "--acceptance-profile", str(acc)])  # fmt: skip
    assert code == 2 and "profile device" in capsys.readouterr().err
