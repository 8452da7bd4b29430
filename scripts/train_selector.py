"""Train a task selector for a task-adapter registry (moa/tasks/selector.py):

    python scripts/train_selector.py --adapter_registry tasks.json --ckpt_dir models/smollm2 \\
        --out selector.pt --kind mlp [--rows_per_task 256 --heldout_per_task 32]
    python scripts/train_selector.py ... --kind nearest --metric cos|ip|l2 --n_clusters 16

Embeds every task's own training rows (balanced per task; the registry's `n_train` caps them) with
the frozen base, fits the selector, prints the held-out routing accuracy per task and writes the
selector file (its config and that report inside).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llama.checkpoint import load_model  # noqa: E402
from moa.cli import str2bool  # noqa: E402
from moa.files.lock import OutputLock  # noqa: E402
from moa.tasks.registry import load_registry  # noqa: E402
from moa.tasks.selector import METRICS, SELECTOR_KINDS, save_selector, train_on_registry  # noqa: E402


def format_report(report: dict) -> str:
    """The held-out routing accuracy, per task and overall, as a few lines."""
    held = report.get("heldout")
    lines = [f"selector train accuracy {report['train']:.3f} ({report['train_rows_per_task']} rows per task)"]
    if held:
        lines.append(f"held-out routing accuracy {held['accuracy']:.3f} ({report['heldout_rows_per_task']} rows "
                     "per task):")
        lines += [f"  {task:<24} {acc:.3f}" for task, acc in held["per_task"].items()]
        lines.append("  confusion (true -> chosen): " + json.dumps(held["confusion"]))
    cal = report.get("calibration")
    if cal:
        lines.append(f"softmax temperature fitted on the held-out rows: {cal['temperature']:.3g} (held-out NLL "
                     f"{cal['nll_before']:.3f} -> {cal['nll_after']:.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter_registry", required=True, help="registry JSON or domain/task/ tree")
    p.add_argument("--ckpt_dir", required=True, help="base-model directory (the frozen base that embeds)")
    p.add_argument("--out", required=True, help="selector file to write")
    p.add_argument("--kind", default="mlp", choices=SELECTOR_KINDS)
    p.add_argument("--rows_per_task", type=int, default=256, help="training rows per task (balanced; at most)")
    p.add_argument("--heldout_per_task", type=int, default=32, help="rows per task held out for the report")
    p.add_argument("--max_tokens", type=int, default=256, help="prompt tokens embedded per row")
    p.add_argument("--hidden", type=int, default=256, help="mlp: hidden width")
    p.add_argument("--steps", type=int, default=300, help="mlp: full-batch AdamW steps")
    p.add_argument("--lr", type=float, default=1e-3, help="mlp: learning rate")
    p.add_argument("--metric", default="cos", choices=METRICS, help="nearest: distance")
    p.add_argument("--n_clusters", type=int, default=16, help="nearest: k-means centroids kept per task")
    p.add_argument("--temperature", type=float, default=0.1, help="nearest: softmax temperature of task scores")
    p.add_argument("--standardize", type=str2bool, default=True, help="z-score the embeddings first")
    p.add_argument("--calibrate", type=str2bool, default=True,
                   help="fit the softmax temperature on the held-out rows (temperature scaling), so that top-p "
                        "fusion sees calibrated probabilities; routing by argmax is unchanged")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embed_batch_size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    lock = OutputLock(a.out)  # held until the selector file is written
    try:
        lock.acquire()
        reg = load_registry(a.adapter_registry)
        model, tokenizer = load_model(a.ckpt_dir, device=a.device)
        sel = train_on_registry(model, tokenizer, reg, a.kind, a.rows_per_task, a.heldout_per_task,
                                a.embed_batch_size, a.calibrate, max_tokens=a.max_tokens, hidden=a.hidden, steps=a.steps,
                                lr=a.lr, metric=a.metric, n_clusters=a.n_clusters, temperature=a.temperature,
                                standardize=a.standardize, seed=a.seed)
    except (FileNotFoundError, ValueError) as e:
        lock.release()
        print(f"train_selector.py: error: {e}", file=sys.stderr)
        return 2
    try:
        print(format_report(sel.report))
        print(f"wrote {save_selector(sel, a.out)}")
    finally:
        lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
