"""Time the attention kernels against the XLA reference and the memory-bandwidth floor (GPU).

    python scripts/bench_kernels.py [--quick] [--sweep] [--e2e] [--json FILE]

Per (batch B, context, tree nodes N): one layer's tree attention with SmolLM2-135M's attention
shape (9 query heads, 3 KV heads, head dim 64, bf16 cache), the Pallas kernel vs the jnp reference
compiled by XLA, and the floor = bytes of K/V the row lengths cover / measured device bandwidth
(a large elementwise pass, bytes read + written). Also the sparse-KV kernel on MagicDec-style
sink + window block lists, and (--e2e) greedy decoding of a random-weight model with SmolLM2's
shape, kernels on vs off: tokens must be identical, decode time is compared. Times are device
times per call (50 chained calls inside one jitted loop, median of 3); compile time is excluded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels.common import BlockSizes  # noqa: E402
from pallas_kernels.sparse_kv_attention import sparse_kv_attention  # noqa: E402
from pallas_kernels.tree_attention import tree_attention  # noqa: E402

H, K, E = 9, 3, 64  # SmolLM2-135M


def timed(f, *args, n: int = 50, reps: int = 3) -> float:
    """Median device seconds per call of f(*args): n calls chained inside one jitted loop (each
    call's query depends on the previous output, so nothing is hoisted and host dispatch is paid
    once per n calls, not per call)."""

    def loop(*a):
        def body(i, c):
            out = f(a[0] + c.astype(a[0].dtype), *a[1:])
            first = jax.tree_util.tree_leaves(out)[0].ravel()[0]
            return jnp.where(jnp.isnan(first), 1.0, 0.0).astype(jnp.float32)  # 0, not foldable

        return jax.lax.fori_loop(0, n, body, jnp.zeros((), jnp.float32))

    g = jax.jit(loop)
    jax.block_until_ready(g(*args))
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(g(*args))
        out.append((time.perf_counter() - t) / n)
    return statistics.median(out)


def bandwidth() -> float:
    x = jnp.ones((256 << 20,), jnp.float32)  # 1 GiB
    f = jax.jit(lambda a: a + 1.0)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * x.nbytes / best


def inputs(B, ctx, T, dtype=jnp.bfloat16, seed=0):
    S = ctx + T
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, H, E), dtype)
    kc = jax.random.normal(ks[1], (B, K, S, E), dtype)
    vc = jax.random.normal(ks[2], (B, K, S, E), dtype)
    kn = jax.random.normal(ks[3], (B, T, K, E), dtype)
    vn = jax.random.normal(ks[4], (B, T, K, E), dtype)
    parent = np.maximum(np.arange(T) - 1, 0) // 2  # a binary tree, depth-major
    anc = np.eye(T, dtype=bool)
    for i in range(1, T):
        anc[i] |= anc[parent[i]]
    lengths = jnp.full((B,), ctx, jnp.int32)
    return q, kc, vc, lengths, kn, vn, jnp.asarray(anc)[None]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


_REF: dict = {}  # (B, ctx, T) -> (reference output, reference seconds): one per shape


def tree_row(B, ctx, T, bw, bs=None):
    args = inputs(B, ctx, T)
    ker = jax.jit(lambda *a: tree_attention(*a, impl="pallas", block_sizes=bs))
    if (B, ctx, T) not in _REF:
        ref = jax.jit(lambda *a: tree_attention(*a, impl="reference"))
        try:
            t_ref = timed(ref, *args)
        except Exception as e:  # noqa: BLE001 - report an out-of-memory reference, keep going
            print(f"reference failed at B={B} ctx={ctx} N={T}: {type(e).__name__}", flush=True)
            t_ref = float("nan")
        _REF[(B, ctx, T)] = (np.asarray(ref(*args), np.float32), t_ref)
    ref_out, t_ref = _REF[(B, ctx, T)]
    err = rel_err(ker(*args), ref_out)
    t_ker = timed(ker, *args)
    t_call = timed(*pallas_call_only(args, bs or BlockSizes()))
    kv_bytes = 2 * B * K * ctx * E * 2
    floor = kv_bytes / bw
    return dict(op="tree", B=B, ctx=ctx, nodes=T, kernel_us=t_ker * 1e6, xla_us=t_ref * 1e6,
                pallas_call_us=t_call * 1e6,
                floor_us=floor * 1e6, vs_floor=t_ker / floor, vs_xla=t_ref / t_ker,
                rel_err=err)  # fmt: skip


def pallas_call_only(args, bs: BlockSizes):
    """The pallas_call alone (no query/key layout or merge around it): (function, *inputs)."""
    from pallas_kernels import common
    from pallas_kernels.tree_attention import kernel

    q, kc, vc, lengths, kn, vn, anc = args
    B, T, _, _ = q.shape
    bq, Rp = common.row_tiling(T * (H // K), bs.block_q)
    qg = common.group_queries(q, K, Rp)
    kn, vn, mask = common.tree_keys(kn, vn, anc, H // K, Rp)
    splits = common.auto_splits(bs.num_splits, -(-kc.shape[2] // bs.block_kv), B * K * (Rp // bq))
    kw = dict(bq=bq, block_kv=bs.block_kv, num_splits=splits, block_sizes=bs,
              interpret=not common.on_gpu())  # fmt: skip
    f = jax.jit(lambda *a: kernel.partials(*a, **kw))
    return f, qg, kc, vc, lengths, kn, vn, mask


def sparse_row(B, ctx, T, bw, sink=64, window=1024, block=64):
    q, kc, vc, lengths, kn, vn, anc = inputs(B, ctx, T)
    nb = -(-(ctx + T) // block)
    last = ctx // block
    ids = list(range(sink // block)) + list(range(last - window // block, last + 1))
    blocks = jnp.broadcast_to(jnp.asarray(ids, jnp.int32), (B, K, len(ids)))
    assert max(ids) < nb
    args = (q, kc, vc, lengths, blocks, kn, vn, anc)
    ref = jax.jit(lambda *a: sparse_kv_attention(*a, block_size=block, impl="reference"))
    ker = jax.jit(lambda *a: sparse_kv_attention(*a, block_size=block, impl="pallas"))
    dense = jax.jit(lambda q, kc, vc, ln, bl, kn, vn, m: tree_attention(q, kc, vc, ln, kn, vn, m,
                                                                        impl="pallas"))  # fmt: skip
    err = rel_err(ker(*args), ref(*args))
    read = min(ctx, sink + window)
    floor = 2 * B * K * read * E * 2 / bw
    t_ker = timed(ker, *args)
    return dict(op="sparse", B=B, ctx=ctx, nodes=T, blocks=len(ids), kernel_us=t_ker * 1e6,
                xla_us=timed(ref, *args) * 1e6, dense_kernel_us=timed(dense, *args) * 1e6,
                floor_us=floor * 1e6, vs_floor=t_ker / floor, rel_err=err)  # fmt: skip


def sweep(bw, B=8, ctx=8192, nodes=64):
    """Kernel parameters at one configuration (default the goal: B=8, 8K context, 64 nodes), in
    two stages: sequence splits x exp flavour at the default tiles, then the tiles at the best
    of those."""
    rows = []

    def one(bs: BlockSizes):
        try:
            r = tree_row(B, ctx, nodes, bw, bs)
        except Exception as e:  # noqa: BLE001 - a tiling the compiler rejects
            print(f"{bs}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            return None
        r.update(dataclasses.asdict(bs))
        print(f"  sweep kv={bs.block_kv:4d} q={bs.block_q:4d} w={bs.num_warps} s={bs.num_stages} "
              f"P={bs.num_splits} fast_exp={bs.fast_exp}: {r['kernel_us']:8.1f} us "
              f"(call {r['pallas_call_us']:.1f}, x floor {r['vs_floor']:.2f})",
              flush=True)  # fmt: skip
        rows.append(r)
        return r

    for fast in (True, False):
        for splits in (None, 2, 3, 4, 6, 8, 11, 16):
            one(BlockSizes(num_splits=splits, fast_exp=fast))
    best = min(rows, key=lambda r: r["kernel_us"])
    base = dict(num_splits=best["num_splits"], fast_exp=best["fast_exp"])
    for bkv in (32, 64, 128):
        for bq in (64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    one(BlockSizes(block_kv=bkv, block_q=bq, num_warps=warps, num_stages=stages,
                                   **base))  # fmt: skip
    best = min(rows, key=lambda r: r["kernel_us"])
    print(f"  sweep best: {best['kernel_us']:.1f} us with " + ", ".join(
        f"{k}={best[k]}" for k in ("block_kv", "block_q", "num_warps", "num_stages",
                                   "num_splits", "fast_exp")), flush=True)  # fmt: skip
    return rows


def e2e(B=8, ctx=4096, new=64, dtype="bfloat16"):
    """Greedy decode of a random SmolLM2-shaped model: kernels on vs off. In float32 (matmuls at
    full precision) the tokens must be identical; in bf16 different summation orders may flip
    near-tied argmaxes of a random model, so only the times are compared."""
    from jaxspec.config import ModelConfig
    from jaxspec.drafting import layer_skip
    from jaxspec.model import init_params
    from jaxspec.sampling import SamplingParams
    from jaxspec.speculative import SpecConfig, spec_decode, spec_prefill_jit
    from jaxspec.trees import chain, kary

    cfg = ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                      max_position_embeddings=8192, tie_word_embeddings=True)  # fmt: skip
    params = init_params(cfg, jax.random.key(0), scale=0.5)
    params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(4, 49152, (B, ctx)), jnp.int32)
    lengths = jnp.full((B,), ctx, jnp.int32)
    max_new = jnp.full((B,), new, jnp.int32)
    rows = []
    for name, tree in (("ar", chain(0)), ("kary_2x5 (62 nodes)", kary(2, 5))):
        toks = {}
        for impl in ("reference", "pallas"):
            tcfg = dataclasses.replace(cfg, attention=impl)
            dcfg, dparams = layer_skip(params, tcfg, (0, 29))
            spec = SpecConfig(tcfg, dcfg, tree, "greedy")

            def run(spec=spec, dparams=dparams):
                st = spec_prefill_jit(params, dparams, prompts, lengths, jax.random.key(0),
                                      SamplingParams.make(B), max_new, spec=spec,
                                      max_new_tokens=new, chunk=512)  # fmt: skip
                jax.block_until_ready(st)
                t = time.perf_counter()
                st = spec_decode(params, dparams, st, spec)
                jax.block_until_ready(st)
                return st, time.perf_counter() - t

            run()  # compile
            st, dt = min((run() for _ in range(3)), key=lambda r: r[1])
            toks[impl] = np.asarray(st.tokens)
            emitted = int(np.asarray(st.n_out).sum())
            rows.append(dict(method=name, attention=impl, B=B, ctx=ctx, dtype=dtype, decode_s=dt,
                             tok_per_s=emitted / dt, steps=int(st.steps)))  # fmt: skip
            print(f"  e2e {dtype} {name:20s} {impl:9s}: {dt * 1e3:8.1f} ms, "
                  f"{emitted / dt:8.1f} tok/s, {int(st.steps)} steps", flush=True)  # fmt: skip
        same = bool((toks["reference"] == toks["pallas"]).all())
        rows[-1]["identical"] = rows[-2]["identical"] = same
        print(f"  e2e {name}: identical tokens = {same}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few configurations only")
    ap.add_argument("--sweep", action="store_true", help="block-size sweep at B=8, 8K, 64 nodes")
    ap.add_argument("--e2e", nargs="?", const="both", choices=("both", "bfloat16", "float32"),
                    help="end-to-end decode, kernels on vs off")  # fmt: skip
    ap.add_argument("--no-grid", action="store_true", help="skip the B x context x nodes grid")
    ap.add_argument("--once", action="store_true",
                    help="one kernel call at the goal shape, for a profiler")  # fmt: skip
    ap.add_argument("--json", type=Path, help="write all rows here")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}", flush=True)
    if args.once:
        a = inputs(8, 8192, 64)
        f = jax.jit(lambda *x: tree_attention(*x, impl="pallas"))
        jax.block_until_ready(f(*a))
        return 0
    bw = bandwidth()
    print(f"measured bandwidth: {bw / 1e9:.0f} GB/s", flush=True)
    report = dict(device=dev.device_kind, jax=jax.__version__, bandwidth_gbs=bw / 1e9,
                  date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv), rows=[])  # fmt: skip
    rows = report["rows"]
    if args.sweep:
        rows += sweep(bw)
    if not args.no_grid:
        grid = (
            [(8, 8192, 64), (1, 2048, 16)]
            if args.quick
            else [(B, ctx, n) for B in (1, 8, 32) for ctx in (2048, 8192, 32768) for n in (16, 64)]
        )
        print(f"{'B':>3} {'ctx':>6} {'N':>3} {'kernel us':>10} {'xla us':>10} {'floor us':>9} "
              f"{'x floor':>8} {'xla/kern':>8} {'rel err':>8} {'call us':>8}",
              flush=True)  # fmt: skip
        for B, ctx, n in grid:
            r = tree_row(B, ctx, n, bw)
            rows.append(r)
            print(f"{B:3d} {ctx:6d} {n:3d} {r['kernel_us']:10.1f} {r['xla_us']:10.1f} "
                  f"{r['floor_us']:9.1f} {r['vs_floor']:8.2f} {r['vs_xla']:8.2f} "
                  f"{r['rel_err']:8.1e} {r['pallas_call_us']:8.1f}", flush=True)  # fmt: skip
        for B, ctx in ((8, 8192), (32, 32768)) if not args.quick else ((8, 8192),):
            r = sparse_row(B, ctx, 4, bw)
            rows.append(r)
            print(f"sparse B={B} ctx={ctx} blocks={r['blocks']}: kernel {r['kernel_us']:.1f} us, "
                  f"xla {r['xla_us']:.1f} us, dense kernel {r['dense_kernel_us']:.1f} us, "
                  f"{r['vs_floor']:.2f}x floor, err {r['rel_err']:.1e}", flush=True)  # fmt: skip
    if args.e2e in ("both", "bfloat16"):
        rows += e2e()
    if args.e2e in ("both", "float32"):
        with jax.default_matmul_precision("highest"):
            rows += e2e(dtype="float32")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
