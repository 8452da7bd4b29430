"""moa/tasks/lorahub.py and scripts/lorahub.py: CMA-ES (the `cma` package) over the weights of three LoRAs.

Toy problem: the few-shot targets are the greedy continuations of the base with adapter 0, so
adapter 0 is right; the search must find weights with a lower few-shot loss than uniform weights,
the same weights for the same seed. The written LoRA (`combine(..., "cat")`) must compute what the
fused bank computed with those weights (rel <= 1e-5, fp32)."""
from __future__ import annotations

import json

import pytest
import torch

from llama.checkpoint import load_model
from llama.generation import generate
from moa import load_adapter
from moa.train.data import IGNORE_INDEX
from moa.tasks.fusion import attach_bank, load_bank
from moa.tasks.lorahub import LoraHubConfig, few_shot_loss, lorahub_search
from scripts.lorahub import main as lorahub_main
from tests.helpers import write_meta_model_dir
from tests.task_helpers import make_task_adapter, task_rows, write_rows

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("lorahub")
    base = root / "base"
    write_meta_model_dir(base, seed=4)
    paths = [make_task_adapter(base, root / f"a{i}" / "adapter.pth", seed=20 + i, scale=0.4) for i in range(3)]
    right, _ = load_model(base)
    load_adapter(right, str(paths[0]))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (8,), generator=g).tolist() for _ in range(4)]
    targets = generate(right, prompts, 8, stop_tokens=[])
    tokens = torch.tensor([p + t for p, t in zip(prompts, targets)])
    labels = tokens.clone()
    labels[:, :8] = IGNORE_INDEX
    batch = {"tokens": tokens, "labels": labels, "token_mask": torch.ones_like(tokens, dtype=torch.bool)}
    return base, paths, [batch]


def fused(base, paths):
    model, _ = load_model(base)
    return attach_bank(model, load_bank(["a0", "a1", "a2"], paths))


def test_lorahub_beats_uniform_weights_and_is_reproducible_with_a_seed(toy):
    base, paths, batches = toy
    bank = fused(base, paths)
    cfg = LoraHubConfig(steps=40, seed=3, l1=0.01)
    result = lorahub_search(bank, batches, cfg)
    uniform = few_shot_loss(bank, batches, torch.full((3,), 1 / 3))
    assert result.start_loss == pytest.approx(uniform)
    assert result.loss < uniform - 0.1, (result.loss, uniform)
    assert result.weights[0] == max(result.weights)  # the right adapter gets the largest weight
    assert all(abs(w) <= cfg.bound for w in result.weights)
    again = lorahub_search(bank, batches, cfg)
    assert again.weights == result.weights and again.evaluations == result.evaluations
    other = lorahub_search(bank, batches, LoraHubConfig(steps=40, seed=4, l1=0.01))
    assert other.evaluations != result.evaluations


def test_lorahub_cli_writes_the_combined_lora_that_the_search_evaluated_fp32_rel1em5(toy, tmp_path, capsys):
    base, paths, _ = toy
    rows = task_rows("add", 4)
    data = write_rows(tmp_path / "few.json", rows)
    out = tmp_path / "hub" / "adapter.pth"
    assert lorahub_main(["--ckpt_dir", str(base), "--adapters", *map(str, paths), "--data", str(data),
                         "--steps", "12", "--seed", "1", "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out.parent / "lorahub.json").read_text())
    assert len(report["weights"]) == 3 and report["loss"] <= report["start_loss"]
    assert "few-shot loss" in capsys.readouterr().out
    combined, _ = load_model(base)
    load_adapter(combined, str(out))
    bank = fused(base, paths)
    t = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), bank.rows(torch.tensor(report["weights"]).expand(2, 3)):
        a, b = combined(t), bank.model(t)
    assert float((a - b).norm() / b.norm()) <= 1e-5
    assert lorahub_main(["--ckpt_dir", str(base), "--adapters", str(paths[0]), "--data", str(data),
                         "--out", str(tmp_path / "one.pth"), "--device", "cpu"]) == 2
    assert "at least 2 adapters" in capsys.readouterr().err
