"""Files written by the code before the `moa/` layout move (tests/fixtures/legacy, README there) load
after it and compute what that code computed: two adapters, a training checkpoint (resumed through
extract), a task registry and its selector. References: the logits and probabilities stored then."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import extract_adapter_from_checkpoint
from llama.checkpoint import load_model
from moa.files.adapters import load_trained_adapter
from moa.files.settings import sha256_file as file_sha256
from moa.tasks.embedding import embed_rows
from moa.tasks.registry import load_registry
from moa.tasks.selector import load_selector
from moa.train.checkpointing import load_training_checkpoint
from tests.helpers import rel
from tests.task_helpers import task_rows

pytestmark = pytest.mark.usefixtures("one_thread")

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(LEGACY / "expected.pt", weights_only=True)


def logits(adapter: Path | None, tokens: torch.Tensor) -> torch.Tensor:
    model, _ = load_model(LEGACY / "base")
    if adapter is not None:
        load_trained_adapter(model, adapter, LEGACY / "base")
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("name", ["soft_moa", "sparse_moa", "train"])
def test_legacy_adapters_load_and_give_the_same_logits_rel1em6(expected, name):
    # soft_moa mixes two prompt sets: since the baselines follow the official code (one softmax over all
    # E*L prompt positions, not one per set) its logits are those stored at that change (README there).
    key = {"train": "trained", "soft_moa": "soft_moa_joint_prompt"}.get(name, name)
    out = logits(LEGACY / name / "adapter.pth", expected["tokens"])
    assert rel(out, expected[key]) <= 1e-6
    assert rel(logits(None, expected["tokens"]), expected["bare"]) <= 1e-6


def test_legacy_training_checkpoint_loads_and_extracts_the_same_adapter_exact(expected, tmp_path):
    ckpt = load_training_checkpoint(str(LEGACY / "train" / "checkpoint-0.pth"))
    assert ckpt["epoch"] == 0 and ckpt["adapter_params"]["prompt_len"] == 2
    shutil.copy(LEGACY / "train" / "checkpoint-0.pth", tmp_path / "checkpoint-0.pth")
    assert extract_adapter_from_checkpoint.main(["--checkpoint", str(tmp_path / "checkpoint-0.pth")]) == 0
    fresh = torch.load(tmp_path / "adapter.pth", weights_only=True)
    legacy = torch.load(LEGACY / "train" / "adapter.pth", weights_only=True)
    assert fresh.keys() == legacy.keys() and all(torch.equal(fresh[k], legacy[k]) for k in fresh)
    written = json.loads((tmp_path / "adapter_params.json").read_text())
    assert written.pop("files") == {"adapter.pth": file_sha256(tmp_path / "adapter.pth")}  # the pair's manifest
    assert written == json.loads((LEGACY / "train" / "adapter_params.json").read_text())


def test_legacy_registry_and_selector_load_and_route_the_same_rel1em6(expected):
    reg = load_registry(LEGACY / "registry.json")
    assert reg.tasks == ["add", "yesno"]
    assert all(Path(e.adapter).is_file() and Path(e.data).is_file() for e in reg.entries)
    sel = load_selector(LEGACY / "selector.pt")
    model, tok = load_model(LEGACY / "base")
    x = embed_rows(model, tok, task_rows("add", 3, seed=5) + task_rows("yesno", 3, seed=5))
    assert rel(sel.probs(x), expected["selector_probs"]) <= 1e-6
