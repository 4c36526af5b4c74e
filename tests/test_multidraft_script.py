"""`scripts/bench_multidraft.py` (issue 4's multi-draft study): one configuration run on a tiny
model (the Runner without phase timing; per-prompt tau consistent with the aggregate), and the
report's gains with their paired standard errors computed from per-prompt values."""

import dataclasses
import importlib.util
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxspec.model import init_params
from jaxspec.runner import GenerateOptions
from jaxspec.testing import TINY
from jaxspec.trees import kary

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_multidraft.py"
spec = importlib.util.spec_from_file_location("bench_multidraft", SCRIPT)
bm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bm)

CFG = dataclasses.replace(TINY, eos_token_ids=())


# One configuration in the default suite (the per-node switch); the other two only with -m slow.
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "verifier,threshold",
    [
        pytest.param("rrs", 0.0, marks=SLOW),
        pytest.param("spechub", 0.0, marks=SLOW),
        ("spechub", 0.3),
    ],
)
def test_one_configuration_on_a_tiny_model(verifier, threshold):
    model = types.SimpleNamespace(params=init_params(CFG, jax.random.key(0)), cfg=CFG)
    draft = init_params(CFG, jax.random.key(1))
    ids = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
    opts = GenerateOptions(max_new_tokens=12, temperature=1.0, batch_size=4)
    tau, se, per, hist, _ = bm.run(model, CFG, draft, kary(2, 2), verifier, threshold, ids, opts)
    assert len(per) == 3 and np.isfinite(se)
    assert 1.0 <= per.min() and per.max() <= 3.0  # a 2-level tree emits 1..3 tokens per step
    assert min(per) <= tau <= max(per)  # the aggregate is a weighted mean of the per-prompt ones
    assert hist.shape == (3,) and hist.sum() > 0  # ranks 1, 2 and none


def test_gains_and_their_paired_standard_error():
    def entry(tau, pred, per):
        return {"tau": tau, "se": 0.1, "predicted": pred, "per_prompt": per}

    res = {
        "spechub": entry(2.2, 2.3, [2.0, 2.4, 2.2]),
        "swor": entry(2.0, 2.1, [1.9, 2.1, 2.0]),
        "switch": entry(2.1, None, [2.0, 2.2, 2.1]),
    }
    d = np.array([0.1, 0.3, 0.2])
    assert bm._gain(res, "swor") == f"+0.200 ± {d.std(ddof=1) / np.sqrt(3):.3f}"
    assert bm._gain(res, "rrs") == "—"
    assert bm._cell(res, "swor") == "2.000 ± 0.100 (2.10)"
    assert bm._cell(res, "switch") == "2.100 ± 0.100"


def test_bad_arguments():
    with pytest.raises(SystemExit, match="max-depth"):
        bm.parse_args(["--max-depth", "1"])
    with pytest.raises(SystemExit, match="--draft"):
        bm.parse_args(["--drafter", "model"])
