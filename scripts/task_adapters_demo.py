"""Many task adapters, one model, on SmolLM2-135M: train three task LoRAs (GSM8K, BoolQ, ARC-Easy
training rows), register them, train the selector, then report on a mixed test set the routing
accuracy and the accuracy of base / each single adapter / selector top-1 / top-p fusion / LoraHub:

    python scripts/import_gguf.py --out models/smollm2          # once
    python scripts/task_adapters_demo.py --ckpt_dir models/smollm2 --out runs/task_adapters_demo

Every step calls the project's own code: `moa.train.trainer.finetune` (main_finetune.py's loop) for the
LoRAs, `moa.tasks.registry`, `moa.tasks.selector.train_on_registry`, `moa.tasks.lorahub.lorahub` (few-shot weights per
task from `--lorahub_shots` training rows of that task), and `moa.infer.generate.run_inference`
(example.py) for every prediction file, scored with the standard rules (moa/eval/scoring.py). Finished
steps are reused on a rerun (delete --out to start over). The defaults are sized for a 2-core CPU;
the numbers they give are what such tiny training runs give, reported as they are.

Routed runs (top-1, fusion) are made per task over that task's rows of the mixed test set, so that
each task keeps its own --max_gen_len: the selector routes each row on its own and a row's output
does not depend on the rows batched with it (tests/test_fusion.py), so this equals one run over the
mixed file. The routing accuracy is over all mixed rows.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from llama.checkpoint import load_model, load_params
from llama.model import ModelArgs
from moa.eval.scoring import score_generation
from moa.files.adapters import write_adapter_files
from moa.infer.generate import InferenceConfig, run_inference
from moa.method.config import MoAConfig
from moa.tasks.lorahub import LoraHubConfig, lorahub
from moa.tasks.registry import Registry, TaskEntry, load_registry, save_registry
from moa.tasks.routing import generation_routing
from moa.tasks.selector import load_selector, save_selector, train_on_registry
from moa.train.checkpointing import checkpoint_path, load_training_checkpoint
from moa.train.data import load_rows
from moa.train.trainer import TrainConfig, finetune

REPO = Path(__file__).resolve().parents[1]
# task -> (domain, training file, test file, max_gen_len) under --data_root
TASKS = {
    "gsm8k": ("math", "math/train/gsm8k_train.json", "math/gsm8k/test.json", 160),
    "boolq": ("commonsense", "commonsense/boolq/train.json", "commonsense/boolq/test.json", 16),
    "ARC-Easy": ("commonsense", "commonsense/ARC-Easy/train.json", "commonsense/ARC-Easy/test.json", 16),
}


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)
    return path


def sample(rows: list[dict], n: int, seed: int) -> list[dict]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:n]


def train_task_lora(a: argparse.Namespace, task: str, rows: list[dict], out: Path) -> Path:
    """A plain LoRA trained on `rows` with the training loop of main_finetune.py; adapter.pth path."""
    adapter = out / "adapters" / task / "adapter.pth"
    if adapter.is_file():
        return adapter
    data = write_json(out / "data" / f"{task}_train.json", rows)
    run_dir = out / "adapters" / task / "train"
    n_layers = ModelArgs(**load_params(a.ckpt_dir)).n_layers
    moa_cfg = MoAConfig(lora_layers=f"0-{n_layers}", lora_rank=a.lora_rank, lora_alpha=2.0 * a.lora_rank,
                        lora_targets=a.lora_targets, type_router="none")
    train_cfg = TrainConfig(llama_path=a.ckpt_dir, data_path=str(data), output_dir=str(run_dir),
                            data_root=a.data_root, max_seq_len=a.max_seq_len, batch_size=a.batch_size,
                            epochs=a.epochs, warmup_epochs=0.0, lr=a.lr, num_workers=0,
                            device=a.device, seed=a.seed, log_every=1)
    t0 = time.perf_counter()
    summary = finetune(train_cfg, moa_cfg, {**vars(a), "task": task, "max_seq_len": a.max_seq_len})
    ckpt = load_training_checkpoint(checkpoint_path(str(run_dir), a.epochs - 1))
    write_adapter_files(adapter, MoAConfig.from_dict(ckpt["adapter_params"]), ckpt["model"])
    print(f"[{task}] LoRA trained on {len(rows)} rows in {time.perf_counter() - t0:.0f} s "
          f"({summary['steps']} steps, last loss {summary['last_loss']:.3f}) -> {adapter}")
    return adapter


def predict(a: argparse.Namespace, rows_path: Path, save: Path, max_gen_len: int, **adapters) -> list[dict]:
    """example.py's inference (greedy) on `rows_path`; returns the prediction records."""
    cfg = InferenceConfig(ckpt_dir=a.ckpt_dir, data_path=str(rows_path), save_path=str(save), max_gen_len=max_gen_len,
                          min_gen_len=max_gen_len, temperature=0.0, max_batch_size=a.max_batch_size,
                          device=a.device, progress=False, **adapters)
    run_inference(cfg, routing=generation_routing(cfg))
    return [json.loads(line) for line in save.read_text().splitlines()]


def accuracy(task: str, records: list[dict]) -> float:
    return sum(score_generation(task, r["generate"], r["answer"])[1] for r in records) / len(records)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt_dir", default=str(REPO / "models" / "smollm2"), help="base model (SmolLM2-135M import)")
    p.add_argument("--out", default=str(REPO / "runs" / "task_adapters_demo"))
    p.add_argument("--data_root", default=str(REPO / "data"))
    p.add_argument("--train_rows", type=int, default=64, help="training rows per task LoRA")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the task LoRAs")
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--lora_targets", default="Q,K,V,O")
    p.add_argument("--max_seq_len", type=int, default=256, help="training tokens per example")
    p.add_argument("--selector_rows", type=int, default=64, help="selector training rows per task")
    p.add_argument("--selector_heldout", type=int, default=32, help="selector held-out rows per task")
    p.add_argument("--test_rows", type=int, default=20, help="test rows per task in the mixed test set")
    p.add_argument("--top_p_adapters", type=float, default=0.9)
    p.add_argument("--lorahub_shots", type=int, default=5, help="few-shot rows per task for LoraHub")
    p.add_argument("--lorahub_steps", type=int, default=20)
    p.add_argument("--max_batch_size", type=int, default=20)
    p.add_argument("--math_gen_len", type=int, default=160, help="max_gen_len of GSM8K rows (commonsense: 16)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def train_selector_once(a: argparse.Namespace, registry: Path, out: Path) -> tuple[Path, dict]:
    """The MLP selector over the frozen base's mean-pooled hidden states (trained unless on disk)."""
    selector_path = out / "selector.pt"
    if not selector_path.is_file():
        model, tokenizer = load_model(a.ckpt_dir, device=a.device)
        sel = train_on_registry(model, tokenizer, load_registry(registry), "mlp", a.selector_rows,
                                a.selector_heldout, max_tokens=128, seed=a.seed)
        save_selector(sel, selector_path)
    report = load_selector(selector_path).report
    print(f"selector held-out routing accuracy {report['heldout']['accuracy']:.3f}: "
          + ", ".join(f"{t} {v:.3f}" for t, v in report["heldout"]["per_task"].items()))
    return selector_path, report


def lorahub_per_task(a: argparse.Namespace, adapters: dict[str, Path], all_train: dict[str, list[dict]],
                     out: Path) -> dict[str, Path]:
    """LoraHub weights per task from a few of its training rows (not among the LoRA's own)."""
    hub = {}
    for t in TASKS:
        path = out / "lorahub" / t / "adapter.pth"
        if not path.is_file():
            shots = sample(all_train[t], a.train_rows + a.lorahub_shots, a.seed)[a.train_rows:]
            base, tok = load_model(a.ckpt_dir, device=a.device, max_seq_len=a.max_seq_len)
            result, cfg, state = lorahub(base, tok, [str(adapters[u]) for u in TASKS], shots,
                                         LoraHubConfig(steps=a.lorahub_steps, seed=a.seed, max_seq_len=a.max_seq_len))
            write_adapter_files(path, cfg, state)
            write_json(path.parent / "lorahub.json", {"tasks": list(TASKS), "weights": result.weights,
                                                      "loss": result.loss, "start_loss": result.start_loss})
            print(f"[{t}] LoraHub weights {dict(zip(TASKS, (round(w, 3) for w in result.weights)))}: few-shot loss "
                  f"{result.loss:.3f} (uniform {result.start_loss:.3f})")
        hub[t] = path
    return hub


def score_systems(a: argparse.Namespace, systems: list[tuple[str, dict | None]], parts: dict[str, Path],
                  hub: dict[str, Path], out: Path) -> tuple[dict[str, dict[str, float]], list[dict]]:
    """Accuracy per system and task on the mixed test set, and the selector top-1 run's records."""
    results: dict[str, dict[str, float]] = {}
    routed_rows = []
    for name, flags in systems:
        results[name] = {}
        for t, (_, _, _, max_gen_len) in TASKS.items():
            if t == "gsm8k":
                max_gen_len = a.math_gen_len
            task_flags = {"adapter_path": str(hub[t])} if flags is None else flags
            slug = name.replace(" ", "_").replace(":", "_")
            records = predict(a, parts[t], out / "predictions" / slug / f"{t}.jsonl", max_gen_len, **task_flags)
            results[name][t] = accuracy(t, records)
            if name == "selector top-1":
                routed_rows += records
        results[name]["average"] = sum(results[name][t] for t in TASKS) / len(TASKS)
    return results, routed_rows


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    t_start = time.perf_counter()

    # 1. three task LoRAs, and the registry (the selector reads each task's whole training file).
    train_files = {t: Path(a.data_root) / spec[1] for t, spec in TASKS.items()}
    all_train = {t: load_rows(f) for t, f in train_files.items()}
    adapters = {t: train_task_lora(a, t, sample(all_train[t], a.train_rows, a.seed), out) for t in TASKS}
    registry = save_registry(Registry([TaskEntry(TASKS[t][0], t, adapters[t].resolve(), train_files[t].resolve())
                                       for t in TASKS]), out / "tasks.json")
    # 2. the selector.
    selector_path, report = train_selector_once(a, registry, out)

    # 3. the mixed test set, one file per task part (see the module docstring).
    parts = {}
    for t, (_, _, test_file, _) in TASKS.items():
        rows = [dict(r, set=t) for r in sample(load_rows(Path(a.data_root) / test_file), a.test_rows, a.seed)]
        parts[t] = write_json(out / "data" / f"mixed_test_{t}.json", rows)
    write_json(out / "data" / "mixed_test.json", [r for t in TASKS for r in load_rows(parts[t])])

    # 4. LoraHub, 5. predictions and scores.
    hub = lorahub_per_task(a, adapters, all_train, out)
    routed = {"adapter_registry": str(registry), "selector": str(selector_path)}
    systems: list[tuple[str, dict | None]] = [("base", {})]
    systems += [(f"adapter:{u}", {"adapter_path": str(adapters[u])}) for u in TASKS]
    systems += [("selector top-1", {**routed, "fusion": "top1"}),
                (f"fusion top-p {a.top_p_adapters}", {**routed, "fusion": "topp", "top_p_adapters": a.top_p_adapters}),
                ("LoraHub (per task)", None)]  # None: that task's LoraHub combination
    results, routed_rows = score_systems(a, systems, parts, hub, out)
    routing = {t: sum(r["selected_task"] == t for r in routed_rows if r["set"] == t) / a.test_rows for t in TASKS}
    routing["all"] = sum(r["selected_task"] == r["set"] for r in routed_rows) / len(routed_rows)

    print(f"\nmixed test set: {a.test_rows} rows per task ({len(routed_rows)} rows), greedy; accuracy per task")
    print("routing accuracy (selector top-1 = the row's task): "
          + ", ".join(f"{k} {v:.3f}" for k, v in routing.items()))
    print(f"{'system':<24}" + "".join(f"{t:>10}" for t in TASKS) + f"{'average':>10}")
    for name, accs in results.items():
        print(f"{name:<24}" + "".join(f"{accs[t]:>10.3f}" for t in TASKS) + f"{accs['average']:>10.3f}")
    write_json(out / "results.json", {"settings": vars(a), "routing_accuracy": routing, "accuracy": results,
                                      "selector_heldout": report["heldout"],
                                      "seconds": time.perf_counter() - t_start})
    print(f"\nwrote {out / 'results.json'} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
