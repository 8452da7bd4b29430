#!/usr/bin/env bash
# Every GPU measurement of benchmarks/ in one go (< 8 minutes on one H100/H200, every step at its limit), one
# Markdown file:
# a summary table (measurement, command, seconds, exit status) followed by each benchmark's own table.
#   bash benchmarks/gpu_suite.sh [OUT.md]          # default benchmarks/gpu_results.md
# Each step has its own time limit (seconds, below), so a slow or failing step cannot eat the others'.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/gpu_results.md}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
STEPS=(
  "120|8B train step: memory, tokens/s, MFU, with and without checkpointing|python benchmarks/bench_train.py --mode llama8b --rounds 3"
  "45|8B train step with --flash_attention2 (flash-attn)|python benchmarks/bench_train.py --mode llama8b --rounds 2 --grad_checkpointing on --attn_impl flash_attn"
  "80|example.py setting: batch 200 x 200 new tokens vs a batch-1 loop|python benchmarks/bench_generate.py --mode llama8b --device cuda"
  "100|the same with the captured decode step (CUDA graphs)|python benchmarks/bench_generate.py --mode llama8b --device cuda --compile_decode"
  "90|decoding overhead, 8 layers dim 64, batch 1, eager and captured step|python benchmarks/bench_decode.py --device cuda --rounds 1 --repeats 3"
  "25|flash-attn varlen vs SDPA + padding mask, 8B attention, 8 x 300 padded|python benchmarks/bench_varlen.py"
  "20|8B step memory estimate on fake tensors (CPU, for comparison with the measured peak)|python benchmarks/mem_estimate.py"
)
{
  echo "# GPU suite: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), $(date -u +%F)"
  echo
  echo "| measurement | command | seconds | exit |"
  echo "|---|---|---|---|"
} > "$OUT"
i=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r limit what cmd <<< "$step"
  i=$((i + 1))
  start=$(date +%s)
  timeout "$limit" bash -c "$cmd" > "$TMP/$i.txt" 2>&1
  rc=$?
  echo "| $what | \`$cmd\` | $(( $(date +%s) - start )) | $rc$([ $rc = 124 ] && echo ' (time limit)') |" >> "$OUT"
done
i=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r limit what cmd <<< "$step"
  i=$((i + 1))
  { echo; echo "## $what"; echo; echo '```'; tail -n 40 "$TMP/$i.txt"; echo '```'; } >> "$OUT"
done
echo "wrote $OUT"
