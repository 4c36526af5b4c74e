"""The `jaxspec` command: a JSON run on the real default model, and one clear message with exit
status 2 (no traceback) for every bad input; `--debug` shows the traceback."""

import json
import subprocess
import sys

import pytest

from jaxspec.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_everywhere():
    for argv in (["--help"], ["generate", "--help"], ["convert", "--help"]):
        r = subprocess.run(
            [sys.executable, "-m", "jaxspec.cli", *argv], capture_output=True, text=True
        )
        assert r.returncode == 0 and "usage: jaxspec" in r.stdout


def test_generate_json(smollm2, tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text(
        json.dumps({"prompt": "What is 2+2?"}) + "\n\n"
        + json.dumps({"question_id": 1, "turns": ["Name a color.", "Another."]}) + "\n"
    )  # fmt: skip
    code, out, _ = run_cli(
        capsys, "generate", "--prompts-file", str(f), "--max-new-tokens", "8", "--json"
    )
    assert code == 0
    obj = json.loads(out)
    assert obj["model"] == "smollm2-135m" and obj["method"] == "ar"
    assert [r["prompt"] for r in obj["results"]] == ["What is 2+2?", "Name a color."]
    for r in obj["results"]:
        assert 1 <= len(r["token_ids"]) <= 8 and isinstance(r["text"], str)
    m = obj["metrics"]
    assert m["tau"] == 1.0 and m["new_tokens"] == sum(len(r["token_ids"]) for r in obj["results"])
    for key in ("tokens_per_s", "ttft_s", "compile_s", "acceptance_rate", "per_rank_acceptance"):
        assert key in m


BAD = [
    (["generate", "--model", "/no/such/dir", "--prompt", "hi"], "/no/such/dir"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "top_p"),
    (["generate", "--prompt", "hi", "--top-k", "-3"], "top_k"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
    (["generate", "--prompt", "  "], "prompt 0 is empty"),
    (["generate", "--prompts-file", "/no/such.jsonl"], "/no/such.jsonl"),
    (["generate"], "--prompt"),
    (["convert", "--gguf", "/no/such.gguf", "--out", "/tmp/x"], "/no/such.gguf"),
    (["convert", "--hf", "/no/such/hf", "--out", "/tmp/x"], "/no/such/hf"),
    (
        [
            "generate",
            "--prompt",
            "hi",
            "--prefill",
            "critiprefill",
            "--threshold",
            "1024",
            "--budget",
            "2048",
        ],
        "must be >= the budget",
    ),  # fmt: skip
    (
        ["generate", "--prompt", "hi", "--prefill", "critiprefill", "--segment", "500"],
        "multiple of the block",
    ),  # fmt: skip
]


@pytest.mark.parametrize("argv, needle", BAD)
def test_bad_input_one_clear_message(argv, needle, capsys):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


def test_bad_prompts_files(tmp_path, capsys):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok"}\n{oops\n')
    code, _, err = run_cli(capsys, "generate", "--prompts-file", str(f))
    assert code == 2 and f"{f}:2: not valid JSON" in err
    f.write_text('{"text": "no prompt key"}\n')
    code, _, err = run_cli(capsys, "generate", "--prompts-file", str(f))
    assert code == 2 and "'prompt' or 'turns'" in err
    f.write_bytes(b"\xff\xfe\x00bad")
    code, _, err = run_cli(capsys, "generate", "--prompts-file", str(f))
    assert code == 2 and str(f) in err


def test_prompt_longer_than_context(smollm2, capsys):
    code, _, err = run_cli(capsys, "generate", "--prompt", "word " * 9000, "--max-new-tokens", "4")
    assert code == 2 and "exceeds the model's context of 8192 tokens" in err


def test_corrupt_checkpoint_dir(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path), "--prompt", "hi")
    assert code == 2 and "unsupported architecture 'BertModel'" in err


def test_debug_shows_traceback():
    r = subprocess.run(
        [sys.executable, "-m", "jaxspec.cli", "generate", "--model", "/no/such", "--prompt", "x",
         "--debug"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode != 0 and "Traceback" in r.stderr and "CheckpointError" in r.stderr


def test_speculative_methods_equal_ar_on_smollm2(smollm2, capsys):
    """Greedy chain/tree speculation with a layer-skip self-draft emits exactly AR's tokens."""
    common = ["generate", "--prompt", "Write a haiku about the sea.", "--max-new-tokens", "24",
              "--json"]  # fmt: skip
    outs = {}
    for method in (["ar"], ["chain", "--gamma", "3"], ["tree", "--tree", "kary_2x3"]):
        code, out, _ = run_cli(capsys, *common, "--method", *method,
                               "--draft-layers", ",".join(map(str, range(20))))  # fmt: skip
        assert code == 0
        obj = json.loads(out)
        outs[method[0]] = obj["results"][0]["token_ids"]
        m = obj["metrics"]
        assert m["method"] == method[0] and m["tau"] >= 1.0
        if method[0] != "ar":
            assert 0.0 <= m["acceptance_rate"] <= 1.0 and len(m["per_depth_acceptance"]) >= 3
            assert m["draft_s"] > 0 and m["verify_s"] > 0 and m["other_s"] >= 0
            split = m["draft_s"] + m["verify_s"] + m["other_s"]
            assert split >= m["decode_s"] * 0.999  # other_s is clipped at 0 if overestimated
    assert outs["chain"] == outs["ar"] and outs["tree"] == outs["ar"]


def test_speculative_option_errors(capsys):
    code, _, err = run_cli(capsys, "generate", "--prompt", "x", "--method", "chain", "--gamma", "0")
    assert code == 2 and "--gamma" in err
    code, _, err = run_cli(capsys, "generate", "--prompt", "x", "--method", "tree", "--tree",
                           "no_such_tree")  # fmt: skip
    assert code == 2 and "no_such_tree" in err


# slow (35 s): a draft model equal to the target is tested on tiny models (test_speculative)
@pytest.mark.slow
def test_model_drafter_equal_to_target_accepts_everything(smollm2, capsys):
    """--drafter model with the target itself as the draft checkpoint: every draft is accepted."""
    code, out, _ = run_cli(capsys, "generate", "--prompt", "Count from one to ten.",
                           "--max-new-tokens", "16", "--method", "chain", "--gamma", "3",
                           "--drafter", "model", "--draft", "smollm2-135m", "--json")  # fmt: skip
    assert code == 0
    m = json.loads(out)["metrics"]
    assert m["acceptance_rate"] == 1.0 and m["tau"] > 3.0


def test_model_drafter_needs_a_draft(capsys):
    code, _, err = run_cli(capsys, "generate", "--prompt", "x", "--method", "chain",
                           "--drafter", "model")  # fmt: skip
    assert code == 2 and "--draft" in err


# slow (50 s): CritiPrefill then speculation == AR is tested on tiny models (test_critiprefill)
@pytest.mark.slow
def test_critiprefill_on_smollm2(smollm2, capsys):
    """CritiPrefill on the real model: with the threshold past the prompt nothing is pruned and
    the output equals dense prefill's; an aggressive setting prunes and still decodes."""
    text = " ".join(f"Item {i} is a {'red' if i % 3 else 'blue'} box." for i in range(60))
    base = ["generate", "--prompt", text, "--max-new-tokens", "6", "--json", "--no-chat"]

    def tokens(*extra):
        code, out, _ = run_cli(capsys, *base, *extra)
        assert code == 0
        return json.loads(out)["results"][0]["token_ids"]

    dense = tokens()
    cp = ["--prefill", "critiprefill", "--segment", "64", "--block", "16"]
    assert tokens(*cp, "--budget", "128", "--threshold", "4096") == dense
    pruned = tokens(*cp, "--budget", "64", "--threshold", "128")
    assert len(pruned) == 6


# slow (31 s): every builder is also checked == AR on tiny models in test_magicdec.py
@pytest.mark.slow
def test_magicdec_builders_equal_ar_on_smollm2(smollm2, capsys):
    """MagicDec self-speculation on the real model with a 64-slot draft cache (the window slides
    over a ~400-token prompt): every builder emits exactly AR's greedy tokens."""
    text = " ".join(f"Line {i}: the {'cat' if i % 2 else 'dog'} sat on mat {i}." for i in range(40))
    base = ["generate", "--prompt", text, "--max-new-tokens", "12", "--json", "--no-chat"]
    code, out, _ = run_cli(capsys, *base)
    assert code == 0
    want = json.loads(out)["results"][0]["token_ids"]
    for builder in ("copy", "streaming", "snapkv"):
        code, out, err = run_cli(capsys, *base, "--method", "magicdec", "--gamma", "3",
                                 "--draft-budget", "64", "--sink", "4",
                                 "--draft-builder", builder)  # fmt: skip
        assert code == 0, err
        obj = json.loads(out)
        assert obj["results"][0]["token_ids"] == want, builder
        assert obj["metrics"]["method"] == "magicdec" and obj["metrics"]["tau"] >= 1.0


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--method", "magicdec", "--draft-budget", "8", "--sink", "16"], "budget"),
        (["--method", "magicdec", "--drafter", "layerskip"], "--drafter self"),
        (["--method", "chain", "--gamma", "auto"], "magicdec"),
        (["--method", "magicdec", "--gamma", "auto", "--tree", "kary_2x3"], "--tree"),
    ],
)
def test_magicdec_option_errors(smollm2, extra, needle, capsys):
    code, _, err = run_cli(capsys, "generate", "--prompt", "x", *extra)
    assert code == 2 and needle in err and "Traceback" not in err
