"""Edit a task-adapter registry (moa/tasks/registry.py), a JSON file {domain: {task: {adapter, data}}}:

    python scripts/registry.py add --registry tasks.json --domain math --task gsm8k \\
        --adapter runs/gsm8k/adapter.pth --data data/math/train/gsm8k_train.json
    python scripts/registry.py delete --registry tasks.json --task gsm8k
    python scripts/registry.py list --registry tasks.json        (also a domain/task/ directory tree)
    python scripts/registry.py balance --registry tasks.json [--n_train N]

`balance` sets every task's `n_train` (rows the selector trains on) to N, default the smallest
task's row count. After adding or deleting a task, retrain the selector (scripts/train_selector.py).

Any adapter main_finetune.py writes can be registered: a plain LoRA (kind `lora`: routed per row in the
bank, fusable) or any other (kind `moa`: Soft / Sparse MoA, HydraLoRA, MoLoRA, prompt, parallel
adapter, ...: routed top-1 with its modules attached, never fused). `add` and `list` print each task's
kind and method, read from its adapter_params.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moa.checks import check_writable  # noqa: E402
from moa.cli import one_line_errors  # noqa: E402
from moa.tasks.registry import Registry, add_task, balance_tasks, delete_task, load_registry, task_row_counts  # noqa: E402
from moa.tasks.swap import describe_adapter  # noqa: E402


def format_registry(reg: Registry) -> str:
    counts = task_row_counts(reg)
    lines = [f"{reg.source}: {len(reg.entries)} tasks"]
    for e in reg.entries:
        n = f"{counts[e.task]} rows" + (f", n_train {e.n_train}" if e.n_train is not None else "")
        lines.append(f"  {e.domain}/{e.task}: {e.kind} adapter ({describe_adapter(e.adapter)}) {e.adapter}  "
                     f"data {e.data} ({n})")
    return "\n".join(lines)


@one_line_errors("registry.py")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="register a task adapter and its training rows")
    add.add_argument("--domain", required=True)
    add.add_argument("--task", required=True)
    add.add_argument("--adapter", required=True, help="adapter.pth (or its folder), adapter_params.json beside it")
    add.add_argument("--data", required=True, help="the task's training rows (Alpaca JSON)")
    delete = sub.add_parser("delete", help="remove a task")
    delete.add_argument("--task", required=True)
    sub.add_parser("list", help="print the tasks")
    bal = sub.add_parser("balance", help="set every task's n_train to the same count")
    bal.add_argument("--n_train", type=int, default=None, help="default: the smallest task's row count")
    for sp in sub.choices.values():
        sp.add_argument("--registry", required=True, help="registry JSON (list: also a domain/task/ tree)")
    a = p.parse_args(argv)
    try:
        if a.command != "list":
            check_writable("registry", a.registry)
        if a.command == "add":
            reg = add_task(a.registry, a.domain, a.task, a.adapter, a.data)
        elif a.command == "delete":
            reg = delete_task(a.registry, a.task)
        elif a.command == "balance":
            reg = balance_tasks(a.registry, a.n_train)
        else:
            reg = load_registry(a.registry)
    except (FileNotFoundError, ValueError) as e:
        print(f"registry.py: error: {e}", file=sys.stderr)
        return 2
    print(format_registry(reg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
