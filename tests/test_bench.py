"""`jaxspec bench`: AR and speculative methods on the same prompts in one process (JSON, markdown,
per-category numbers, the greedy lossless check), and one clear message for every bad input."""

import json

import numpy as np
import pytest

from jaxspec.bench import MethodSpec, aggregate, parse_methods, select_prompts
from jaxspec.cli import main
from jaxspec.metrics import Metrics

DRAFT_LAYERS = ",".join(map(str, range(20)))  # 20 of SmolLM2's 30 layers


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# slow (113 s): the bench command end to end on the real model; its parts (method parsing,
# prompt selection, aggregation, bad input) are tested below
@pytest.mark.slow
def test_bench_on_smollm2(smollm2, tmp_path, capsys):
    f = tmp_path / "q.jsonl"
    recs = [
        {"category": "writing", "turns": ["Write a haiku about the sea.", "Another one."]},
        {"category": "qa", "prompt": "What is the capital of France?"},
        {"category": "roleplay", "turns": ["Pretend to be a pirate. Say hello."]},
        {"category": "writing", "prompt": "Name three colors."},  # 3rd mt_bench: dropped
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    md = tmp_path / "B.md"
    md.write_text("# jaxspec benchmarks\n\nintro\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n"
                  "\ntail\n")  # fmt: skip
    out_json = tmp_path / "r" / "bench.json"
    code, out, err = run_cli(
        capsys, "bench", "--prompts-file", str(f), "--per-category", "2", "--max-new-tokens", "8",
        "--methods", "chain:2,tree:kary_2x3", "--draft-layers", DRAFT_LAYERS,
        "--json", str(out_json), "--out-md", str(md),
    )  # fmt: skip
    assert code == 0, err
    r = json.loads(out_json.read_text())
    for key in ("model", "date", "jax_version", "machine", "command", "settings", "methods"):
        assert key in r
    assert r["model"] == "smollm2-135m" and r["command"].startswith("jaxspec bench ")
    assert r["settings"]["num_prompts"] == 3
    assert r["settings"]["categories"] == {"mt_bench": 2, "qa": 1}
    assert list(r["methods"]) == ["ar", "chain:2", "tree:kary_2x3"]  # AR added, first
    ar = r["methods"]["ar"]
    assert ar["overall"]["speedup_vs_ar"] == 1.0 and ar["overall"]["tau"] == 1.0
    for name, m in r["methods"].items():
        assert m["identical_to_ar"] == "3/3", name  # greedy speculation is lossless
        assert set(m["per_category"]) == {"mt_bench", "qa"}
        o = m["overall"]
        assert o["num_prompts"] == 3 and o["speedup_vs_ar"] > 0 and o["compile_s"] > 0
        assert o["new_tokens"] == sum(c["new_tokens"] for c in m["per_category"].values())
        cats = m["per_category"].values()
        assert o["decode_s"] == pytest.approx(sum(c["decode_s"] for c in cats))
        emitted = o["new_tokens"] - o["num_prompts"]
        assert o["tokens_per_s"] == pytest.approx(emitted / o["decode_s"])
        assert o["tau"] == pytest.approx(emitted / o["live_steps"])
        for c, cm in m["per_category"].items():
            ar_c = ar["per_category"][c]
            assert cm["speedup_vs_ar"] == pytest.approx(cm["tokens_per_s"] / ar_c["tokens_per_s"])
        want_nodes = {"ar": "1", "chain:2": "3", "tree:kary_2x3": "15"}[name]
        assert m["tree_nodes"] == {want_nodes: 3}, name  # tokens per step -> prompts
        if name != "ar":
            assert o["tau"] >= 1.0 and 0.0 <= o["acceptance_rate"] <= 1.0
            assert len(o["per_depth_acceptance"]) >= 2
    assert "| method | tau |" in out and "| chain:2 |" in out and "| **overall** | 3 |" in out
    assert "| mt_bench | 2 |" in out and "| qa | 1 |" in out
    assert "Per-bucket choices" not in out  # fixed configurations only
    text = md.read_text()
    assert text.startswith("# jaxspec benchmarks\n\nintro\n") and text.endswith("\ntail\n")
    assert text.count("<!-- bench:start -->") == 1 and text.count("<!-- bench:end -->") == 1
    assert "old" not in text and "| tree:kary_2x3 |" in text and "JAX " in text
    assert "bench: chain:2 · qa: 1 prompt" in err


def test_parse_methods():
    names = [m.name for m in parse_methods("chain,tree:kary_4x2,ar,chain:2", 3, "kary_2x3")]
    assert names == ["ar", "chain:3", "tree:kary_4x2", "chain:2"]
    assert parse_methods("tree", 4, "kary_2x3") == [
        MethodSpec("ar", "ar"),
        MethodSpec("tree:kary_2x3", "tree", tree="kary_2x3"),
    ]
    ms = parse_methods("sssd:adaptive,sssd-ds:4,sssd")
    assert [(m.name, m.draft_tokens, m.datastore) for m in ms[1:]] == [
        ("sssd:adaptive", "adaptive", False),
        ("sssd-ds:4", 4, True),
        ("sssd", None, False),
    ]


def test_spec_namespace_carries_the_draft_model_options():
    """What `cli.build_draft` reads for `--drafter model` reaches it (incl. --attention)."""
    from jaxspec.bench import spec_namespace
    from jaxspec.cli import build_parser

    args = build_parser().parse_args(["bench", "--prompts-file", "q.jsonl", "--drafter", "model",
                                      "--draft", "d", "--attention", "reference"])  # fmt: skip
    ns = spec_namespace(args, parse_methods("chain:2")[1])
    assert (ns.drafter, ns.draft, ns.attention, ns.gamma) == ("model", "d", "reference", 2)


def test_select_prompts():
    pairs = [("a", "writing"), ("b", "qa"), ("c", "stem"), ("d", "qa"), ("e", "qa"), ("f", None)]
    recs = [(t, {"category": c}) for t, c in pairs]
    got = select_prompts(recs, per_category=2)
    assert got == [("a", "mt_bench"), ("b", "qa"), ("c", "mt_bench"), ("d", "qa"), ("f", None)]
    assert select_prompts(recs, limit=2, per_category=1, raw_categories=True) == [
        ("a", "writing"),
        ("b", "qa"),
    ]


def test_aggregate():
    a = Metrics(num_prompts=1, new_tokens=11, tau=2.0, acceptance_rate=0.5, decode_s=1.0,
                per_depth_acceptance=[0.8, 0.4], prefill_s=0.2)  # fmt: skip
    b = Metrics(num_prompts=2, new_tokens=22, tau=4.0, acceptance_rate=1.0, decode_s=3.0,
                per_depth_acceptance=[1.0, 1.0], prefill_s=0.4)  # fmt: skip
    m = aggregate([a, b], "chain:4", batch_size=1)
    # decode tokens 10 + 20 over live steps 5 + 5
    assert m.tau == 3.0 and m.tokens_per_s == 7.5 and m.acceptance_rate == 0.75
    assert m.per_depth_acceptance == pytest.approx([0.9, 0.7])
    assert m.ttft_s == pytest.approx(0.2) and m.num_prompts == 3


BAD = [
    (["--methods", "ar,medusa"], "unknown method 'medusa'"),
    (["--methods", "chain:x"], "chain length must be an integer"),
    (["--methods", "chain:0"], "must be >= 1"),
    (["--methods", "ar,,chain"], "empty method name"),
    (["--methods", "chain,chain:4"], "'chain:4' is listed twice"),
    (["--methods", "tree:no_such_tree"], "no_such_tree"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--per-category", "-1"], "--per-category must be >= 1"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--gamma", "0"], "--gamma"),
]


@pytest.mark.parametrize("extra, needle", BAD)
def test_bench_bad_input(extra, needle, tmp_path, capsys):
    f = tmp_path / "q.jsonl"
    f.write_text('{"prompt": "hi", "category": "qa"}\n')
    code, _, err = run_cli(capsys, "bench", "--prompts-file", str(f), *extra)
    assert code == 2
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


def test_bench_bad_prompts_file(tmp_path, capsys):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n\n")
    code, _, err = run_cli(capsys, "bench", "--prompts-file", str(f))
    assert code == 2 and f"{f}: no prompts" in err
    code, _, err = run_cli(capsys, "bench", "--prompts-file", str(tmp_path / "nope.jsonl"))
    assert code == 2 and "nope.jsonl" in err


# slow (99 s): the sweep end to end; its pieces (windows, chooser, cost model, MagicDec == AR)
# are tested in test_long_bench_small_batches_cover_every_window, test_costmodel, test_magicdec
@pytest.mark.slow
def test_bench_long_context_on_smollm2(smollm2, tmp_path, capsys):
    """`bench --long-context` end to end at a tiny size: acceptance per budget, every batch's
    configurations checked against AR (identical rows recorded), the chooser's pick among the
    measured configurations, the markdown section and the profile `--gamma auto` reads; by
    default the sweep decodes in the runner's layout."""
    from jaxspec.magicdec_auto import read_magicdec_profile

    words = "the river ran past the mill and the miller sang of bread and rain ".split()
    books = tmp_path / "books.jsonl"
    books.write_text("".join(json.dumps({"text": " ".join(words * (40 + 7 * i))}) + "\n"
                             for i in range(2)))  # fmt: skip
    md = tmp_path / "B.md"
    md.write_text("intro\n")
    out_json, prof = tmp_path / "long.json", tmp_path / "prof.toml"
    code, out, err = run_cli(
        capsys, "bench", "--long-context", "--prompts-file", str(books), "--batch-sizes", "2",
        "--context-lengths", "200", "--gammas", "2", "--budgets", "48,96", "--draft-budget", "48",
        "--sink", "16", "--max-new-tokens", "6", "--distinct-rows", "2", "--skip", "10",
        "--reps", "1", "--json", str(out_json), "--profile-out", str(prof), "--out-md", str(md),
    )  # fmt: skip
    assert code == 0, err
    r = json.loads(out_json.read_text())
    from jaxspec.runner import resolve_layout

    # `--layout auto`: what `generate` decodes with (unrolled on one CPU; $JAXSPEC_LAYOUT here)
    assert r["layout"] == resolve_layout("auto")
    assert set(r["alphas"]["200"]) == {"48", "96"}
    assert [row["batch"] for row in r["results"]] == [2]
    for row in r["results"]:
        assert row["ar_tokens_per_s"] > 0
        # measured in 2 interleaved rounds (the default): each configuration's speedup is the
        # median over rounds of its tokens/s over the same round's AR
        ar_runs = row["ar_tokens_per_s_runs"]
        assert row["rounds"] == 2 and len(ar_runs) == 2
        assert row["ar_tokens_per_s"] == pytest.approx(np.median(ar_runs))
        for c in row["configs"]:
            ratios = np.asarray(c["tokens_per_s_runs"]) / np.asarray(ar_runs)
            assert c["measured_runs"] == pytest.approx(ratios.tolist())
            assert c["measured"] == pytest.approx(np.median(ratios))
        assert {(c["gamma"], c["budget"]) for c in row["configs"]} >= {(2, 48)}
        for c in row["configs"]:
            assert c["rows_identical"] == 1.0 and c["measured"] > 0 and c["predicted"] > 0
        if row["pick"] is not None:
            assert tuple(row["pick"]) in {(c["gamma"], c["budget"]) for c in row["configs"]}
    text = md.read_text()
    assert text.startswith("intro") and "<!-- bench-long:start -->" in text
    assert "every configuration's output equals AR's" in text
    assert f"{r['layout']}-layout weights" in text
    body = read_magicdec_profile(prof)
    assert body["batches"] == [2] and body["budgets"] == [48, 96]
    # the whole-step table (γ = 0 is AR) and the accepted-length histograms the chooser reads
    assert body["step_batches"] == [2] and body["step_contexts"] == [200]
    assert body["step_gammas"] == [0, 2] and body["step_budget"] == 48
    assert np.asarray(body["step_s"]).shape == (1, 1, 2) and np.all(np.asarray(body["step_s"]) > 0)
    assert np.asarray(body["accept_hist"]).shape == (1, 2, 3)  # context × budget × (γ_ref + 1)
    # the largest γ's whole step at every budget: the draft's cost per budget inside the step
    assert body["step_budgets"] == [48, 96] and body["budget_gamma"] == 2
    bud = np.asarray(body["budget_step_s"])
    assert bud.shape == (1, 1, 2) and np.all(bud > 0)
    assert bud[0, 0, 0] == pytest.approx(np.asarray(body["step_s"])[0, 0, 1])  # K0 = 48, γ = 2
    for row in r["results"]:
        assert set(row["step_s"]) == {"0", "2"}
        assert all(c["predicted_forward"] > 0 for c in row["configs"])
    from jaxspec.magicdec_auto import AutoMagicDec

    assert AutoMagicDec(body).steps is not None


def test_bench_long_context_bad_input(tmp_path, capsys):
    books = tmp_path / "books.jsonl"
    books.write_text(json.dumps({"text": "too short"}) + "\n")
    code, _, err = run_cli(capsys, "bench", "--long-context")
    assert code == 2 and "--long-context needs --prompts-file" in err
    code, _, err = run_cli(capsys, "bench", "--long-context", "--prompts-file", str(books),
                           "--temperature", "0.7")  # fmt: skip
    assert code == 2 and "greedy" in err
    code, _, err = run_cli(capsys, "bench", "--long-context", "--prompts-file", str(books),
                           "--rounds", "0")  # fmt: skip
    assert code == 2 and "--rounds must be >= 1, got 0" in err


def test_long_bench_small_batches_cover_every_window(smollm2):
    """A batch smaller than the distinct windows decodes all of them (several batches per run),
    so batch 1 is measured on the same windows as the acceptance profile, not on window 0 alone:
    its rows equal the rows of one batch holding every window."""
    from jaxspec.bench_long import LongBench
    from jaxspec.speculative import SpecConfig
    from jaxspec.trees import chain

    cfg = smollm2.cfg
    rows = [smollm2.tokenizer.encode(t, chat=False)[:24] for t in (
        "The mill stood by the river, and every morning the miller opened the sluice gate.",
        "In the spring the orchard was white with blossom and loud with bees all day long.",
        "A ship came into the harbour at dusk, its sails torn and its crew silent and tired.",
    )]  # fmt: skip
    rows = [r[: min(map(len, rows))] for r in rows]
    n = len(rows[0])
    bench = LongBench(smollm2, n, rows, slots=n + 16)
    assert bench.offsets(1) == [0, 1, 2] and bench.offsets(2) == [0, 2] and bench.offsets(4) == [0]
    ar = SpecConfig(cfg, cfg, chain(0))
    one = bench.run(ar, 1, 6, max_runs=1)
    three = bench.run(ar, 3, 6, max_runs=1)
    assert len(one["tokens"]) == 3 and one["tokens"] == three["tokens"]
    assert len({tuple(t) for t in one["tokens"]}) == 3  # three different windows, not one
    two = bench.run(ar, 2, 6, max_runs=1)  # batches (0, 1) and (2, 0)
    assert two["tokens"] == [*three["tokens"], three["tokens"][0]]
    # the sweep drops each bucket's decode loops (held by the bench, not only by JAX's caches):
    # a later run compiles again and decodes the same tokens
    assert len(bench._dec) == 3 and bench.run(ar, 1, 6, max_runs=1)["compile_s"] == 0
    bench.drop_compiled()
    assert not bench._dec
    again = bench.run(ar, 1, 6, max_runs=1)
    assert again["compile_s"] > 0 and again["tokens"] == one["tokens"]
