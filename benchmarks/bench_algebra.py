"""LoRA algebra measurements on SmolLM2-135M: time and peak memory of merge / extract / export-peft /
import-peft, and the rank-vs-kept-energy table of a real fine-tuning delta.

    python scripts/import_gguf.py --out models/smollm2          # once (~30 s); models/ is git-ignored
    python benchmarks/bench_algebra.py                           # CPU, ~2-3 minutes on 2 cores
    python benchmarks/bench_algebra.py --train_rows 64 --batch_size 4 --max_seq_len 256 --threads 4

1. A real delta: a short `main_finetune.py` run (plain LoRA r8, `--type_router none`, Q,K,V,O,FFN_DOWN
   in every layer) on the first `--train_rows` rows of data/math/train/gsm8k_train.json, then
   `extract_adapter_from_checkpoint.py`; kept in `--work_dir` and reused on the next run.
2. Each operation runs in a fresh Python process (`--_op`), so its peak RSS (`ru_maxrss`, memory-mapped
   checkpoint pages that it touches included) is its own; the table gives wall seconds, the peak RSS and
   the peak above the process's RSS after its imports (torch, moa).
   merge: base + trained LoRA -> work_dir/merged (a new base-model directory, fp32 like the import).
   extract: `extract_lora_svd(base, merged, rank)`: one full SVD per site, so its cost barely depends on
   the rank; its singular values give the energy tables.
   export-peft / import-peft: the trained LoRA -> PEFT folder -> back to our format.
3. Prints the extracted LoRA's error against the trained one (the delta is exactly rank 8 up to fp32
   rounding of W + dW - W), then the kept energy per layer x target at `--rank` and by rank.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch

from llama.checkpoint import load_params
from moa.files.adapters import write_adapter_files
from moa.lora.algebra import (
    ExtractReport,
    energy_tables,
    extract_lora_svd,
    lora_delta,
    merge_into_base,
    read_plain_lora,
)
from moa.lora.peft import export_peft, import_peft

TARGETS = "Q,K,V,O,FFN_DOWN"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_op(op: str, model_dir: Path, work: Path, rank: int, targets: str) -> dict:
    """One operation in this (fresh) process; returns {seconds, peak_mb, baseline_mb}."""
    baseline = _rss_mb()
    adapter = work / "train" / "adapter.pth"
    for out in {"merge": [work / "merged"], "export": [work / "peft"], "import": [work / "imported"],
                "extract": [work / "extracted"]}[op]:
        shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    if op == "merge":
        merge_into_base(model_dir, adapter, work / "merged")
    elif op == "extract":
        cfg, state, report = extract_lora_svd(model_dir, work / "merged", rank, targets)
        write_adapter_files(work / "extracted", cfg, state)
    elif op == "export":
        export_peft(adapter, work / "peft", load_params(model_dir))
    else:
        import_peft(work / "peft", work / "imported", load_params(model_dir))
    seconds = time.perf_counter() - start
    if op == "extract":  # for the energy tables, outside the timing
        torch.save({"kept_energy": report.kept_energy, "singular_values": report.singular_values,
                    "other_changed": report.other_changed}, work / "extract_report.pt")
    return {"seconds": seconds, "peak_mb": _rss_mb(), "baseline_mb": baseline}


def train(model_dir: Path, work: Path, rows: int, data: Path, batch: int, seq_len: int, seed: int) -> Path:
    """A short plain-LoRA r8 run of main_finetune.py on `rows` rows (rows / batch AdamW steps); returns
    the adapter.pth."""
    adapter = work / "train" / "adapter.pth"
    if adapter.is_file():
        print(f"reusing the trained LoRA {adapter} (delete {work} to retrain)")
        return adapter
    work.mkdir(parents=True, exist_ok=True)
    subset = work / "train_rows.json"
    subset.write_text(json.dumps(json.loads(data.read_text())[:rows]))
    cmd = [sys.executable, "main_finetune.py", "--llama_path", str(model_dir), "--data_path", str(subset),
           "--output_dir", str(work / "train"), "--lora_layers", "0-30", "--lora_rank", "8", "--lora_alpha", "16",
           "--lora_targets", TARGETS, "--type_router", "none", "--epochs", "1", "--warmup_epochs", "0",
           "--batch_size", str(batch), "--accum_iter", "1", "--max_seq_len", str(seq_len), "--lr", "2e-3",
           "--min_lr", "2e-3", "--weight_decay", "0", "--device", "cpu", "--num_workers", "0", "--seed", str(seed)]
    print("training:", " ".join(cmd))
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    checkpoints = sorted((work / "train").glob("checkpoint-*.pth"))
    subprocess.run([sys.executable, "extract_adapter_from_checkpoint.py", "--checkpoint", str(checkpoints[-1])],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    print(f"trained in {time.perf_counter() - start:.0f} s ({rows} rows, batch {batch}, max_seq_len {seq_len}, "
          "1 epoch, lr 2e-3)")
    return adapter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", type=Path, default=ROOT / "models" / "smollm2")
    p.add_argument("--work_dir", type=Path, default=ROOT / "runs" / "bench_algebra")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "math" / "train" / "gsm8k_train.json")
    p.add_argument("--train_rows", type=int, default=8, help="training rows (rows / batch_size AdamW steps)")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--max_seq_len", type=int, default=128, help="training tokens per row")
    p.add_argument("--rank", type=int, default=8, help="extraction rank (the trained rank is 8)")
    p.add_argument("--energy_ranks", default="1,2,4,6,8,16")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads per operation (0: default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--_op", choices=["merge", "extract", "export", "import"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._op:
        print(json.dumps(run_op(args._op, args.model_dir, args.work_dir, args.rank, TARGETS)))
        return
    if not (args.model_dir / "params.json").is_file():
        sys.exit(f"{args.model_dir} is not a base-model directory: run "
                 f"`python scripts/import_gguf.py --out {args.model_dir}` first")

    adapter = train(args.model_dir, args.work_dir, args.train_rows, args.data, args.batch_size, args.max_seq_len,
                    args.seed)
    size_mb = sum(f.stat().st_size for f in args.model_dir.glob("consolidated.*.pth")) / 2**20
    dtype = next(t.dtype for t in torch.load(next(args.model_dir.glob("consolidated.*.pth")), mmap=True,
                                              weights_only=True).values() if t.is_floating_point())
    rows = []
    for op in ("merge", "extract", "export", "import"):
        cmd = [sys.executable, __file__, "--_op", op, "--model_dir", str(args.model_dir), "--work_dir",
               str(args.work_dir), "--rank", str(args.rank), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append((op, json.loads(out)))

    print(f"\nSmolLM2-135M ({args.model_dir}, {size_mb:.0f} MiB {dtype}), plain LoRA r8 on {TARGETS} x 30 layers, "
          f"torch threads {torch.get_num_threads() if not args.threads else args.threads}\n")
    print("| operation | seconds | peak RSS MiB | above post-import RSS MiB |\n|---|---|---|---|")
    names = {"merge": "merge (base + LoRA -> base dir)", "extract": f"extract_lora_svd (rank {args.rank})",
             "export": "export-peft", "import": "import-peft"}
    for op, r in rows:
        print(f"| {names[op]} | {r['seconds']:.2f} | {r['peak_mb']:.0f} | {r['peak_mb'] - r['baseline_mb']:.0f} |")

    saved = torch.load(args.work_dir / "extract_report.pt", weights_only=True)
    report = ExtractReport(saved["kept_energy"], saved["singular_values"], saved["other_changed"])
    trained, extracted = read_plain_lora(adapter), read_plain_lora(args.work_dir / "extracted")
    errors = [float((lora_delta(*extracted, s[:-7]) - lora_delta(*trained, s[:-7])).norm()
                    / lora_delta(*trained, s[:-7]).norm()) for s in trained[1] if s.endswith(".lora_A")]
    print(f"\nextracted rank-{args.rank} LoRA vs the trained one: max relative delta error {max(errors):.2e} "
          f"over {len(errors)} sites; non-target tensors changed: {report.other_changed or 'none'}\n")
    print(energy_tables(report, args.rank, [int(r) for r in args.energy_ranks.split(",")]))


if __name__ == "__main__":
    main()
