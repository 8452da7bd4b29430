#!/usr/bin/env bash
# The CPU benchmark figures for two checkouts, back to back on this machine (compare the ratios: absolute
# times drift ~10% between runs):
#
#     git worktree add /tmp/before <older commit>        # or: git archive <commit> | tar -x -C /tmp/before
#     bash benchmarks/compare_trees.sh /tmp/before > compare.txt
#
# decoding overhead (bench_decode.py, both trees timed in turns), the training step in bf16 and fp32
# (bench_train.py: ours against transformers + PEFT, and the bf16 matmul floor), forward+backward per
# adapter kind (bench_moa.py: Soft MoA / LoRA, Sparse MoA at 50% / Soft MoA), and this tree's generation on
# the bundled SmolLM2 in example.py's default dtype (auto; eager and with the captured decode step) and in
# fp32 against transformers' fp32.
set -u
BEFORE=$(cd "${1:?usage: compare_trees.sh BEFORE_DIR}" && pwd)
AFTER=$(cd "$(dirname "$0")/.." && pwd)
echo "### $(date -u), $(lscpu | sed -n 's/^Model name: *//p'), before $BEFORE, after $AFTER"
echo "### decoding overhead"
(cd "$AFTER" && OMP_NUM_THREADS=1 python benchmarks/bench_decode.py --before "$BEFORE" --rounds 5 --repeats 3)
for dtype in bfloat16 float32; do
  for tree in "$BEFORE" "$AFTER"; do
    echo "### training step, $dtype, $tree"
    (cd "$tree" && OMP_NUM_THREADS=2 python benchmarks/bench_train.py --rounds 3 --dtype $dtype | grep -E "^\||floor|Sparse MoA:")
  done
done
for tree in "$BEFORE" "$AFTER"; do
  echo "### forward+backward per adapter kind, $tree (glibc keeping freed memory in both: see bench_moa.py)"
  (cd "$tree" && MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776 OMP_NUM_THREADS=2 python benchmarks/bench_moa.py | tail -11)
done
for tree in "$BEFORE" "$AFTER"; do
  echo "### generation, ours auto against transformers fp32, $tree"
  (cd "$tree" && OMP_NUM_THREADS=2 python benchmarks/bench_llama.py --model smollm2 --ours_dtype auto --batch_sizes 8 --repeat 3 | grep -E "^\||SmolLM2")
done
echo "### generation, ours auto with the captured decode step against transformers fp32"
(cd "$AFTER" && OMP_NUM_THREADS=2 python benchmarks/bench_llama.py --model smollm2 --ours_dtype auto --batch_sizes 8 --repeat 3 --compile_decode | grep -E "^\||SmolLM2")
echo "### generation, fp32 against fp32"
(cd "$AFTER" && OMP_NUM_THREADS=2 python benchmarks/bench_llama.py --model smollm2 --batch_sizes 8 --repeat 3 | grep -E "^\||SmolLM2")
