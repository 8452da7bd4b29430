# The research workflow as shell functions: data slices -> train -> extract -> generate -> score.
# Sourced by scripts/run_math.sh and scripts/run_commonsense.sh, which set the benchmark's sets and
# defaults; every setting is an environment variable or the same name as a flag (--method X sets
# METHOD=X, --train_rows 8 sets TRAIN_ROWS=8, ...). Every step is resumable: a finished checkpoint,
# adapter or prediction file is left alone, an interrupted training resumes from its last checkpoint.

# parse_flags "$@": turn `--name value` (or `--name=value`) into the variable NAME=value.
parse_flags() {
  while [ $# -gt 0 ]; do
    local key=$1 value
    case $key in
      -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
      --*=*) value=${key#*=}; key=${key%%=*} ;;
      --*) [ $# -ge 2 ] || { echo "error: $key needs a value" >&2; exit 2; }; value=$2; shift ;;
      *) echo "error: unexpected argument '$key' (flags are --name value; see --help)" >&2; exit 2 ;;
    esac
    key=${key#--}
    case $key in *[!a-zA-Z0-9_]*|"") echo "error: bad flag name '--$key'" >&2; exit 2 ;; esac
    export "$(echo "$key" | tr '[:lower:]' '[:upper:]')=$value"
    shift
  done
}

# pipeline_defaults: the settings both benchmarks share (a small CPU run on the bundled model).
pipeline_defaults() {
  MODEL=${MODEL:-models/smollm2}
  DATA_ROOT=${DATA_ROOT:-data}
  METHOD=${METHOD:-soft_moa}
  NPROC=${NPROC:-1}
  SEED=${SEED:-0}
  EPOCHS=${EPOCHS:-1}
  WARMUP=${WARMUP:-0.2}
  BATCH=${BATCH:-8}
  ACCUM=${ACCUM:-$(( 32 / NPROC / BATCH > 0 ? 32 / NPROC / BATCH : 1 ))}
  BLR=${BLR:-6e-3}
  BF16=${BF16:-False}
  GRAD_CKPT=${GRAD_CKPT:-False}
  NUM_WORKERS=${NUM_WORKERS:-0}
  MAX_SEQ_LEN=${MAX_SEQ_LEN:-300}
  MAX_BATCH=${MAX_BATCH:-16}
  TEMPERATURE=${TEMPERATURE:-0}
  TOP_P=${TOP_P:-0.75}
  BASELINE=${BASELINE:-False}     # True: also score the bare base model (under $OUT/base)
  if [ ! -f "$MODEL/params.json" ]; then
    echo "error: no base model at $MODEL (params.json missing); for the bundled one run:" \
         "python scripts/import_gguf.py --out $MODEL" >&2
    exit 2
  fi
  N_LAYERS=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['n_layers'])" "$MODEL/params.json")
  ADAPTER_FLAGS=$(method_flags "$METHOD" "$N_LAYERS")
  if [ "$NPROC" -gt 1 ]; then LAUNCH=(torchrun --nproc_per_node "$NPROC"); else LAUNCH=(python3); fi
}

# now: seconds since the epoch, with microseconds.
now() { echo "$EPOCHREALTIME"; }

# record_time FILE KEY T0 T1: set KEY to T1 - T0 seconds in the JSON object of FILE.
record_time() {
  python3 -c "import json,os,sys; f,k,a,b=sys.argv[1:]; d=json.load(open(f)) if os.path.exists(f) else {}; d[k]=round(float(b)-float(a),1); json.dump(d,open(f,'w'))" "$@"
}

# prepare_data TRAIN_ROWS TEST_ROWS SUBDIR TRAIN_FILE...: slices under $OUT/data (train.json and
# SUBDIR/SET/test.json for each of $SETS); 0 rows means all of them.
prepare_data() {
  local train_rows=$1 test_rows=$2 subdir=$3; shift 3
  python3 scripts/slice_data.py --rows "$train_rows" --seed "$SEED" --out "$OUT/data/train.json" "$@"
  for ds in $SETS; do
    python3 scripts/slice_data.py --rows "$test_rows" --out "$OUT/data/$ds/test.json" \
      "$DATA_ROOT/$subdir/$ds/test.json"
  done
}

# train_and_extract: main_finetune.py (resuming from the newest checkpoint when one exists), then
# extract_adapter_from_checkpoint.py; records the training wall time in $OUT/timing.json.
train_and_extract() {
  local last=$(( EPOCHS - 1 ))
  if [ ! -f "$OUT/checkpoint-$last.pth" ]; then
    local resume=() prev t0
    prev=$(ls "$OUT"/checkpoint-*.pth 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$prev" ] && resume=(--resume "$prev")
    t0=$(now)
    # shellcheck disable=SC2086  # ADAPTER_FLAGS is a list of flags
    "${LAUNCH[@]}" main_finetune.py --llama_path "$MODEL" --data_path "$OUT/data/train.json" \
      --data_root "$DATA_ROOT" $ADAPTER_FLAGS --seed "$SEED" --max_seq_len "$MAX_SEQ_LEN" \
      --batch_size "$BATCH" --accum_iter "$ACCUM" --epochs "$EPOCHS" --warmup_epochs "$WARMUP" \
      --blr "$BLR" --bf16 "$BF16" --grad_checkpointing "$GRAD_CKPT" --weight_decay 0.02 \
      --num_workers "$NUM_WORKERS" --output_dir "$OUT" "${resume[@]}"
    record_time "$OUT/timing.json" train_s "$t0" "$(now)"
  fi
  [ -f "$OUT/adapter.pth" ] || python3 extract_adapter_from_checkpoint.py --checkpoint "$OUT/checkpoint-$last.pth"
}

# generate_all DIR [ADAPTER]: predictions DIR/SET_predict.jsonl for each of $SETS.
generate_all() {
  local dir=$1 adapter=() t0
  [ $# -ge 2 ] && adapter=(--adapter_path "$2")
  mkdir -p "$dir"
  t0=$(now)
  for ds in $SETS; do
    "${LAUNCH[@]}" example.py --ckpt_dir "$MODEL" "${adapter[@]}" \
      --data_path "$OUT/data/$ds/test.json" --save_path "$dir/${ds}_predict.jsonl" \
      --max_gen_len "$MAX_GEN_LEN" --min_gen_len "$MIN_GEN_LEN" --max_seq_len "$MAX_SEQ_LEN" \
      --max_batch_size "$MAX_BATCH" --temperature "$TEMPERATURE" --top_p "$TOP_P"
  done
  record_time "$dir/timing.json" infer_s "$t0" "$(now)"
}

# run_pipeline EVALUATOR TRAIN_ROWS TEST_ROWS SUBDIR TRAIN_FILE...: the whole workflow.
run_pipeline() {
  local evaluator=$1 first
  first=$(echo "$SETS" | cut -d' ' -f1)
  shift
  mkdir -p "$OUT/data"
  prepare_data "$@"
  train_and_extract
  generate_all "$OUT" "$OUT/adapter.pth"
  if [ "$BASELINE" = True ]; then
    generate_all "$OUT/base"
    echo "== bare base model ($MODEL)"
    python3 "$evaluator" --predict_file "$OUT/base/${first}_predict.jsonl"
  fi
  echo "== $METHOD adapters ($OUT/adapter.pth)"
  python3 "$evaluator" --predict_file "$OUT/${first}_predict.jsonl"
}
