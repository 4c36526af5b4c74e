"""Sharding: logical axis names, one short rules table, mesh helpers, sharded params and state.

Every params leaf and KV-cache array carries logical axis names (`model.params.LOGICAL_AXES`,
`kv_cache.LOGICAL_AXES`); `RULES` maps them to the axes of a mesh:

  mesh axis   logical names on it
  data        batch
  model       heads, kv_heads, mlp, vocab
  seq         kv_seq (the KV cache's slots; only when a `seq` axis > 1 is asked for)
  (none)      embed, layers, tree

Meshes are built with `make_mesh(data, model, seq)` (`jax.make_mesh` with Auto axes, so XLA's
partitioner propagates shardings through the unchanged jitted functions); the decode state is
placed with `shard_state`, params with `shard_params` or restored straight into their shardings
(`convert.checkpoint.load_params(path, param_shardings(...))`). Under `jax.set_mesh(mesh)` the
model also pins its activations at three boundaries (`constrain`). Sharding changes where data
lives, never what is computed: sharded and unsharded runs give the same tokens (tested on 8
simulated CPU devices). A mesh axis that does not divide the dimension it shards is an error
naming both (`check_divisible`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxspec.config import ModelConfig
from jaxspec.errors import ConfigError
from jaxspec.kv_cache import LOGICAL_AXES as CACHE_AXES
from jaxspec.kv_cache import KVCache
from jaxspec.model.params import LOGICAL_AXES as PARAM_AXES
from jaxspec.model.params import Params, param_shapes

MESH_AXES = ("data", "model", "seq")
RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
    ("kv_seq", "seq"),
    ("embed", None),
    ("layers", None),
    ("tree", None),
)


def make_mesh(data: int = 1, model: int = 1, seq: int = 1, devices=None) -> Mesh:
    """A (data, model, seq) mesh over `devices` (default: all), Auto axes."""
    devices = list(jax.devices() if devices is None else devices)
    for name, n in zip(MESH_AXES, (data, model, seq), strict=True):
        if n < 1:
            raise ConfigError(f"mesh axis {name!r} must be >= 1, got {n}")
    if data * model * seq != len(devices):
        raise ConfigError(
            f"mesh data={data} × model={model} × seq={seq} = {data * model * seq} devices, but "
            f"{len(devices)} are given ({jax.default_backend()}; on CPU set "
            "jax_num_cpu_devices before JAX starts to simulate more)"
        )
    return jax.make_mesh(
        (data, model, seq), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices
    )


def logical_to_pspec(names, rules=RULES) -> PartitionSpec:
    """PartitionSpec of an array whose axes have these logical names (None = unnamed)."""
    table = dict(rules)
    for n in names:
        if n is not None and n not in table:
            raise ConfigError(f"logical axis {n!r} has no sharding rule (known: {sorted(table)})")
    return PartitionSpec(*(None if n is None else table[n] for n in names))


def constrain(x, names, rules=RULES):
    """`with_sharding_constraint` by logical names when a mesh is set (`jax.set_mesh`), else x
    unchanged. The model calls it at three boundaries: the embedded tokens, the KV cache write
    and the logits; everything else is left to XLA's propagation."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_pspec(names, rules)
    spec = PartitionSpec(*(a if a in mesh.axis_names else None for a in spec))
    return jax.lax.with_sharding_constraint(x, spec)


def check_divisible(cfg: ModelConfig, mesh: Mesh, batch: int | None = None) -> None:
    """Every sharded dimension must be a multiple of its mesh axis: one error naming both."""
    size = mesh.shape
    dims = {
        "model": [("query heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads),
                  ("MLP width", cfg.intermediate_size), ("vocabulary", cfg.vocab_size)],
        "data": [] if batch is None else [("batch", batch)],
    }  # fmt: skip
    for axis, entries in dims.items():
        n = size.get(axis, 1)
        for what, d in entries:
            if d % n:
                raise ConfigError(
                    f"mesh axis {axis!r} has {n} devices, which does not divide the {what} "
                    f"({d}) of {cfg.arch} model: choose a {axis} size that divides {d}"
                )


def _is_names(x) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules=RULES) -> Params:
    """A Params pytree of NamedShardings (None where the leaf is absent)."""
    check_divisible(cfg, mesh)
    shapes = param_shapes(cfg)

    def one(names, shape):
        return None if shape is None else NamedSharding(mesh, logical_to_pspec(names, rules))

    return jax.tree_util.tree_map(one, PARAM_AXES, shapes, is_leaf=_is_names)


def put(tree, shardings):
    """`jax.device_put` that also works across processes (`jax.distributed`): there every process
    holds the same full host value and builds its own devices' shards from it. `shardings`: one
    sharding for every leaf, or a pytree of them that is a prefix of `tree`'s."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, s):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys: shard their data
            data = np.asarray(jax.random.key_data(x))
            arr = jax.make_array_from_callback(data.shape, s, lambda idx: data[idx])
            return jax.random.wrap_key_data(arr, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    def subtree(s, sub):
        return jax.tree_util.tree_map(lambda x: one(x, s), sub)

    is_sharding = lambda s: isinstance(s, jax.sharding.Sharding)  # noqa: E731
    return jax.tree_util.tree_map(subtree, shardings, tree, is_leaf=is_sharding)


def gather(tree):
    """Every leaf as a full host numpy array, on every process (a sharded result spans the
    devices of all processes)."""
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree_util.tree_map(lambda x: multihost_utils.process_allgather(x, tiled=True), tree)


def shard_params(params: Params, cfg: ModelConfig, mesh: Mesh, rules=RULES) -> Params:
    return put(params, param_shardings(cfg, mesh, rules))


def cache_sharding(mesh: Mesh, rules=RULES) -> KVCache:
    """Shardings of a KVCache: k/v [L, B, K, S, E] by their logical names, lengths by batch."""
    kv = NamedSharding(mesh, logical_to_pspec(CACHE_AXES, rules))
    return KVCache(k=kv, v=kv, lengths=NamedSharding(mesh, logical_to_pspec(("batch",), rules)))


def state_shardings(state, batch: int, mesh: Mesh, rules=RULES):
    """Shardings for a decode state (`SpecState`, `DecodeState`, ...): KV caches by their
    logical names, every other array whose leading axis is the batch over `data`, the rest
    (step counters, the trees' static tables) replicated."""
    rows = NamedSharding(mesh, logical_to_pspec(("batch",), rules))
    rep = NamedSharding(mesh, PartitionSpec())
    caches = cache_sharding(mesh, rules)

    def one(x):
        if isinstance(x, KVCache):
            return caches
        shape = np.shape(x)
        return rows if len(shape) >= 1 and shape[0] == batch else rep

    return jax.tree_util.tree_map(one, state, is_leaf=lambda x: isinstance(x, KVCache))


def _check_leaf(path, x, sharding: NamedSharding) -> None:
    size = sharding.mesh.shape
    for dim, (d, axis) in enumerate(zip(np.shape(x), sharding.spec, strict=False)):
        n = size.get(axis, 1) if axis is not None else 1
        if d % n:
            raise ConfigError(
                f"mesh axis {axis!r} has {n} devices, which does not divide dimension {dim} "
                f"({d}) of the decode state's {jax.tree_util.keystr(path)} {list(np.shape(x))}"
            )


def shard_state(state, batch: int, cfg: ModelConfig, mesh: Mesh, rules=RULES):
    """The decode state placed on the mesh; every sharded dimension is checked to divide."""
    check_divisible(cfg, mesh, batch)
    shardings = state_shardings(state, batch, mesh, rules)
    jax.tree_util.tree_map_with_path(_check_leaf, state, shardings)
    return put(state, shardings)
