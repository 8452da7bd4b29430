#!/usr/bin/env bash
# Training tokens/s of real runs in fp32 and under `--bf16 auto`, back to back on this machine.
# Each setting is one short main_finetune.py run of a method on the same GSM8K rows of the bundled
# SmolLM2-135M; the table gives the trainer's own tokens/s over its epoch (the `epoch` record of log.txt: real tokens, pads
# excluded) and what `auto` chose.
#
#   bash benchmarks/bench_train_dtype.sh                        # Soft MoA and LoRA, 64 rows, 1 epoch
#   ROWS=128 METHODS="soft_moa" bash benchmarks/bench_train_dtype.sh
set -euo pipefail
cd "$(dirname "$(realpath "$0")")/.."
source scripts/methods.sh
ROWS=${ROWS:-64}
METHODS=${METHODS:-"soft_moa lora"}
MODEL=${MODEL:-models/smollm2}
[ -f "$MODEL/params.json" ] || python3 scripts/import_gguf.py --out "$MODEL"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 - "$ROWS" "$WORK/train.json" <<'EOF'
import json, sys
rows = json.load(open("data/math/train/gsm8k_train.json"))[: int(sys.argv[1])]
json.dump(rows, open(sys.argv[2], "w"))
EOF
n_layers=$(python3 -c "import json; print(json.load(open('$MODEL/params.json'))['n_layers'] - 1)")
printf '| method | --bf16 | chose | tokens/s | peak mem (MB) |\n|---|---|---|---|---|\n' > "$WORK/table.md"
for method in $METHODS; do
  for bf16 in False auto; do
    out="$WORK/$method-$bf16"
    # shellcheck disable=SC2046  # method_flags is a list of flags
    python3 main_finetune.py --llama_path "$MODEL" --data_path "$WORK/train.json" $(method_flags "$method" "$n_layers") \
      --batch_size 8 --epochs 1 --warmup_epochs 0.1 --blr 0.032 --bf16 "$bf16" --max_seq_len 300 \
      --output_dir "$out" > "$out.txt" 2>&1 || { cat "$out.txt"; exit 1; }
    chose=$(grep -o 'auto -> [a-z0-9]*' "$out.txt" | head -n 1 | cut -d' ' -f3 || true)
    probe=$(grep -o 'auto:.*' "$out.txt" | head -n 1 || true)
    [ -n "$probe" ] && echo "$method: $probe"
    python3 - "$out/log.txt" "$method" "$bf16" "${chose:-float32}" >> "$WORK/table.md" <<'EOF'
import json, sys
epoch = [r for r in map(json.loads, filter(str.strip, open(sys.argv[1]))) if r["kind"] == "epoch"][-1]
print(f"| {sys.argv[2]} | {sys.argv[3]} | {sys.argv[4]} | {epoch['tokens_per_s']:.0f} | {epoch['peak_mem_mb']:.0f} |")
EOF
  done
done
cat "$WORK/table.md"
