"""Helpers for the task-adapter tests (registry, selector, fusion, LoraHub): plain task LoRAs with
random non-zero B on a tiny base, and rows of synthetic tasks that differ in their text."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.helpers import make_lora_adapter


def make_task_adapter(base_dir: Path, path: Path, seed: int, rank: int = 4, alpha: float = 8.0,
                      targets: str = "Q,V,FFN_DOWN", layers: str = "0-2", scale: float = 0.05) -> Path:
    """A plain task LoRA with random non-zero B on the base in `base_dir` (so that it changes the
    logits); returns its adapter.pth path."""
    make_lora_adapter(base_dir, path, lora_layers=layers, targets=targets, rank=rank, alpha=alpha, seed=seed,
                      scale=scale)
    return Path(path)


# Three synthetic tasks whose prompts differ in their words (a selector can tell them apart even on
# a random tiny base) while varying within the task.
TASK_TEXTS = {
    "add": "Add the numbers {a} and {b} and give the sum.",
    "yesno": "Answer yes or no: is the sky {c} today in town number {a}?",
    "pick": "Choose option1 or option2 for the riddle about the {c} {c} fox {b}.",
}
COLORS = ["blue", "red", "green", "grey", "black", "white", "pink", "gold"]


def task_rows(task: str, n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed + sum(map(ord, task)))
    rows = []
    for _ in range(n):
        a, b, c = (int(v) for v in torch.randint(0, 100, (3,), generator=g))
        text = TASK_TEXTS[task].format(a=a, b=b, c=COLORS[c % len(COLORS)])
        rows.append({"instruction": text, "input": "", "output": f"answer {a + b}", "answer": str(a + b)})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def merged_logits(base_dir: Path, paths: list, w: list[float], tokens: torch.Tensor) -> torch.Tensor:
    """Reference logits: the base with W + sum_i w_i dW_i at every adapted site of every LoRA file."""
    from llama.checkpoint import load_model
    from moa.lora.algebra import lora_delta, lora_sites, read_plain_lora

    model, _ = load_model(base_dir)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for wi, path in zip(w, paths):
            cfg, state = read_plain_lora(path)
            for site in lora_sites(cfg):
                params[f"{site}.weight"].add_(wi * lora_delta(cfg, state, site))
        return model(tokens)
