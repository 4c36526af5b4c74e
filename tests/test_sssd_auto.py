"""SSSD's measured draft length (`jaxspec.drafting.sssd_auto`): the per-bucket choice is the
argmax of tau(N)·t(1)/t(N+1) over the measurable N (brute force), AR when nothing beats 1;
the tau profile is the Runner's tau; the auto specs decode exactly as AR (greedy); the CLI
writes and reads the profile; bad files give errors that name them."""

import json
import math
import types

import jax
import numpy as np
import pytest

from jaxspec.drafting.sssd_auto import (
    AutoSssdSpecs,
    SssdAuto,
    interp_time,
    load_sssd_auto,
    measure_tau,
)
from jaxspec.errors import ConfigError
from jaxspec.model import init_params
from jaxspec.profiling import write_device_profile, write_toml
from jaxspec.runner import GenerateOptions, Runner
from jaxspec.testing import TINY

TOKENS = (1, 2, 4, 8, 16)


def table(target_s, batches=(1, 8), contexts=(256,), ns=(1, 3, 6, 15, 20), tau=None):
    tau = tau or (1.3, 1.7, 2.0, 2.3, 2.4)
    return SssdAuto(tuple(ns), tuple(tau), tuple(batches), tuple(contexts), TOKENS,
                    tuple(tuple(tuple(r) for r in rows) for rows in target_s))  # fmt: skip


def test_interpolation_is_linear_between_columns_and_nan_outside():
    t = [1.0, 2.0, 4.0, 8.0, 16.0]
    assert interp_time(TOKENS, t, 3) == pytest.approx(3.0)
    assert interp_time(TOKENS, t, 12) == pytest.approx(12.0)
    assert interp_time(TOKENS, t, 8) == 8.0
    assert math.isnan(interp_time(TOKENS, t, 17)) and math.isnan(interp_time(TOKENS, t, 0))


@pytest.mark.parametrize("seed", range(20))
def test_choice_is_the_brute_force_argmax(seed):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0.01, 0.1, (2, 1, len(TOKENS))), axis=-1)  # t grows with n
    tau = np.sort(rng.uniform(1.0, 3.0, 5))
    auto = table(t.tolist(), tau=tuple(tau))
    for bi, b in enumerate((1, 8)):
        ch = auto.choose(b, 100)
        preds = {}
        for n, ta in zip(auto.draft_tokens, tau, strict=True):
            if n + 1 <= TOKENS[-1]:
                preds[n] = ta * t[bi, 0, 0] / np.interp(n + 1, TOKENS, t[bi, 0])
        best = max(preds, key=preds.get)
        if preds[best] > 1:
            assert ch.draft_tokens == best and ch.speedup == pytest.approx(preds[best])
        else:
            assert ch.draft_tokens == 0 and ch.speedup == 1.0
        assert 20 not in preds  # N = 20 needs n = 21 > the table's 16: never considered


def test_buckets_and_the_autoregressive_fallback():
    flat = [[[0.01, 0.011, 0.012, 0.013, 0.02]], [[0.02, 0.04, 0.08, 0.16, 0.32]]]
    auto = table(flat)
    assert auto.choose(1, 300).draft_tokens == 6  # 2.0·0.01/0.01275 = 1.57 beats 1.7/1.2 = 1.42
    assert auto.choose(2, 300).batch == 8  # the smallest profiled batch >= 2
    assert auto.choose(64, 300).batch == 8  # beyond the table: the largest
    assert auto.choose(8, 300).draft_tokens == 0  # verify cost grows ~linearly: AR
    assert [c.draft_tokens for c in auto.table()] == [6, 0]


def test_invalid_tables_are_refused():
    flat = [[[0.01] * 5], [[0.01] * 5]]
    with pytest.raises(ConfigError, match="increasing"):
        table(flat, ns=(3, 1, 6, 15, 20))
    with pytest.raises(ConfigError, match="tau"):
        table(flat, tau=(0.5, 1, 1, 1, 1))
    with pytest.raises(ConfigError, match="shape"):
        table([[[0.01] * 4]], batches=(1,))


def test_load_names_the_bad_file(tmp_path):
    dev = write_device_profile(tmp_path / "dev.toml", {
        "batches": [1], "contexts": [64], "tokens": [1, 4],
        "target_s": [[[0.01, 0.012]]]}, {})  # fmt: skip
    prof = write_toml(tmp_path / "sssd.toml", {"draft_tokens": [1, 3], "tau": [1.4, 1.9]}, [])
    assert load_sssd_auto(prof, dev).choose(1, 10).draft_tokens == 3
    with pytest.raises(ConfigError, match="missing.toml.*profile sssd"):
        load_sssd_auto(tmp_path / "missing.toml", dev)
    bad = write_toml(tmp_path / "bad.toml", {"p": [0.5]}, [])
    with pytest.raises(ConfigError, match="bad.toml.*draft_tokens"):
        load_sssd_auto(bad, dev)
    with pytest.raises(ConfigError, match="bad.toml.*profile device"):
        load_sssd_auto(prof, bad)


CFG = TINY
PARAMS = init_params(CFG, jax.random.key(0), scale=0.5)
IDS = [[5, 9, 11, 4, 5, 9, 11, 4, 5, 9], [7, 7, 30, 21, 2, 8, 7, 7, 30]]


def test_auto_specs_decode_as_ar_and_tau_matches_the_runner():
    opts = GenerateOptions(max_new_tokens=16, batch_size=2)
    want, _ = Runner(PARAMS, CFG).run(IDS, opts)
    model = types.SimpleNamespace(params=PARAMS, cfg=CFG)
    tau = measure_tau(model, IDS, [1, 3], opts, progress=False)
    assert all(t >= 1.0 for t in tau)
    # batch bucket 2 speculates (N = 3), batch bucket 8 decodes autoregressively
    auto = SssdAuto((1, 3), (1.2, 1.8), (2, 8), (64,), (1, 4),
                    (((0.01, 0.0101),), ((0.01, 0.05),)))  # fmt: skip
    specs = AutoSssdSpecs(CFG, auto, "greedy")
    assert specs(2, 40).ngram.num_nodes == 3 and specs(8, 40) is None
    assert "b2/ctx64: N=3" in specs.describe() and "b8/ctx64: AR" in specs.describe()
    runner = Runner(PARAMS, CFG, specs, None, time_phases=False)
    got, m = runner.run(IDS, opts)
    assert got == want
    assert m.tau == pytest.approx(tau[1])  # measure_tau's tau(3) is the Runner's at N = 3
    assert [r["tree_nodes"] for r in runner.last_rows] == [4, 4]  # root + 3 draft tokens
    got8, m8 = runner.run(IDS * 4, GenerateOptions(max_new_tokens=16, batch_size=8))
    assert got8 == want * 4 and m8.tau == 1.0
    assert {r["tree_nodes"] for r in runner.last_rows} == {1}


# slow (66 s): the profile and the auto specs are tested on a tiny model above
@pytest.mark.slow
def test_profile_sssd_cli_and_auto_generate(smollm2, tmp_path, capsys):
    import tomllib

    from jaxspec.cli import main

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "Repeat: red green blue, red green blue."}) + "\n")
    out = tmp_path / "sssd.toml"
    code = main(["profile", "sssd", "--prompts-file", str(f), "--draft-tokens", "1,3",
                 "--max-new-tokens", "12", "--out", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0 and str(out) in text
    prof = tomllib.loads(out.read_text())
    assert prof["draft_tokens"] == [1, 3] and len(prof["tau"]) == 2 and min(prof["tau"]) >= 1
    assert prof["command"].startswith("jaxspec profile sssd")
    dev = write_device_profile(tmp_path / "dev.toml", {
        "batches": [1], "contexts": [512], "tokens": [1, 4],
        "target_s": [[[0.01, 0.0101]]]}, {})  # fmt: skip
    common = ["generate", "--prompt", "Repeat: red green blue, red green blue.", "--json",
              "--max-new-tokens", "12"]  # fmt: skip
    assert main(common) == 0
    want = json.loads(capsys.readouterr().out)["results"][0]["token_ids"]
    code = main([*common, "--method", "sssd", "--acceptance-profile", str(out),
                 "--device-profile", str(dev)])  # fmt: skip
    res = capsys.readouterr()
    assert code == 0, res.err
    assert json.loads(res.out)["results"][0]["token_ids"] == want
    code = main([*common, "--method", "sssd", "--acceptance-profile", str(tmp_path / "no.toml")])
    assert code == 2 and "no.toml" in capsys.readouterr().err


def test_bench_sssd_script_namespace_and_auto_choices(tmp_path, capsys):
    """`scripts/bench_sssd.py` hands `jaxspec.bench` a namespace with every attribute it reads,
    and reports the auto choice per context bucket (tables) or the roofline rule (none)."""
    import importlib.util
    from pathlib import Path

    from jaxspec.bench import parse_methods, spec_namespace

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_sssd.py"
    spec = importlib.util.spec_from_file_location("bench_sssd", path)
    bs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bs)
    dev = write_device_profile(tmp_path / "dev.toml", {
        "batches": [1, 8], "contexts": [256, 1024], "tokens": [1, 8],
        "target_s": [[[0.01, 0.011], [0.01, 0.02]], [[0.01, 0.08], [0.01, 0.08]]]}, {})  # fmt: skip
    args = bs.parse_args(["--datastore", str(tmp_path), "--device-profile", str(dev)])
    for m in parse_methods(args.methods) + parse_methods(args.sweep_methods):
        ns = spec_namespace(bs.bench_namespace(args, 8), m)
        assert ns.method in ("ar", "sssd") and ns.device_profile == dev
    model = types.SimpleNamespace(name="tiny-not-profiled")
    assert bs.auto_choices(model, args, 1).count("(roofline)") == 2
    assert "not found" in capsys.readouterr().err
    for name in ("tiny-not-profiled__sssd__T0", "tiny-not-profiled__sssd-ds__T0"):
        write_toml(bs.REPO / "configs" / "profiles" / f"{name}.toml",
                   {"draft_tokens": [6], "tau": [1.5]}, [])  # fmt: skip
    try:
        got = bs.auto_choices(model, args, 1)
    finally:
        for name in ("tiny-not-profiled__sssd__T0", "tiny-not-profiled__sssd-ds__T0"):
            (bs.REPO / "configs" / "profiles" / f"{name}.toml").unlink()
    # ctx 256: 1.5·0.01/0.0107 = 1.4 -> N = 6; ctx 1024: 1.5·0.01/0.0171 < 1 -> AR
    assert got == "sssd 6/0 (ctx 256/1024); sssd-ds 6/0 (ctx 256/1024)"


def test_adaptive_specs_cost_widths_from_the_device_table(tmp_path):
    """`--draft-tokens adaptive`: each bucket's widths are those of ADAPTIVE_WIDTHS the table
    measures (w + 1 <= its largest n), costed t(b, c, w + 1) / t(b, c, 1); the specs decode as
    AR; a missing or malformed table names the file."""
    from jaxspec.drafting.sssd_auto import ADAPTIVE_WIDTHS, AdaptiveSssdSpecs

    # batch 2's t(2) < t(1) and t(8) < t(4): timing noise; a wider verify never costs less
    t = [[[0.01, 0.009, 0.013, 0.012, 0.03]], [[0.02, 0.04, 0.08, 0.16, 0.32]]]
    dev = tmp_path / "dev.toml"
    write_toml(
        dev, {"batches": [2, 8], "contexts": [64], "tokens": list(TOKENS), "target_s": t}, []
    )
    specs = AdaptiveSssdSpecs.load(dev, CFG, "greedy")
    widths, costs = specs.costs(2, 40)
    assert widths == tuple(w for w in ADAPTIVE_WIDTHS if w + 1 <= TOKENS[-1]) == (0, 1, 3, 7, 15)
    want = [np.interp(w + 1, TOKENS, t[0][0]) / t[0][0][0] for w in widths]
    np.testing.assert_allclose(costs, np.maximum.accumulate(want))
    assert costs[1] == 1.0 and costs[3] == costs[2] > 1.0  # the noisy cells: flattened
    assert specs.costs(5, 300) == specs.costs(8, 64)  # buckets: smallest >= or the largest
    ng = specs(8, 40).ngram
    assert ng.widths == widths and ng.num_nodes == 15 and ng.width_cost == specs.costs(8, 40)[1]
    assert ng.objective == "slowest"  # the runner's static batches; the engine asks for "sum"
    engine_specs = AdaptiveSssdSpecs.load(dev, CFG, "greedy", objective="sum")
    assert engine_specs(8, 40).ngram.objective == "sum"
    assert "b8/ctx64: 0:1.00 1:2.00" in specs.describe()
    opts = GenerateOptions(max_new_tokens=16, batch_size=2)
    want_out, _ = Runner(PARAMS, CFG).run(IDS, opts)
    got, m = Runner(PARAMS, CFG, specs, None, time_phases=False).run(IDS, opts)
    assert got == want_out
    with pytest.raises(ConfigError, match="missing.toml"):
        AdaptiveSssdSpecs.load(tmp_path / "missing.toml", CFG, "greedy")
    bad = tmp_path / "bad.toml"
    write_toml(
        bad, {"batches": [1], "contexts": [64], "tokens": [2, 4], "target_s": [[[1, 2]]]}, []
    )
    with pytest.raises(ConfigError, match="n = 1"):
        AdaptiveSssdSpecs.load(bad, CFG, "greedy")
    write_toml(bad, {"batches": [1], "contexts": [64], "tokens": [1, 2], "target_s": [[[1]]]}, [])
    with pytest.raises(ConfigError, match="shape"):
        AdaptiveSssdSpecs.load(bad, CFG, "greedy")
