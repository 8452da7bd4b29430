"""LoraHub: search the weights of a linear combination of task LoRAs on a few examples (CMA-ES from
the `cma` package, few-shot loss + L1 on the weights) and write the combined LoRA (moa/tasks/lorahub.py):

    python scripts/lorahub.py --ckpt_dir models/smollm2 --adapters A/adapter.pth B/adapter.pth C/adapter.pth \\
        --data few_shot.json --steps 100 --out runs/lorahub/adapter.pth [--l1 0.05 --seed 0]

`--data` is an Alpaca JSON list ({instruction, input, output}); the loss is the label cross-entropy
of the outputs. Writes adapter.pth + adapter_params.json (a plain LoRA, usable with
example.py --adapter_path) and lorahub.json (weights, losses, every evaluation) beside it.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from llama.checkpoint import load_model
from moa.cli import error_line
from moa.files.adapters import write_adapter_files
from moa.tasks.lorahub import INITS, LoraHubConfig, lorahub
from moa.train.data import load_rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt_dir", required=True, help="base-model directory")
    p.add_argument("--adapters", nargs="+", required=True, help="plain LoRA files (adapter.pth or folders), >= 2")
    p.add_argument("--data", required=True, help="few-shot examples (Alpaca JSON)")
    p.add_argument("--out", required=True, help="combined adapter.pth to write")
    p.add_argument("--steps", type=int, default=100, help="CMA-ES objective evaluations")
    p.add_argument("--l1", type=float, default=0.05, help="weight of sum |w_i| in the objective")
    p.add_argument("--bound", type=float, default=1.5, help="each weight in [-bound, bound]")
    p.add_argument("--sigma0", type=float, default=0.5, help="CMA-ES initial step size")
    p.add_argument("--init", default="uniform", choices=INITS, help="start at 1/N each, or 0 (LoraHub's)")
    p.add_argument("--seed", type=int, default=0, help="CMA-ES seed (same seed, same weights)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_seq_len", type=int, default=512, help="tokens per example")
    p.add_argument("--method", default="cat", choices=("cat", "svd"),
                   help="cat: the exact combined LoRA (rank = sum of ranks); svd: its best rank-r approximation "
                        "(r = --rank)")
    p.add_argument("--lorahub_mode", default="delta", choices=("delta", "ab"),
                   help="delta: search and write sum_i w_i dW_i (exact); ab: LoraHub's own composition "
                        "(sum_i w_i B_i)(sum_i w_i A_i), as published LoraHub numbers were made")
    p.add_argument("--rank", type=int, default=None, help="--method svd: output rank (default: largest input rank)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        cfg = LoraHubConfig(steps=a.steps, l1=a.l1, bound=a.bound, sigma0=a.sigma0, init=a.init, seed=a.seed,
                            batch_size=a.batch_size, max_seq_len=a.max_seq_len, mode=a.lorahub_mode)
        rows = load_rows(a.data)
        model, tokenizer = load_model(a.ckpt_dir, device=a.device, max_seq_len=a.max_seq_len)
        result, combined_cfg, state = lorahub(model, tokenizer, a.adapters, rows, cfg, a.method, a.rank)
    except (OSError, ValueError) as e:
        print(f"lorahub.py: error: {error_line(e)}", file=sys.stderr)
        return 2
    path = write_adapter_files(a.out, combined_cfg, state)
    report = {"adapters": [str(Path(x).resolve()) for x in a.adapters], "config": asdict(cfg), "method": a.method,
              "weights": result.weights, "loss": result.loss, "objective": result.objective,
              "start_weights": result.start_weights, "start_loss": result.start_loss,
              "evaluations": result.evaluations}
    (path.parent / "lorahub.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"weights {[round(w, 4) for w in result.weights]}: few-shot loss {result.loss:.4f} "
          f"(start {result.start_loss:.4f} at {result.start_weights}), {len(result.evaluations)} evaluations")
    print(f"wrote {path} (rank {combined_cfg.lora_rank}) and {path.parent / 'lorahub.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
