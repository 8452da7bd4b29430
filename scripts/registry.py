"""Edit a task-adapter registry (moa/tasks/registry.py), a JSON file {domain: {task: {adapter, data}}}:

    python scripts/registry.py add --registry tasks.json --domain math --task gsm8k \\
        --adapter runs/gsm8k/adapter.pth --data data/math/train/gsm8k_train.json
    python scripts/registry.py delete --registry tasks.json --task gsm8k
    python scripts/registry.py list --registry tasks.json        (also a domain/task/ directory tree)
    python scripts/registry.py list --data_config data.json --adapter_pool pool.json   (Adapters Selector's two files)
    python scripts/registry.py balance --registry tasks.json [--n_train N]
    python scripts/registry.py import --data_config data.json --adapter_pool pool.json --registry tasks.json

`balance` sets every task's `n_train` (rows the selector trains on) to N, default the smallest
task's row count. `import` writes an Adapters Selector data config (JSON {domain: {task: data_path}} or a tree
domain/task/train.json) and adapter pool (JSON {domain: {task: adapter_path}}) as one registry JSON
(example.py, train_selector.py and TaskRoutedModel also read the two files as they are: --data_config
--adapter_pool, `load_pool_registry`). After adding, deleting or balancing tasks, update the
selector (scripts/train_selector.py --update SELECTOR --action add|delete|balance).

Any adapter main_finetune.py writes can be registered: a plain LoRA (kind `lora`: routed per row in the
bank, fusable) or any other (kind `moa`: Soft / Sparse MoA, HydraLoRA, MoLoRA, prompt, parallel
adapter, ...: routed top-1 with its modules attached, never fused). `add` and `list` print each task's
kind and method, read from its adapter_params.json.
"""
from __future__ import annotations

import argparse
import sys

from moa.checks import check_writable
from moa.cli import one_line_errors
from moa.files.lock import OutputLock
from moa.tasks.registry import (
    Registry,
    add_task,
    balance_tasks,
    delete_task,
    registry_from_flags,
    save_registry,
    task_row_counts,
)
from moa.tasks.swap import describe_adapter


def format_registry(reg: Registry) -> str:
    counts = task_row_counts(reg)
    lines = [f"{reg.source}: {len(reg.entries)} tasks"]
    for e in reg.entries:
        n = f"{counts[e.task]} rows" + (f", n_train {e.n_train}" if e.n_train is not None else "")
        lines.append(f"  {e.domain}/{e.task}: {e.kind} adapter ({describe_adapter(e.adapter)}) {e.adapter}  "
                     f"data {e.data} ({n})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="register a task adapter and its training rows")
    add.add_argument("--domain", required=True)
    add.add_argument("--task", required=True)
    add.add_argument("--adapter", required=True, help="adapter.pth (or its folder), adapter_params.json beside it")
    add.add_argument("--data", required=True, help="the task's training rows (Alpaca JSON)")
    delete = sub.add_parser("delete", help="remove a task")
    delete.add_argument("--task", required=True)
    listing = sub.add_parser("list", help="print the tasks")
    bal = sub.add_parser("balance", help="set every task's n_train to the same count")
    bal.add_argument("--n_train", type=int, default=None, help="default: the smallest task's row count")
    imp = sub.add_parser("import", help="write an Adapters Selector data config + adapter pool as a registry JSON")
    for sp in sub.choices.values():
        sp.add_argument("--registry", required=sp is not listing,
                        help="registry JSON (list: also a domain/task/ tree; import: the file written)")
    for sp in (listing, imp):
        sp.add_argument("--data_config", default=None, required=sp is imp,
                        help="an Adapters Selector data config: JSON {domain: {task: data_path}} or a tree "
                             "domain/task/train.json")
        sp.add_argument("--adapter_pool", default=None, required=sp is imp,
                        help="an Adapters Selector adapter pool: JSON {domain: {task: adapter_path}}")
    return p


@one_line_errors("registry.py")
def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.command != "list":
            check_writable("registry", a.registry)
        if a.command == "add":
            reg = add_task(a.registry, a.domain, a.task, a.adapter, a.data)
        elif a.command == "delete":
            reg = delete_task(a.registry, a.task)
        elif a.command == "balance":
            reg = balance_tasks(a.registry, a.n_train)
        elif a.command == "import":
            with OutputLock(a.registry):
                save_registry(registry_from_flags(None, a.data_config, a.adapter_pool, "registry"), a.registry)
            reg = registry_from_flags(a.registry, registry_flag="registry")
        else:
            reg = registry_from_flags(a.registry, a.data_config, a.adapter_pool, "registry")
    except (FileNotFoundError, ValueError) as e:
        print(f"registry.py: error: {e}", file=sys.stderr)
        return 2
    print(format_registry(reg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
