"""Acceptance and cost of a draft model for a target, measured on evaluation prompts.

    python scripts/eval_draft.py --draft smollm2-135m-draft \
        --prompts-file ../shared/data/spec_bench/question.jsonl --per-category 16 \
        [--max-new-tokens 128] [--width 8] [--gammas 1,2,3,4,5,6] [--out FILE.json]

1. The target's greedy continuations of the prompts (jaxspec's batched AR generation, chat
   template applied), cached in `--continuations FILE.npz` when given.
2. Teacher-forced, one draft forward per sequence: at every continuation position, the rank of
   the target's greedy token among the draft's scores. Greedy speculation emits exactly these
   tokens, so this gives, exactly (up to float ties):
     alpha  = P(draft argmax == target token)        (per-token greedy acceptance)
     p_k    = P(target token is the draft's rank-k token), k = 1..W (Sequoia's positional
              acceptance vector at T = 0, what `jaxspec profile acceptance --temperature 0`
              measures with one-level width-W trees), and the mass the draft cannot propose
              (tokens outside a reduced draft vocabulary);
     chains = for each γ, the walk of greedy chain speculation over the continuation: tokens
              per target step (tau) and per-depth acceptance P(depth d | depth d−1).
3. Cost: one jitted forward of 1 token per row at batch 1 over a cache of `--context` tokens,
   draft vs target (median of `--reps`), and the predicted chain speedup
   tau / (1 + (γ + 1)·c) with c the draft/target step ratio (the draft runs γ + 1 passes per
   step in `jaxspec.speculative`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def continuations(model, texts, max_new, batch, cache_file):
    from jaxspec.runner import GenerateOptions, Runner

    ids = [model.tokenizer.encode(t) for t in texts]
    if cache_file is not None and Path(cache_file).is_file():
        z = np.load(cache_file, allow_pickle=False)
        if int(z["max_new"]) == max_new and len(z["lengths"]) == len(ids):
            flat, lens = z["flat"], z["lengths"]
            outs = np.split(flat, np.cumsum(lens)[:-1])
            return ids, [o.tolist() for o in outs], 0.0
    t0 = time.perf_counter()
    outs, _ = Runner(model.params, model.cfg).run(
        ids, GenerateOptions(max_new_tokens=max_new, batch_size=batch)
    )
    secs = time.perf_counter() - t0
    if cache_file is not None:
        np.savez(cache_file, flat=np.concatenate([np.asarray(o, np.int32) for o in outs]),
                 lengths=np.asarray([len(o) for o in outs]), max_new=max_new)  # fmt: skip
    return ids, outs, secs


def draft_ranks(dcfg, dparams, prompts, outs, batch: int = 4) -> list[np.ndarray]:
    """Per sequence: rank (1 = draft argmax; 0 = not proposable) of each continuation token."""
    from jaxspec.drafting.vocab import VocabDraft, model_params
    from jaxspec.kv_cache import init_cache
    from jaxspec.model import forward_hidden

    if isinstance(dparams, VocabDraft):
        head, ids = dparams.head, np.asarray(dparams.ids)
    else:
        p = dparams
        head = p.embed.T if p.lm_head is None else p.lm_head
        ids = np.arange(dcfg.vocab_size)
    col = np.full(dcfg.vocab_size, -1, np.int32)
    col[ids] = np.arange(len(ids))
    params = model_params(dparams)

    @jax.jit
    def ranks(params, head, toks, tgt_col):
        B, T = toks.shape
        cache = init_cache(dcfg, B, 1, params.embed.dtype)
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        h, _ = forward_hidden(params, dcfg, toks, pos, cache)
        z = jnp.einsum("btm,mv->btv", h, head)
        s = jnp.take_along_axis(z, jnp.maximum(tgt_col, 0)[..., None], -1)
        r = jnp.sum(z > s, axis=-1) + 1
        return jnp.where(tgt_col >= 0, r, 0)

    seqs = [p + o for p, o in zip(prompts, outs, strict=True)]
    order = np.argsort([len(s) for s in seqs])
    result = [None] * len(seqs)
    for start in range(0, len(seqs), batch):
        rows = order[start : start + batch]
        T = max(128, 1 << (max(len(seqs[r]) for r in rows) - 1).bit_length())
        toks = np.zeros((batch, T), np.int32)
        tgt = np.full((batch, T), -1, np.int32)
        for i, r in enumerate(rows):
            s = seqs[r]
            toks[i, : len(s)] = s
            nxt = np.asarray(s[1:], np.int32)
            tgt[i, : len(s) - 1] = col[nxt]
        rk = np.asarray(ranks(params, head, jnp.asarray(toks), jnp.asarray(tgt)))
        for i, r in enumerate(rows):
            pl = len(prompts[r])
            # position pl - 1 + j predicts continuation token j
            result[r] = rk[i, pl - 1 : pl - 1 + len(outs[r])]
    return result


def chain_walk(match: np.ndarray, gamma: int) -> tuple[int, int, np.ndarray]:
    """(steps, emitted tokens, accept histogram [gamma + 1]) of greedy chain speculation over one
    continuation whose token j is drafted correctly iff match[j] (token 0 comes from prefill)."""
    n = len(match)
    j, steps, hist = 1, 0, np.zeros(gamma + 1, np.int64)
    while j < n:
        a = 0
        while a < gamma and j + a < n and match[j + a]:
            a += 1
        steps += 1
        hist[a] += 1
        j += a + 1
    return steps, n - 1, hist


def main(argv=None) -> int:
    from jaxspec.bench import select_prompts
    from jaxspec.cli import read_prompt_records
    from jaxspec.drafting.vocab import load_draft
    from jaxspec.models import load_model
    from jaxspec.profiling import time_forward

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--draft", required=True, help="draft checkpoint (name or dir)")
    ap.add_argument("--full-vocab", action="store_true", help="ignore draft_vocab.npy")
    ap.add_argument("--prompts-file", type=Path, required=True)
    ap.add_argument("--per-category", type=int)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--gammas", default="1,2,3,4,5,6")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--continuations", type=Path, help="cache of the target's continuations")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    model = load_model(args.model, progress=False)
    draft = load_model(args.draft, progress=False)
    dcfg, dparams = load_draft(draft, full_vocab=args.full_vocab)
    recs = select_prompts(read_prompt_records(args.prompts_file), args.limit, args.per_category)
    texts = [t for t, _ in recs]
    cats = [c for _, c in recs]
    prompts, outs, gen_s = continuations(model, texts, args.max_new_tokens, args.batch_size,
                                         args.continuations)  # fmt: skip
    ranks = draft_ranks(dcfg, dparams, prompts, outs)
    allr = np.concatenate(ranks)
    W = args.width
    report = {"target": args.model, "draft": args.draft, "prompts_file": str(args.prompts_file),
              "prompts": len(texts), "continuation_tokens": int(len(allr)),
              "target_generation_s": round(gen_s, 1),
              "alpha": float((allr == 1).mean()),
              "p": [float((allr == k).mean()) for k in range(1, W + 1)],
              "not_proposable": float((allr == 0).mean())}  # fmt: skip
    report["alpha_per_category"] = {
        c: float(
            np.mean(np.concatenate([r for r, cc in zip(ranks, cats, strict=True) if cc == c]) == 1)
        )  # fmt: skip
        for c in sorted({c for c in cats if c is not None})
    }
    t_target = time_forward(model.params, model.cfg, 1, args.context, 1, args.reps)
    t_draft = time_forward(dparams, dcfg, 1, args.context, 1, args.reps)
    c = t_draft / t_target
    report.update(context=args.context, target_step_ms=t_target * 1e3,
                  draft_step_ms=t_draft * 1e3, draft_over_target=c)  # fmt: skip
    chains = {}
    for g in (int(x) for x in args.gammas.split(",")):
        steps, emitted, hist = 0, 0, np.zeros(g + 1, np.int64)
        for r in ranks:
            s, e, h = chain_walk(r == 1, g)
            steps, emitted, hist = steps + s, emitted + e, hist + h
        reach = hist[::-1].cumsum()[::-1]
        tau = emitted / max(steps, 1)
        chains[g] = {"tau": tau, "per_depth": [float(reach[d] / reach[d - 1]) if reach[d - 1]
                                               else 0.0 for d in range(1, g + 1)],
                     "predicted_speedup": tau / (1 + (g + 1) * c)}  # fmt: skip
    report["chains"] = chains
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
