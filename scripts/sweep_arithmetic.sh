#!/usr/bin/env bash
# The arithmetic sweep of docs/results.md, one job at a time; each run's eval JSON lands in $OUT as it ends.
#   bash scripts/sweep_arithmetic.sh [OUT=runs/sweep]
#   RUNS="lora matryoshka lora-r1 matryoshka-scaled matryoshka-slice" (the default; also lora-slice, lora-r4,
#   lora-r16, dylora)
# Common recipe: allenai/basic_arithmetic (2200 train rows), all 7 projections, 2 epochs at batch 16
# (276 steps), AdamW lr 1e-3, linear decay, 5 % warm-up, seed 0, scaling none, bf16 autocast where the
# CPU has AVX512-BF16; eval: 600 test rows, greedy, on the serving engine, ranks 1-32.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/sweep}
RUNS=${RUNS:-"lora matryoshka lora-r1 matryoshka-scaled matryoshka-slice"}
CLI=(.venv/bin/matryoshka-lora)
COMMON=(--task arithmetic --epochs 2 --batch-size 16 --lr 1e-3 --seed 0 --scaling none --rank-loss-every 46)
EVAL=(--task arithmetic --num-test 600)
mkdir -p "$OUT"
run() {  # run NAME: train, then eval what it wrote
  local name=$1 started=$SECONDS
  case $name in
    lora)        "${CLI[@]}" train "${COMMON[@]}" --method lora --rank 32 --nest --out "$OUT/lora-r32-nested"
                 "${CLI[@]}" eval "$OUT/lora-r32-nested-raw" "$OUT/lora-r32-nested" "${EVAL[@]}" --out "$OUT/lora.json" ;;
    matryoshka)  "${CLI[@]}" train "${COMMON[@]}" --method matryoshka --rank 32 --nest --out "$OUT/matryoshka-r32-nested"
                 "${CLI[@]}" eval "$OUT/matryoshka-r32-nested-raw" "$OUT/matryoshka-r32-nested" "${EVAL[@]}" --out "$OUT/matryoshka.json" ;;
    matryoshka-scaled)  # needs the matryoshka run: its nested adapter plus a per-rank scale fitted on dev
                 rm -rf "$OUT/matryoshka-r32-nested-scaled"; cp -r "$OUT/matryoshka-r32-nested" "$OUT/matryoshka-r32-nested-scaled"
                 "${CLI[@]}" fit-scales "$OUT/matryoshka-r32-nested-scaled" --task arithmetic
                 "${CLI[@]}" eval "$OUT/matryoshka-r32-nested-scaled" "${EVAL[@]}" --out "$OUT/matryoshka-scaled.json" ;;
    matryoshka-slice) "${CLI[@]}" train "${COMMON[@]}" --method matryoshka --rank 32 --slice-loss 1 --nest --out "$OUT/matryoshka-r32-slice"
                 "${CLI[@]}" eval "$OUT/matryoshka-r32-slice-raw" "$OUT/matryoshka-r32-slice" "${EVAL[@]}" --out "$OUT/matryoshka-slice.json" ;;
    lora-slice)  "${CLI[@]}" train "${COMMON[@]}" --method lora --rank 32 --slice-loss 1 --no-nest --out "$OUT/lora-r32-slice"
                 "${CLI[@]}" eval "$OUT/lora-r32-slice" "${EVAL[@]}" --out "$OUT/lora-slice.json" ;;
    lora-r1)     "${CLI[@]}" train "${COMMON[@]}" --method lora --rank 1 --no-nest --out "$OUT/lora-r1"
                 "${CLI[@]}" eval "$OUT/lora-r1" "${EVAL[@]}" --out "$OUT/lora-r1.json" ;;
    lora-r4)     "${CLI[@]}" train "${COMMON[@]}" --method lora --rank 4 --train-ranks 4 --no-nest --out "$OUT/lora-r4"
                 "${CLI[@]}" eval "$OUT/lora-r4" "${EVAL[@]}" --out "$OUT/lora-r4.json" ;;
    lora-r16)    "${CLI[@]}" train "${COMMON[@]}" --method lora --rank 16 --train-ranks 16 --no-nest --out "$OUT/lora-r16"
                 "${CLI[@]}" eval "$OUT/lora-r16" "${EVAL[@]}" --out "$OUT/lora-r16.json" ;;
    dylora)      "${CLI[@]}" train "${COMMON[@]}" --method dylora --rank 32 --nest --out "$OUT/dylora-r32-nested"
                 "${CLI[@]}" eval "$OUT/dylora-r32-nested-raw" "$OUT/dylora-r32-nested" "${EVAL[@]}" --out "$OUT/dylora.json" ;;
    *) echo "unknown run $name" >&2; exit 2 ;;
  esac
  echo "run $name done in $((SECONDS - started)) s" | tee -a "$OUT/done.txt"
}
for name in $RUNS; do run "$name" > "$OUT/$name.log" 2>&1; done
