#!/usr/bin/env bash
# Issue 4's benchmark: Sequoia `--tree auto` vs chains vs the k-ary tree of auto's node budget
# (KARY_TREE, default kary_3x1), same trained draft, 60 Spec-Bench prompts (10 per category),
# batch 1 and 8, T = 0 and 0.6.
#
#   bash scripts/bench_sequoia.sh OUT_DIR [KARY_TREE]
#
# 1. times the target and the draft (`jaxspec profile device`) into
#    configs/profiles/device__<device>__smollm2-135m__draft.toml;
# 2. prints Sequoia's topology table for the committed acceptance profiles of the draft
#    (T = 0 and 0.6; `jaxspec profile topology`, also written to configs/profiles/);
# 3. runs `jaxspec bench` four times (every speedup is against AR of the same run), writing
#    OUT_DIR/b<batch>_T<temp>.md and .json.
# Needs the trained draft (`jaxspec train-draft`, issue 7) and ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/bench_sequoia.sh OUT_DIR [KARY_TREE]}
kary=${2:-kary_3x1}
mkdir -p "$out"
device=$(python -c "import jax; d = jax.devices()[0]; print(f'{d.platform}-{d.device_kind}'.replace(' ', '_').replace('/', '_'))")
table=configs/profiles/device__${device}__smollm2-135m__draft.toml
draft=(--drafter model --draft smollm2-135m-draft)
if [[ ! -f $table ]]; then
  jaxspec profile device "${draft[@]}" --batches 1,8 --contexts 256,1024 \
    --tokens 1,2,4,8,16,32 --reps 5 --out "$table"
fi
for t in 0 0.6; do
  jaxspec profile topology --acceptance "smollm2-135m__draft__T$t" --device "$table" \
    --out "configs/profiles/topology__${device}__smollm2-135m__draft__T$t.toml" | tee "$out/topology_T$t.md"
done
prompts=../shared/data/spec_bench/question.jsonl
# Most informative first: batch 1 then 8 greedy, then T = 0.6. At batch 1 also the DP tree of 7
# nodes for the run's acceptance profile (and, greedy, the complete binary tree of 7 nodes).
for run in "1 0 chain:2,tree:sequoia7_draft_T0,tree:kary_2x2" "8 0 tree:$kary" \
           "1 0.6 tree:sequoia7_draft_T06" "8 0.6 "; do
  read -r b t extra <<< "$run"
  methods="ar,tree:auto,chain:1${extra:+,$extra}"
  jaxspec bench --prompts-file "$prompts" --per-category 10 "${draft[@]}" \
    --device-profile "$table" --methods "$methods" --max-new-tokens 64 --batch-size "$b" \
    --temperature "$t" --out-md "$out/b${b}_T$t.md" --json "$out/b${b}_T$t.json" \
    2> "$out/b${b}_T$t.log"
done
