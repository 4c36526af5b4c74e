"""Worker for test_sharding.py's multi-process test: one of 2 JAX processes on localhost, each with
4 simulated CPU devices (8 in all), joined by `jax.distributed.initialize`. Both run the same
program: params and inputs placed on a global (data=4, model=2) mesh with `jaxspec.sharding`,
the jitted token-tree `spec_generate`, the tokens gathered from both processes; process 0
writes them as JSON to OUT (stdout carries the collectives' own chatter).

    python multiprocess_worker.py PROCESS_ID PORT OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_platforms", "cpu")

sys.path.insert(0, str(Path(__file__).parent))
from sharding_cases import CFG, OUT, B, inputs  # noqa: E402

from jaxspec import sharding  # noqa: E402
from jaxspec.sampling import SamplingParams  # noqa: E402
from jaxspec.speculative import SpecConfig, spec_generate  # noqa: E402
from jaxspec.testing import tiny_model  # noqa: E402
from jaxspec.trees import kary  # noqa: E402


def main() -> None:
    pid, port = int(sys.argv[1]), int(sys.argv[2])
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = sharding.make_mesh(4, 2)  # spans both processes
    _, params = tiny_model(0, CFG)
    _, draft = tiny_model(1, CFG)
    spec = SpecConfig(CFG, CFG, kary(2, 2), "greedy")
    prompts, lengths, max_new = inputs()
    rows = sharding.NamedSharding(mesh, sharding.logical_to_pspec(("batch",)))
    prompts, lengths, max_new, sampling = sharding.put(  # a prefix of shardings: one per input
        (prompts, lengths, max_new, SamplingParams.make(B)), (rows, rows, rows, rows)
    )
    key = sharding.put(jax.random.key(0), sharding.NamedSharding(mesh, sharding.PartitionSpec()))
    st = spec_generate(sharding.shard_params(params, CFG, mesh),
                       sharding.shard_params(draft, CFG, mesh), prompts, lengths,
                       key, sampling, max_new, spec=spec, max_new_tokens=OUT,
                       chunk=8)  # fmt: skip
    toks, n = sharding.gather((st.tokens, st.n_out))
    if pid == 0:
        Path(sys.argv[3]).write_text(json.dumps({
            "tokens": [toks[i, : n[i]].tolist() for i in range(B)],
            "cache_devices": len(st.cache.k.sharding.device_set)}))  # fmt: skip
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
