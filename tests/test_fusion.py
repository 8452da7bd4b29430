"""moa/tasks/fusion.py and moa/tasks/routing.py: N task LoRAs on one model.

References: each adapter loaded alone through `moa.load_adapter` (the existing single-LoRA path),
and, for fractional weights, the base with its weights replaced by W + sum_i w_i dW_i computed
from the adapter files (a dense re-computation). fp32, rel <= 1e-5.
"""
from __future__ import annotations

import pytest
import torch

from llama.checkpoint import load_model
from llama.generation import generate
from moa import load_adapter
from moa.tasks.fusion import RowAdapters, attach_bank, load_bank, top_p_weights
from moa.tasks.routing import RoutingPlan, TaskAdapters
from tests.helpers import rel, write_meta_model_dir
from tests.task_helpers import make_task_adapter, merged_logits

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

TASKS = ["t0", "t1", "t2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny base and three LoRAs that differ in rank, alpha, targets and layers."""
    root = tmp_path_factory.mktemp("fusion")
    base = root / "base"
    write_meta_model_dir(base, seed=5)
    paths = [make_task_adapter(base, root / "a0" / "adapter.pth", seed=0, rank=4, alpha=8.0),
             make_task_adapter(base, root / "a1" / "adapter.pth", seed=1, rank=2, alpha=4.0, targets="Q,K,O"),
             make_task_adapter(base, root / "a2" / "adapter.pth", seed=2, rank=4, alpha=2.0, layers="1-2",
                               targets="V,FFN_UP")]
    return base, paths


def tokens(bsz: int = 3, seqlen: int = 10) -> torch.Tensor:
    return torch.randint(0, 512, (bsz, seqlen), generator=torch.Generator().manual_seed(7))


def single_logits(base, path, t):
    model, _ = load_model(base)
    load_adapter(model, str(path))
    with torch.no_grad():
        return model(t)


def test_one_hot_rows_equal_single_adapter_logits_fp32_rel1em5(setup):
    base, paths = setup
    bank = attach_bank(load_model(base)[0], load_bank(TASKS, paths))
    t = tokens()
    for i, path in enumerate(paths):
        with torch.no_grad(), bank.rows(torch.nn.functional.one_hot(torch.tensor([i] * 3), 3).float()):
            got = bank.model(t)
        assert rel(got, single_logits(base, path, t)) <= 1e-5


def test_per_row_weights_equal_merged_deltas_fp32_rel1em5(setup):
    """Each row with its own weights (one-hot, fractional, negative) in one batch."""
    base, paths = setup
    bank = attach_bank(load_model(base)[0], load_bank(TASKS, paths))
    w = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.3, 0.2], [-0.4, 1.2, 0.7]])
    t = tokens()
    with torch.no_grad(), bank.rows(w):
        got = bank.model(t)
    for b in range(3):
        expected = merged_logits(base, paths, w[b].tolist(), t[b:b + 1])
        assert rel(got[b:b + 1], expected) <= 1e-5


def test_mixed_top1_rows_equal_each_row_alone_with_its_adapter_greedy_exact(setup):
    """A perfect selector's choices, every adapter in one padded batch (no grouping by adapter);
    reference: each row generated alone with its own adapter loaded by moa.load_adapter."""
    base, paths = setup
    bank = attach_bank(load_model(base)[0], load_bank(TASKS, paths))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in (5, 9, 7, 4, 8, 6)]
    choice = [2, 0, 1, 0, 2, 1]

    class P:
        def __init__(self, index):
            self.index = index

    plan = RoutingPlan(TASKS, "top1", torch.zeros(6, 3), torch.nn.functional.one_hot(torch.tensor(choice), 3).float(),
                       choice, TaskAdapters.of_bank(bank))
    with plan.rows([P(i) for i in range(6)]):
        got = generate(bank.model, prompts, 6, stop_tokens=[])
    for i, c in enumerate(choice):
        ref, _ = load_model(base)
        load_adapter(ref, str(paths[c]))
        assert got[i] == generate(ref, [prompts[i]], 6, stop_tokens=[])[0]


def test_topp_rows_generation_equal_alone_greedy_exact(setup):
    """Fusion during KV-cached generation: each row of a padded batch with its own weights (different
    numbers of active adapters) generates what it generates alone with the same weights."""
    base, paths = setup
    bank = attach_bank(load_model(base)[0], load_bank(TASKS, paths))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in (6, 3, 8)]
    w = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0], [0.2, 0.5, 0.3]])
    with bank.rows(w):
        batched = generate(bank.model, prompts, 5, stop_tokens=[])
    for i in range(3):
        with bank.rows(w[i:i + 1]):
            assert batched[i] == generate(bank.model, [prompts[i]], 5, stop_tokens=[])[0]


def test_row_adapters_sparse_form_hand_worked():
    w = torch.tensor([[0.0, 0.7, 0.0, 0.3], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    sel = RowAdapters.from_weights(w)
    # K = 2 (row 0); row 1 pads with an index of weight 0; an all-zero row runs no adapter (weights 0).
    assert sel.index[0].tolist() == [1, 3] and sel.weight[0].tolist() == pytest.approx([0.7, 0.3])
    assert sel.index[1, 0] == 2 and sel.weight[1].tolist() == [1.0, 0.0]
    assert sel.weight[2].tolist() == [0.0, 0.0]
    assert RowAdapters.from_weights(torch.eye(3)).index.tolist() == [[0], [1], [2]]


def test_top_p_weights_hand_worked():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.95, 0.03, 0.02]])
    w = top_p_weights(probs, 0.8)
    # row 0: 0.6 < 0.8 -> add 0.3 (crosses) -> {0.6, 0.3} / 0.9; row 1: 0.5, then 0.3 crosses -> /0.8;
    # row 2: 0.95 alone.
    expected = torch.tensor([[2 / 3, 1 / 3, 0.0], [0.0, 0.625, 0.375], [1.0, 0.0, 0.0]])
    assert torch.allclose(w, expected, atol=1e-6)
    assert torch.equal(top_p_weights(probs, 0.01), torch.nn.functional.one_hot(probs.argmax(-1), 3).float())
    with pytest.raises(ValueError, match="--top_p_adapters"):
        top_p_weights(probs, 0.0)


def test_outside_rows_is_the_bare_base_detach_restores_it_and_errors(setup):
    base, paths = setup
    bare = load_model(base)[0]
    model = load_model(base)[0]
    t = tokens()
    with torch.no_grad():
        expected = bare(t)
        bank = attach_bank(model, load_bank(TASKS, paths))
        assert torch.equal(model(t), expected)  # no rows given: the base alone
        with pytest.raises(ValueError, match=r"expected weights \(B, 3\)"):
            with bank.rows(torch.ones(2, 2)):
                pass
        with bank.rows(torch.ones(2, 3)), pytest.raises(ValueError, match="given for 2 rows, the forward has 3"):
            model(t)
        with pytest.raises(ValueError, match="already has adapters attached"):
            attach_bank(model, load_bank(TASKS, paths))
        assert bank.detach() is model and set(model.state_dict()) == set(bare.state_dict())
        assert torch.equal(model(t), expected)
        again = attach_bank(model, load_bank(TASKS, paths))  # the same model takes a bank again
        with again.rows(torch.nn.functional.one_hot(torch.tensor([1] * 3), 3).float()):
            assert rel(model(t), single_logits(base, paths[1], t)) <= 1e-5
        with pytest.raises(ValueError, match="detached"):
            with bank.rows(torch.ones(3, 3)):
                pass


def test_bank_on_another_base_names_the_files_and_runs_at_the_training_max_seq_len(setup, tmp_path):
    import json

    from tests.helpers import TINY_PARAMS

    base, paths = setup
    other = tmp_path / "other"
    write_meta_model_dir(other, params=dict(TINY_PARAMS, dim=2 * TINY_PARAMS["dim"]), seed=1)
    with pytest.raises(ValueError, match=rf"{paths[0]}.*trained on another base"):
        attach_bank(load_model(other)[0], load_bank(TASKS, paths))
    fewer = tmp_path / "fewer"
    write_meta_model_dir(fewer, params=dict(TINY_PARAMS, n_layers=1), seed=1)
    with pytest.raises(ValueError, match="adapters for layer 1, but the base model has 1 layers"):
        attach_bank(load_model(fewer)[0], load_bank(TASKS, paths))
    assert load_bank(TASKS, paths).max_seq_len is None  # no training max_seq_len recorded
    copies = []
    for i, (path, n) in enumerate(zip(paths, (300, 128, 256))):
        d = tmp_path / f"copy{i}"
        d.mkdir()
        for f in path.parent.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        params = json.loads((d / "adapter_params.json").read_text())
        (d / "adapter_params.json").write_text(json.dumps(dict(params, max_seq_len=n)))
        copies.append(d / "adapter.pth")
    assert load_bank(TASKS, copies).max_seq_len == 128
