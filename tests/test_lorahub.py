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
from moa.lora.algebra import lora_sites, read_plain_lora
from moa.tasks.fusion import BankLinear, attach_bank, load_bank
from moa.tasks.lorahub import LoraHubConfig, few_shot_loss, lorahub, lorahub_search
from moa.train.data import IGNORE_INDEX
from scripts.lorahub import main as lorahub_main
from tests.helpers import rel, write_meta_model_dir
from tests.task_helpers import make_task_adapter, merged_logits, task_rows, write_rows

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


def test_lorahub_on_adapters_of_different_layers_targets_ranks_and_ab_mode_fp32_rel1em5(toy, tmp_path):
    """delta mode writes the exact sum on the union of sites; ab mode writes LoraHub's composition,
    checked against (sum_i w_i s_i B_i)(sum_i w_i A_i) computed from the files (equal ranks here)."""
    base, paths, _ = toy
    odd = [paths[0], make_task_adapter(base, tmp_path / "q" / "adapter.pth", seed=31, rank=2, alpha=4.0,
                                       targets="Q,K", layers="1-2", scale=0.4)]
    data = task_rows("add", 4)
    model, tok = load_model(base)
    cfg = LoraHubConfig(steps=6, seed=1, max_seq_len=256)
    result, combined_cfg, state = lorahub(model, tok, [str(p) for p in odd], data, cfg)
    assert not any(isinstance(m, BankLinear) for m in model.modules())  # detached again
    w = torch.tensor(result.weights)
    t = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        combined = load_adapter(load_model(base)[0], save(tmp_path / "delta", combined_cfg, state))(t)
        expected = merged_logits(base, odd, w.tolist(), t)
    assert rel(combined, expected) <= 1e-5

    ab = LoraHubConfig(steps=6, seed=1, max_seq_len=256, mode="ab")
    result, ab_cfg, ab_state = lorahub(load_model(base)[0], tok, [str(p) for p in paths], data, ab)
    w = result.weights
    loras = [read_plain_lora(p) for p in paths]
    with torch.no_grad():
        ref = load_model(base)[0]
        params = dict(ref.named_parameters())
        for site in lora_sites(loras[0][0]):
            a = sum(wi * st[f"{site}.lora_A"] for wi, (_, st) in zip(w, loras))
            b = sum(wi * c.lora_alpha / c.lora_rank * st[f"{site}.lora_B"] for wi, (c, st) in zip(w, loras))
            params[f"{site}.weight"].add_(b @ a)
        got = load_adapter(load_model(base)[0], save(tmp_path / "ab", ab_cfg, ab_state))(t)
        assert rel(got, ref(t)) <= 1e-5
        bank = fused(base, paths)
        with bank.rows(torch.tensor(w).expand(2, 3), compose=True):
            assert rel(bank.model(t), ref(t)) <= 1e-5  # the search evaluated exactly what was written
    with pytest.raises(ValueError, match="--lorahub_mode ab writes"):
        lorahub(load_model(base)[0], tok, [str(p) for p in paths], data, ab, method="svd")


def save(folder, cfg, state):
    from moa.files.adapters import write_adapter_files

    return str(write_adapter_files(folder / "adapter.pth", cfg, state))

