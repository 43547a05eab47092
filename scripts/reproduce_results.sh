#!/usr/bin/env bash
# Reproduce docs/results.md: LoRA, DyLoRA and Matryoshka at r_max=32 with the same budget, plain LoRA
# trained at r=4 and r=16, the SVD-nested LoRA baseline, and the rank sweep of all of them.
#   bash scripts/reproduce_results.sh [OUT_DIR]       (default runs/repro; logs in OUT_DIR/*.log)
# Knobs (environment): TASK STEPS LR BATCH NUM_TEST SEED TARGETS
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/repro}
TASK=${TASK:-reverse}
STEPS=${STEPS:-80}
LR=${LR:-2e-3}
BATCH=${BATCH:-16}
NUM_TEST=${NUM_TEST:-200}
SEED=${SEED:-0}
TARGETS=${TARGETS:-q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj}
CLI=(nice -n 10 .venv/bin/python -m matryoshka_lora.cli)
mkdir -p "$OUT"
log() { echo "$(date +%T) $*" | tee -a "$OUT/timings.log"; }

train() {  # name method rank
  local started=$SECONDS
  log "train $1 ($2, rank $3)"
  "${CLI[@]}" train --task "$TASK" --method "$2" --rank "$3" --max-steps "$STEPS" --batch-size "$BATCH" \
    --lr "$LR" --seed "$SEED" --targets "$TARGETS" --out "$OUT/$1" >"$OUT/$1.log" 2>&1
  log "done $1 in $((SECONDS - started)) s"
}

train matryoshka-r32 matryoshka 32
train lora-r32 lora 32
train dylora-r32 dylora 32
train lora-r16 lora 16
train lora-r4 lora 4

log "SVD baseline: export lora-r32 at rank 32 as PEFT, import it back (nested by SVD)"
"${CLI[@]}" export "$OUT/lora-r32" --rank 32 --out "$OUT/lora-r32-peft" >"$OUT/svd.log" 2>&1
"${CLI[@]}" import "$OUT/lora-r32-peft" --out "$OUT/lora-r32-svd" --name lora-r32-svd >>"$OUT/svd.log" 2>&1

started=$SECONDS
log "eval"
"${CLI[@]}" eval "$OUT/matryoshka-r32" "$OUT/dylora-r32" "$OUT/lora-r32" "$OUT/lora-r32-svd" "$OUT/lora-r16" "$OUT/lora-r4" \
  --task "$TASK" --ranks 1,2,4,8,16,32 --num-test "$NUM_TEST" --out "$OUT/results.json" --plot "$OUT/rank_accuracy.png" \
  >"$OUT/eval.log" 2>&1
log "eval done in $((SECONDS - started)) s"
cat "$OUT/eval.log" | grep -v " INFO \| WARNING " || true
