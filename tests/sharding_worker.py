"""Worker for test_sharding.py, run in a fresh process with 8 simulated CPU devices (the device
count must be set before JAX starts, so it cannot share the test process).

Greedy decoding of a tiny random model: AR, a k-ary token tree with a separate random draft, and
SSSD n-gram drafting, unsharded and on the meshes (data, model) = (8,1), (4,2), (2,4), (1,8)
(and, for the tree, (data, model, seq) = (2, 1, 4)); MagicDec self-speculation (a k-ary tree on
the compact sink + window draft cache) on (4, 2), (2, 1, 4) and (1, 2, 4): the target's KV
slots over `seq`, the small compact cache replicated over it;
then the clear errors. Prints one JSON object: per method and mesh the tokens and on how many
devices the KV cache lived.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

sys.path.insert(0, str(Path(__file__).parent))
from sharding_cases import CFG, MESHES, OUT, B, inputs, outputs  # noqa: E402

from jaxspec import sharding  # noqa: E402
from jaxspec.drafting.ngram import NgramConfig  # noqa: E402
from jaxspec.errors import ConfigError  # noqa: E402
from jaxspec.magicdec import MagicDec  # noqa: E402
from jaxspec.sampling import SamplingParams  # noqa: E402
from jaxspec.speculative import SpecConfig, spec_decode, spec_generate, spec_prefill_jit  # noqa: E402
from jaxspec.testing import TINY, tiny_model  # noqa: E402
from jaxspec.trees import chain, kary  # noqa: E402


def run(spec, params, draft, mesh=None):
    prompts, lengths, max_new = inputs()
    sampling = SamplingParams.make(B)
    if mesh is not None:
        rows = sharding.NamedSharding(mesh, sharding.logical_to_pspec(("batch",)))
        prompts, lengths, max_new, sampling = jax.device_put(
            (prompts, lengths, max_new, sampling), rows
        )
        params = sharding.shard_params(params, CFG, mesh)
        if spec.num_speculated and spec.ngram is None:
            draft = sharding.shard_params(draft, spec.draft, mesh)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        # under the mesh: the model's sharding constraints are active too
        return spec_generate(params, draft, prompts, lengths, jax.random.key(0), sampling,
                             max_new, spec=spec, max_new_tokens=OUT, chunk=8)  # fmt: skip


def run_stepwise(spec, params, draft, mesh):
    """Prefill, then the state placed by shard_state, then the jitted decode (donating it); the
    target sharded by the rules, the draft replicated on every device (a different placement)."""
    prompts, lengths, max_new = inputs()
    params = sharding.shard_params(params, CFG, mesh)
    draft = sharding.put(draft, sharding.NamedSharding(mesh, sharding.PartitionSpec()))
    assert draft.embed.sharding.is_fully_replicated
    assert not params.embed.sharding.is_fully_replicated
    st = spec_prefill_jit(params, draft, prompts, lengths, jax.random.key(0),
                          SamplingParams.make(B), max_new, spec=spec, max_new_tokens=OUT,
                          chunk=8)  # fmt: skip
    st = sharding.shard_state(st, B, CFG, mesh)
    placed = len(st.cache.k.sharding.device_set)
    return spec_decode(params, draft, st, spec), placed


def restore_into_shardings(params) -> dict:
    """Orbax restore of saved params straight into a (2, 4) mesh's shardings."""
    import tempfile

    import numpy as np

    from jaxspec.convert.checkpoint import load_params, save_params

    mesh = sharding.make_mesh(2, 4)
    with tempfile.TemporaryDirectory() as d:
        save_params(Path(d) / "ckpt", CFG, params)
        _, got = load_params(Path(d) / "ckpt", sharding.param_shardings(CFG, mesh))
    same = jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), params, got)
    )
    return {"equal": same, "wqkv_spec": str(got.layers.wqkv.sharding.spec),
            "wqkv_devices": len(got.layers.wqkv.sharding.device_set),
            "embed_spec": str(got.embed.sharding.spec)}  # fmt: skip


def error_of(fn) -> str:
    try:
        fn()
    except ConfigError as e:
        return str(e)
    return ""


def main() -> None:
    _, params = tiny_model(0, CFG)
    _, draft = tiny_model(1, CFG)
    specs = {
        "ar": SpecConfig(CFG, CFG, chain(0)),
        "tree": SpecConfig(CFG, CFG, kary(2, 2), "greedy"),
        "sssd": SpecConfig(
            CFG, CFG, chain(0), "greedy", ngram=NgramConfig(num_nodes=6, branch_length=3)
        ),  # fmt: skip
        "magicdec": SpecConfig(CFG, CFG, kary(2, 2), "greedy", magicdec=MagicDec(12, sink=2)),
    }
    meshes = {"tree": (*MESHES, (2, 1, 4)), "magicdec": ((4, 2), (2, 1, 4), (1, 2, 4))}
    out = {"devices": jax.device_count(), "runs": {}}
    for name, spec in specs.items():
        d = {"ar": None, "sssd": None, "magicdec": params}.get(name, draft)
        base = outputs(run(spec, params, d))
        res = {"unsharded": base}
        for shape in meshes.get(name, MESHES):  # (d, m, s): the KV cache's slots over `seq`
            mesh = sharding.make_mesh(*shape)
            st = run(spec, params, d, mesh)
            tag = "x".join(map(str, shape))
            res[tag] = outputs(st)
            res[f"{tag}_cache_devices"] = len(st.cache.k.sharding.device_set)
        out["runs"][name] = res
    st, placed = run_stepwise(specs["tree"], params, draft, sharding.make_mesh(4, 2))
    out["stepwise"] = {"tokens": outputs(st), "placed_on": placed}
    out["restore"] = restore_into_shardings(params)
    small = dataclasses.replace(TINY)  # 4 query heads, 2 KV heads
    out["errors"] = {
        "devices": error_of(lambda: sharding.make_mesh(3, 2)),
        "heads": error_of(lambda: sharding.check_divisible(small, sharding.make_mesh(2, 4))),
        "batch": error_of(lambda: sharding.check_divisible(CFG, sharding.make_mesh(8, 1), 6)),
        "rule": error_of(lambda: sharding.logical_to_pspec(("batch", "pixels"))),
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
