#!/usr/bin/env bash
# The paper's commonsense workflow: train on a mixture of the commonsense training sets -> extract
# -> generate on the seven commonsense test sets -> score (evaluate_commonsense.py). Settings are
# flags or environment variables of the same name, as in scripts/run_math.sh; the defaults are a
# small CPU run of Soft MoA (commonsense setting, --swi_x 0) on the bundled SmolLM2-135M.
#
#   bash scripts/run_commonsense.sh
#   bash scripts/run_commonsense.sh --method lora --out runs/cs_lora --baseline True
#
# The training mixture is the train.json of every commonsense set that has one under
# DATA_ROOT/commonsense (ARC-Challenge, ARC-Easy, boolq, openbookqa in data/), shuffled with
# --seed. The paper trains on the 170k-row mixture of LLM-Adapters: point --train_files at it.
# Flags as run_math.sh, with these defaults: --method (soft_moa_cs) --out (runs/commonsense_METHOD)
#   --train_rows (512; 0 = all) --test_rows (16; 0 = all) --max_gen_len (32) --min_gen_len (16)
#   --train_files (the train.json files above, space separated)
set -euo pipefail
SCRIPT=$(realpath "$0")
source "$(dirname "$SCRIPT")/methods.sh"
source "$(dirname "$SCRIPT")/pipeline.sh"
EXTRA_FLAGS="train_files"
parse_flags "$@"
cd "$(dirname "$SCRIPT")/.."
METHOD=${METHOD:-soft_moa_cs}
pipeline_defaults
OUT=${OUT:-$PWD/runs/commonsense_$METHOD}
TRAIN_ROWS=${TRAIN_ROWS:-512}
TEST_ROWS=${TEST_ROWS:-16}
MAX_GEN_LEN=${MAX_GEN_LEN:-32}
MIN_GEN_LEN=${MIN_GEN_LEN:-16}
SETS="boolq piqa social_i_qa ARC-Challenge ARC-Easy openbookqa winogrande"
TRAIN_FILES=${TRAIN_FILES:-$(ls "$DATA_ROOT"/commonsense/*/train.json)}
# shellcheck disable=SC2086  # a list of files
run_pipeline evaluate_commonsense.py commonsense $TRAIN_FILES
