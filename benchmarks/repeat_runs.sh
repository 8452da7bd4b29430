#!/usr/bin/env bash
# The same example.py command, run N times in fresh processes while another process keeps both CPU cores
# busy, gives byte-identical prediction files; a run killed mid-way and rerun gives the same file too, also
# when the rerun's machine would choose another dtype (simulated with MOA_CPU_FLAGS). Prints one line per run
# with the file's SHA-256 and a verdict; exits 1 when any file differs.
#
#   bash benchmarks/repeat_runs.sh                          # 10 runs, --dtype auto as a CPU with avx512_bf16 chooses
#   RUNS=3 FLAGS="" bash benchmarks/repeat_runs.sh          # as a CPU without bf16 support chooses
set -euo pipefail
cd "$(dirname "$(realpath "$0")")/.."
RUNS=${RUNS:-10}
ROWS=${ROWS:-8}
FLAGS=${FLAGS-avx512_bf16}
MODEL=${MODEL:-models/smollm2}
[ -f "$MODEL/params.json" ] || python3 scripts/import_gguf.py --out "$MODEL"
WORK=$(mktemp -d)
LOADERS=()
trap 'kill "${LOADERS[@]}" 2>/dev/null || true; rm -rf "$WORK"' EXIT
python3 scripts/slice_data.py --rows "$ROWS" --out "$WORK/test.json" data/math/gsm8k/test.json >/dev/null
# other processes loading both cores, as on a shared machine (each one a plain busy loop, killed at exit)
for _ in 1 2; do
  python3 -c "while True: pass" &
  LOADERS+=($!)
done
run() {  # run OUT [extra env...]
  local out=$1; shift
  env "$@" python3 example.py --ckpt_dir "$MODEL" --data_path "$WORK/test.json" --save_path "$out" \
    --max_gen_len 48 --min_gen_len 0 --temperature 0 --max_batch_size 4 --dtype auto >"$out.log" 2>&1
}
status=0
run "$WORK/ref.jsonl" MOA_CPU_FLAGS="$FLAGS"
ref=$(sha256sum "$WORK/ref.jsonl" | cut -c1-16)
echo "reference: $ref ($(grep -m1 'dtype auto' "$WORK/ref.jsonl.log" || echo 'dtype as recorded'))"
for i in $(seq 2 "$RUNS"); do
  run "$WORK/run$i.jsonl" MOA_CPU_FLAGS="$FLAGS"
  h=$(sha256sum "$WORK/run$i.jsonl" | cut -c1-16)
  [ "$h" = "$ref" ] && verdict=identical || { verdict=DIFFERENT; status=1; }
  echo "run $i: $h $verdict"
done
# killed after the first batch, then rerun on a machine whose flags would choose the other dtype
other=$([ -n "$FLAGS" ] && echo "" || echo "avx512_bf16")
(run "$WORK/killed.jsonl" MOA_CPU_FLAGS="$FLAGS") &
pid=$!
# the partial file's first line is its settings header; a second line is the first row written
until [ -f "$WORK/killed.jsonl.partial" ] && [ "$(wc -l < "$WORK/killed.jsonl.partial")" -ge 2 ]; do
  sleep 0.2; kill -0 $pid 2>/dev/null || break
done
pkill -KILL -f "save_path $WORK/killed.jsonl" || true
wait $pid 2>/dev/null || true
run "$WORK/killed.jsonl" MOA_CPU_FLAGS="$other"
h=$(sha256sum "$WORK/killed.jsonl" | cut -c1-16)
[ "$h" = "$ref" ] && verdict=identical || { verdict=DIFFERENT; status=1; }
echo "killed, rerun with MOA_CPU_FLAGS='$other': $h $verdict ($(grep -m1 -o 'reusing [^)]*' "$WORK/killed.jsonl.log" || echo 'no reuse line'))"
exit $status
