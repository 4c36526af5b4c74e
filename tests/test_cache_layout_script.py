"""`scripts/bench_cache_layout.py`: the stacked-vs-per-layer cache A/B runs end to end on a tiny
model (both programs decode, the logits of the two forms agree, the section is written between
its markers and replaced on a re-run), and bad `--cases` give a clear error."""

import importlib.util
import re
import types
from pathlib import Path

import jax
import pytest

from jaxspec.model import init_params
from jaxspec.testing import TINY

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_cache_layout.py"
spec = importlib.util.spec_from_file_location("bench_cache_layout", SCRIPT)
bcl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bcl)


def test_runs_on_a_tiny_model(monkeypatch, tmp_path):
    import jaxspec.models

    model = types.SimpleNamespace(params=init_params(TINY, jax.random.key(0)), cfg=TINY)
    monkeypatch.setattr(jaxspec.models, "load_model", lambda name: model)
    out = tmp_path / "B.md"
    out.write_text("# bench\n")
    argv = ["--cases", "2x48x30,1x40x8", "--steps", "2", "--rounds", "2", "--out", str(out)]
    bcl.main(argv)
    bcl.main(argv)  # replaces its section
    text = out.read_text()
    assert text.startswith("# bench\n") and text.count(bcl.START) == 1
    num = r"([\d.]+)"
    row = rf"^\| (\d+) \| (\d+) \| (\d+) \| {num} \| {num} \| .* \| ([\d.e+-]+) \|$"
    rows = re.findall(row, text, re.M)
    assert [r[:3] for r in rows] == [("2", "48", "30"), ("1", "40", "8")]
    for *_, stacked, per_layer, diff in rows:
        assert float(stacked) > 0 and float(per_layer) > 0
        assert float(diff) < 1e-4  # the same forward, up to float32 rounding


@pytest.mark.parametrize("cases", ["8x896", "2x10x10", "ax1x1"])
def test_bad_cases_are_named(cases):
    with pytest.raises(SystemExit, match="case|BxSxC"):
        bcl.parse_cases(cases)
