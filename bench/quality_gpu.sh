#!/usr/bin/env bash
# The long-context retrieval model and the accuracy of FastKV and generated-token sparsification on
# it, on one GPU (issue: quality). Stage 1 learns recall on short contexts (fast), stage 2 goes on
# at 512-16k tokens; then `epdserve bench quality` serves it on the GPU. Writes under $1
# (default bench/results/quality-gpu): retrieval/ (the checkpoint), bench/quality.{json,md}.
#
#     bash bench/quality_gpu.sh [OUT_DIR]
set -euo pipefail
out=${1:-bench/results/quality-gpu}
short_steps=${SHORT_STEPS:-3000}
long_steps=${LONG_STEPS:-1500}
python -m quality.train_retrieval --device cuda --out "$out/retrieval-short" --steps "$short_steps" \
    --batch-size 64 --min-context 64 --max-context 512 --eval-every 500 --eval-examples 200
python -m quality.train_retrieval --device cuda --start-from "$out/retrieval-short" --out "$out/retrieval" \
    --seed 1 --steps "$long_steps" --batch-size 16 --min-context 512 --max-context 16384 --lr 5e-4 \
    --warmup-steps 50 --eval-every 500 --eval-examples 100
python -m quality.bench --device cuda --scorers --no-mom --examples 0 --retrieval-model "$out/retrieval" \
    --fastkv-contexts 4096 8192 16384 --retrieval-examples 100 --copy-context 4096 --out "$out/bench"
