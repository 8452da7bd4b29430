"""Train a task selector for a task-adapter registry (moa/tasks/selector.py), or update one in place
(moa/tasks/selector_update.py):

    python scripts/train_selector.py --adapter_registry tasks.json --ckpt_dir models/smollm2 \\
        --out selector.pt --kind mlp [--rows_per_task 256 --heldout_per_task 32]
    python scripts/train_selector.py ... --kind nearest --metric cos|ip|l2 --n_clusters 16
    python scripts/train_selector.py ... --encoder hidden|hidden:LAYER|input_embedding \\
        --use_instruction True --use_input True --use_output False
    python scripts/train_selector.py --data_config data.json --adapter_pool pool.json ...   (Adapters Selector)
    python scripts/train_selector.py --adapter_registry tasks.json --ckpt_dir models/smollm2 \\
        --update selector.pt --action add|balance|delete --mode new|mix [--reduce_ratio 0.5] --out selector.pt

Embeds every task's own training rows (balanced per task; the registry's `n_train` caps them) with
the frozen base, fits the selector, prints the held-out routing accuracy per task and writes the
selector file (its config and that report inside). `--update OLD` compares the registry as it
stands with the old selector's classes and rows and updates it (`--action` must match what changed);
it keeps the old selector's kind, embedding and structure flags (giving one with another value is an
error). Embeddings are cached in `--embed_cache` (default: `embed_cache/` beside `--out`), so that an
update embeds only the rows the base never embedded before.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from llama.checkpoint import load_model
from moa.cli import error_line, str2bool
from moa.files.lock import OutputLock
from moa.tasks.embedding import ENCODERS, EmbedConfig, EmbeddingCache, base_identity
from moa.tasks.registry import registry_from_flags
from moa.tasks.selector import METRICS, SELECTOR_KINDS, Selector, load_selector, save_selector, train_on_registry
from moa.tasks.selector_update import UPDATE_ACTIONS, UPDATE_MODES, plan_update, update_selector

# Flags an update takes from the old selector (its kind, embedding, structure and row split); None = not given.
KEPT_BY_UPDATE = ("kind", "encoder", "max_tokens", "use_instruction", "use_input", "use_output", "hidden", "metric",
                  "n_clusters", "temperature", "standardize", "seed")
EMBEDDING = ("encoder", "max_tokens", "use_instruction", "use_input", "use_output")  # EmbedConfig's fields
TRAINING = ("steps", "lr")  # config fields an update may change
DEFAULT_KIND = "mlp"
DEFAULT_HELDOUT = 32
NO_CACHE = "none"


def format_report(report: dict) -> str:
    """The training rows, the held-out routing accuracy per task and overall, and the fitted
    temperature, as a few lines."""
    counts = report.get("train_rows") or {}
    rows = (f"{report['train_rows_per_task']} rows per task" if len(set(counts.values())) <= 1
            else "rows " + json.dumps(counts))
    train = "-" if report["train"] is None else f"{report['train']:.3f}"
    lines = [f"selector train accuracy {train} ({rows})"]
    update = report.get("update")
    if update:
        lines.append(f"updated ({update['action']}, --mode {update['mode']}"
                     + (f", --reduce_ratio {update['reduce_ratio']}" if update["reduce_ratio"] is not None else "")
                     + f") from tasks {update['from_tasks']}: added {update['added']}, removed {update['removed']}, "
                       f"rows changed {update['changed']}")
    held = report.get("heldout")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter_registry", default=None, help="registry JSON or domain/task/ tree")
    p.add_argument("--data_config", default=None, help="instead of --adapter_registry: an Adapters Selector data "
                   "config, JSON {domain: {task: data_path}} or a tree domain/task/train.json (with --adapter_pool)")
    p.add_argument("--adapter_pool", default=None, help="an Adapters Selector adapter pool, JSON "
                   "{domain: {task: adapter_path}} (with --data_config)")
    p.add_argument("--ckpt_dir", required=True, help="base-model directory (the frozen base that embeds)")
    p.add_argument("--out", required=True, help="selector file to write (may be the --update file)")
    p.add_argument("--kind", default=None, choices=SELECTOR_KINDS, help=f"default {DEFAULT_KIND}")
    p.add_argument("--rows_per_task", type=int, default=256, help="training rows per task (balanced; at most)")
    p.add_argument("--heldout_per_task", type=int, default=None,
                   help=f"rows per task held out for the report and the temperature (default {DEFAULT_HELDOUT}; "
                        "an update: the old selector's)")
    p.add_argument("--encoder", default=None, help=f"states pooled: {' | '.join(ENCODERS)} (default hidden: the final "
                   "hidden states; hidden:LAYER: after block LAYER, the rest not run; input_embedding: the token "
                   "embeddings, no forward)")
    p.add_argument("--use_instruction", type=str2bool, default=None, help="embed the row's instruction (default True)")
    p.add_argument("--use_input", type=str2bool, default=None, help="embed the row's input (default True)")
    p.add_argument("--use_output", type=str2bool, default=None,
                   help="add the row's output to the selector's training rows only (default False; routed rows have "
                        "no output, as in Adapters Selector)")
    p.add_argument("--max_tokens", type=int, default=None, help="tokens embedded per row (default 256)")
    p.add_argument("--hidden", type=int, default=None, help="mlp: hidden width (default 256)")
    p.add_argument("--steps", type=int, default=None, help="mlp: full-batch AdamW steps (default 300)")
    p.add_argument("--lr", type=float, default=None, help="mlp: learning rate (default 1e-3)")
    p.add_argument("--metric", default=None, choices=METRICS, help="nearest: distance (default cos)")
    p.add_argument("--n_clusters", type=int, default=None, help="nearest: k-means centroids kept per task (default 16)")
    p.add_argument("--temperature", type=float, default=None,
                   help="nearest: softmax temperature of task scores (default 0.1)")
    p.add_argument("--standardize", type=str2bool, default=None, help="z-score the embeddings first (default True)")
    p.add_argument("--calibrate", type=str2bool, default=True,
                   help="fit the softmax temperature on the held-out rows (temperature scaling), so that top-p "
                        "fusion sees calibrated probabilities; routing by argmax is unchanged")
    p.add_argument("--seed", type=int, default=None, help="row order and initialisation (default 0)")
    p.add_argument("--update", default=None, metavar="OLD_SELECTOR", help="update this selector file to the "
                   "registry as it stands instead of training afresh")
    p.add_argument("--action", "--option", default=None, choices=UPDATE_ACTIONS,
                   help="with --update: what changed in the registry (Adapters Selector's --option)")
    p.add_argument("--mode", "--option_type", default=None, choices=UPDATE_MODES,
                   help="with --update: new = retrain from scratch; mix (default) = from the old selector: the mlp "
                        "warm-starts on the new or changed tasks' rows plus --reduce_ratio of each other task's, "
                        "nearest keeps the unchanged tasks' keys (Adapters Selector's --option_type)")
    p.add_argument("--reduce_ratio", type=float, default=None,
                   help="with --update --mode mix (mlp): share of each unchanged task's rows trained on (default 0.5)")
    p.add_argument("--embed_cache", default=None, help=f"embedding cache folder (default: embed_cache/ beside --out; "
                   f"{NO_CACHE}: no cache)")
    p.add_argument("--embed_batch_size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    if a.update is None and (a.action or a.mode or a.reduce_ratio is not None):
        p.error("--action, --mode and --reduce_ratio go with --update OLD_SELECTOR")
    if a.update is not None and a.action is None:
        p.error(f"--update needs --action ({' | '.join(UPDATE_ACTIONS)}: what changed in the registry)")
    return a


def kept_flags_check(a: argparse.Namespace, old: Selector) -> None:
    """`ValueError` naming the flag when an update is given a kind, embedding or structure flag that
    differs from the old selector's."""
    for flag in KEPT_BY_UPDATE:
        given, kept = getattr(a, flag), getattr(old.cfg, flag)
        if given is not None and given != kept:
            raise ValueError(f"--{flag} {given}: --update {a.update} keeps the old selector's {flag} ({kept}); train "
                             "a new selector (without --update) to change it")
    held = old.report.get("heldout_rows_per_task")
    if a.heldout_per_task is not None and held is not None and a.heldout_per_task != held:
        raise ValueError(f"--heldout_per_task {a.heldout_per_task}: --update {a.update} holds out the old selector's "
                         f"{held} rows per task (other held-out rows could be rows it was trained on)")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    lock = OutputLock(a.out)  # held until the selector file is written
    try:
        lock.acquire()
        reg = registry_from_flags(a.adapter_registry, a.data_config, a.adapter_pool)
        old = None
        if a.update is not None:
            old = load_selector(a.update)
            kept_flags_check(a, old)
            plan_update(old, reg, a.action)  # a mismatch stops here, before the model is loaded
        else:
            EmbedConfig(**{f: getattr(a, f) for f in EMBEDDING if getattr(a, f) is not None})  # checked before loading
        cache = None
        if a.embed_cache != NO_CACHE:
            cache = EmbeddingCache(a.embed_cache or Path(a.out).parent / "embed_cache", base_identity(a.ckpt_dir))
        model, tokenizer = load_model(a.ckpt_dir, device=a.device)
        training = {f: getattr(a, f) for f in TRAINING if getattr(a, f) is not None}
        if old is not None:
            sel = update_selector(model, tokenizer, old, reg, a.action, a.mode or "mix", a.reduce_ratio,
                                  a.rows_per_task, a.heldout_per_task, a.embed_batch_size, a.calibrate, cache,
                                  **training)
        else:
            options = {f: getattr(a, f) for f in KEPT_BY_UPDATE[1:] if getattr(a, f) is not None}
            sel = train_on_registry(model, tokenizer, reg, a.kind or DEFAULT_KIND, a.rows_per_task,
                                    DEFAULT_HELDOUT if a.heldout_per_task is None else a.heldout_per_task,
                                    a.embed_batch_size, a.calibrate, cache, **options, **training)
    except (OSError, ValueError) as e:
        lock.release()
        print(f"train_selector.py: error: {error_line(e)}", file=sys.stderr)
        return 2
    try:
        print(format_report(sel.report))
        if cache is not None:
            print(f"embedded {cache.computed} rows with the base, {cache.reused} from the cache {cache.folder}")
        print(f"wrote {save_selector(sel, a.out)}")
    finally:
        lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
