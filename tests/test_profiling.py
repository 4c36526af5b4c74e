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
