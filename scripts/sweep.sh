#!/usr/bin/env bash
# The training sweeps of docs/results.md, one job at a time; each run's eval JSON lands in $OUT as it ends.
#   bash scripts/sweep.sh TASK [OUT=runs/sweep-TASK]
#   RUNS="lora matryoshka lora-r1 matryoshka-scaled matryoshka-slice" (the default; also lora-slice, dylora,
#   matryoshka-binary, matryoshka-sqrt (scaling sqrt), dylora-standard (any rank 1..32 per step, scaled
#   by alpha / b with alpha 32: the DyLoRA paper's form), and lora-rN for any rank N)    LR=1e-3  SEED=0  EPOCHS (arithmetic 2, sst2 4)  NUM_TEST (arithmetic 600, sst2 500)
#   SPLIT=dev: evaluate on the dev split (all of it, for picking the lr) into NAME.dev.json instead
# Common recipe: all 7 projections, batch 16, AdamW, linear decay, 5 % warm-up, scaling none, bf16 autocast
# where the CPU has AVX512-BF16; eval: greedy, on the serving engine, ranks 1-32. Every output name ends in
# -lr$LR-s$SEED except at the defaults (lr 1e-3, seed 0), which keep the plain names the docs link to.
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${1:?usage: sweep.sh TASK [OUT]}
OUT=${2:-runs/sweep-$TASK}
RUNS=${RUNS:-"lora matryoshka lora-r1 matryoshka-scaled matryoshka-slice"}
LR=${LR:-1e-3}
SEED=${SEED:-0}
case $TASK in
  arithmetic) EPOCHS=${EPOCHS:-2} NUM_TEST=${NUM_TEST:-600} EVERY=46 ;;  # 2200 train rows: 276 steps
  sst2)       EPOCHS=${EPOCHS:-4} NUM_TEST=${NUM_TEST:-500} EVERY=17 MAX_LEN=112 ;;  # 272 train rows: 68 steps
  *)          EPOCHS=${EPOCHS:-1} NUM_TEST=${NUM_TEST:-500} EVERY=50 ;;
esac
SUFFIX=""
[ "$LR" = 1e-3 ] && [ "$SEED" = 0 ] || SUFFIX="-lr$LR-s$SEED"
CLI=(.venv/bin/matryoshka-lora)
COMMON=(--task "$TASK" --epochs "$EPOCHS" --batch-size 16 --lr "$LR" --seed "$SEED" --scaling none
        --rank-loss-every "$EVERY" --max-seq-len "${MAX_LEN:-64}")
SPLIT=${SPLIT:-test}
EXT=.json
[ "$SPLIT" = test ] || { EXT=.$SPLIT.json; NUM_TEST=1000; }
EVAL=(--task "$TASK" --num-test "$NUM_TEST" --split "$SPLIT")
mkdir -p "$OUT"
run() {  # run NAME: train, then eval what it wrote
  local name=$1 started=$SECONDS o="$OUT/$1$SUFFIX"
  case $name in
    lora|matryoshka|matryoshka-binary|dylora)  # the raw adapter (-raw) and its SVD-nested form
                 "${CLI[@]}" train "${COMMON[@]}" --method "$name" --rank 32 --nest --out "$o-r32-nested"
                 "${CLI[@]}" eval "$o-r32-nested-raw" "$o-r32-nested" "${EVAL[@]}" --out "$o$EXT" ;;
    matryoshka-sqrt)  # s_r = 1 / sqrt(r), alpha sqrt(32): rank 32 served at weight 1, as with scaling none
                 "${CLI[@]}" train "${COMMON[@]/none/sqrt}" --method matryoshka --rank 32 --alpha 5.656854 --nest --out "$o-r32-nested"
                 "${CLI[@]}" eval "$o-r32-nested-raw" "$o-r32-nested" "${EVAL[@]}" --out "$o$EXT" ;;
    dylora-standard)  # b uniform in 1..32 each step, scaled by alpha / b (scaling rank, alpha 32)
                 "${CLI[@]}" train "${COMMON[@]/none/rank}" --method dylora --rank 32 --train-ranks "$(seq -s, 1 32)" \
                     --alpha 32 --nest --out "$o-r32-nested"
                 "${CLI[@]}" eval "$o-r32-nested-raw" "$o-r32-nested" "${EVAL[@]}" --ranks 1,2,4,8,16,32 --out "$o$EXT" ;;
    matryoshka-scaled)  # needs the matryoshka run: its nested adapter plus a per-rank scale fitted on dev
                 local m="$OUT/matryoshka$SUFFIX-r32-nested"
                 rm -rf "$m-scaled"; cp -r "$m" "$m-scaled"
                 "${CLI[@]}" fit-scales "$m-scaled" --task "$TASK"
                 "${CLI[@]}" eval "$m-scaled" "${EVAL[@]}" --out "$o$EXT" ;;
    matryoshka-slice) "${CLI[@]}" train "${COMMON[@]}" --method matryoshka --rank 32 --slice-loss 1 --nest --out "$o-r32"
                 "${CLI[@]}" eval "$o-r32-raw" "$o-r32" "${EVAL[@]}" --out "$o$EXT" ;;
    lora-slice)  "${CLI[@]}" train "${COMMON[@]}" --method lora --rank 32 --slice-loss 1 --no-nest --out "$o-r32"
                 "${CLI[@]}" eval "$o-r32" "${EVAL[@]}" --out "$o$EXT" ;;
    lora-r[0-9]*)  # a plain LoRA trained at one rank alone: the per-rank reference
                 local r=${name#lora-r}
                 "${CLI[@]}" train "${COMMON[@]}" --method lora --rank "$r" --train-ranks "$r" --no-nest --out "$o"
                 "${CLI[@]}" eval "$o" "${EVAL[@]}" --out "$o$EXT" ;;
    *) echo "unknown run $name" >&2; exit 2 ;;
  esac
  echo "run $name$SUFFIX done in $((SECONDS - started)) s" | tee -a "$OUT/done.txt"
}
for name in $RUNS; do run "$name" > "$OUT/$name$SUFFIX.log" 2>&1; done
