"""moa/tasks/selector.py, moa/tasks/embedding.py, scripts/train_selector.py and example.py --adapter_registry.

References: a separable synthetic set (>= 95% held-out, both kinds, all three distances); a
hand-worked example where cosine, inner product and L2 rank three keys differently; the pooled
embedding against each row run alone; example.py with a perfect selector against each row run with
its own adapter through --adapter_path (greedy, identical text).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from example import main as example_main
from llama.checkpoint import load_model
from llama.generation import generate
from moa.tasks.embedding import EmbedConfig, embed_rows, row_tokens
from moa.tasks.registry import add_task, load_registry
from moa.tasks.selector import (
    SelectorConfig,
    fit_selector,
    load_selector,
    routing_report,
    save_selector,
    selector_rows,
    similarity,
    task_scores,
)
from scripts.train_selector import main as train_selector_main
from tests.helpers import write_meta_model_dir
from tests.task_helpers import make_task_adapter, task_rows, write_rows

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

TASKS = ["add", "yesno", "pick"]


def separable(n_per_task: int, seed: int, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian clusters (std 1) whose means lie 10 out along their own axes, plus a shared
    offset and a fixed random scale per coordinate (so standardisation matters)."""
    means = torch.zeros(3, dim)
    means[0, 0], means[1, 1], means[2, 2] = 10.0, 10.0, 10.0
    labels = torch.arange(3).repeat_interleave(n_per_task)
    x = means[labels] + torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(seed + 1))
    scale = torch.rand(dim, generator=torch.Generator().manual_seed(0)) * 5 + 0.5  # the same for every set
    return x * scale + 3.0, labels


# Inner product favours long keys: with several centroids per task the one that noise pushed furthest
# from the origin wins, so ip keeps one (the task mean) here.
@pytest.mark.parametrize("kind,metric,n_clusters", [("mlp", "cos", 1), ("nearest", "cos", 8), ("nearest", "ip", 1),
                                                    ("nearest", "l2", 8)])
def test_selector_on_separable_synthetic_set_heldout_ge_95pct(kind, metric, n_clusters):
    x, y = separable(100, seed=0)
    xh, yh = separable(50, seed=10)
    sel = fit_selector(SelectorConfig(kind=kind, tasks=TASKS, dim=32, metric=metric, n_clusters=n_clusters,
                                      steps=200), x, y)
    report = routing_report(sel, xh, yh)
    assert report["accuracy"] >= 0.95, report
    assert all(acc >= 0.9 for acc in report["per_task"].values())
    assert sum(report["confusion"]["add"].values()) == 50
    assert torch.allclose(sel.probs(xh).sum(-1), torch.ones(150))


def test_three_distances_rank_a_hand_worked_example():
    """q = (1, 0); keys a = (4, 0), b = (1, 1), c = (5, 4), one per task.
    cos: a 1.0 > c 0.781 > b 0.707;  ip: c 5 > a 4 > b 1;  l2 (squared): b 1 < a 9 < c 32."""
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[4.0, 0.0], [1.0, 1.0], [5.0, 4.0]])
    order = {m: similarity(q, keys, m)[0].argsort(descending=True).tolist() for m in ("cos", "ip", "l2")}
    assert order == {"cos": [0, 2, 1], "ip": [2, 0, 1], "l2": [1, 0, 2]}
    assert torch.allclose(similarity(q, keys, "l2"), torch.tensor([[-9.0, -1.0, -32.0]]))
    # Per task the best key counts: task 0 holds a and c, task 1 holds b.
    scores = task_scores(q, keys, torch.tensor([0, 1, 0]), 2, "l2")
    assert torch.allclose(scores, torch.tensor([[-9.0, -1.0]]))
    cfg = dict(kind="nearest", tasks=["A", "B", "C"], dim=2, standardize=False, n_clusters=1)
    for metric, best in (("cos", 0), ("ip", 2), ("l2", 1)):
        sel = fit_selector(SelectorConfig(metric=metric, **cfg), keys, torch.tensor([0, 1, 2]))
        assert int(sel.predict(q)) == best


def test_selector_file_round_trip(tmp_path):
    x, y = separable(30, seed=2)
    for kind in ("mlp", "nearest"):
        sel = fit_selector(SelectorConfig(kind=kind, tasks=TASKS, dim=32, steps=20), x, y)
        sel.report = {"note": "kept"}
        back = load_selector(save_selector(sel, tmp_path / f"{kind}.pt"))
        assert back.cfg == sel.cfg and back.report == {"note": "kept"}
        assert torch.equal(back.probs(x), sel.probs(x))
    with pytest.raises(ValueError, match=r"expected embeddings \(B, 32\)"):
        back.probs(torch.zeros(2, 16))
    (tmp_path / "junk.pt").write_text("x")
    with pytest.raises(ValueError, match="--selector .*junk.pt: cannot read it"):
        load_selector(tmp_path / "junk.pt")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny base, three task adapters and their rows, registered in tasks.json."""
    root = tmp_path_factory.mktemp("selector")
    base = root / "base"
    write_meta_model_dir(base, seed=3)
    reg = root / "tasks.json"
    for i, t in enumerate(TASKS):
        adapter = make_task_adapter(base, root / t / "adapter.pth", seed=10 + i, scale=0.3)
        add_task(reg, "synthetic", t, adapter, write_rows(root / t / "train.json", task_rows(t, 40 + 5 * i)))
    return root, base, reg


def test_pooled_embedding_matches_each_row_alone_fp32_rel1em5(tiny):
    _, base, _ = tiny
    model, tok = load_model(base)
    rows = task_rows("add", 2) + task_rows("pick", 2)
    cfg = EmbedConfig(max_tokens=200)
    emb = embed_rows(model, tok, rows, cfg, batch_size=4)  # padded batch
    for i, row in enumerate(rows):
        t = torch.tensor([row_tokens(tok, row, cfg)])
        with torch.no_grad():
            alone = model.hidden_states(t).mean(1)[0]
        assert float((emb[i] - alone).norm() / alone.norm()) <= 1e-5


def test_selector_rows_are_balanced_and_held_out(tiny):
    _, _, reg_path = tiny
    train, train_y, held, held_y = selector_rows(load_registry(reg_path), None, 5, seed=0)
    assert [train_y.count(t) for t in range(3)] == [35, 35, 35]  # the smallest task has 40 - 5
    assert [held_y.count(t) for t in range(3)] == [5, 5, 5]
    keys = {r["instruction"] for r in held}
    assert not keys & {r["instruction"] for r in train}


def test_train_selector_cli_and_example_top1_equals_each_row_with_its_own_adapter(tiny, tmp_path, capsys):
    root, base, reg = tiny
    sel_path = tmp_path / "sel.pt"
    assert train_selector_main(["--adapter_registry", str(reg), "--ckpt_dir", str(base), "--out", str(sel_path),
                                "--kind", "mlp", "--heldout_per_task", "8", "--steps", "200", "--max_tokens", "96",
                                "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "held-out routing accuracy" in out and "yesno" in out
    report = load_selector(sel_path).report
    assert report["heldout"]["rows"] == 24 and report["heldout"]["accuracy"] >= 0.9, report

    # A mixed test set the selector routes perfectly (checked below), generated with top-1 routing.
    test = [dict(r, task=t) for t in TASKS for r in task_rows(t, 3, seed=99)]
    test_path = write_rows(tmp_path / "test.json", test)
    common = ["--ckpt_dir", str(base), "--data_path", str(test_path), "--max_gen_len", "6", "--min_gen_len", "6",
              "--temperature", "0", "--max_batch_size", "4", "--progress", "False"]
    example_main(common + ["--adapter_registry", str(reg), "--selector", str(sel_path), "--fusion", "top1",
                           "--save_path", str(tmp_path / "routed.jsonl")])
    routed = [json.loads(line) for line in (tmp_path / "routed.jsonl").read_text().splitlines()]
    assert [r["selected_task"] for r in routed] == [r["task"] for r in test]
    alone = {}
    for t in TASKS:
        example_main(common + ["--adapter_path", str(root / t / "adapter.pth"),
                               "--save_path", str(tmp_path / f"{t}.jsonl")])
        alone[t] = [json.loads(line)["generate"] for line in (tmp_path / f"{t}.jsonl").read_text().splitlines()]
    for i, r in enumerate(routed):
        assert r["generate"] == alone[r["task"]][i]
    assert len({tuple(alone[t]) for t in TASKS}) == 3  # the adapters do change the text
    example_main(common + ["--adapter_registry", str(reg), "--selector", str(sel_path), "--fusion", "topp",
                           "--top_p_adapters", "0.5", "--save_path", str(tmp_path / "fused.jsonl")])
    fused = [json.loads(line) for line in (tmp_path / "fused.jsonl").read_text().splitlines()]
    assert all(abs(sum(r["adapter_weights"].values()) - 1) < 1e-4 for r in fused)


def test_example_routing_flag_errors(tiny, tmp_path):
    _, base, reg = tiny
    args = ["--ckpt_dir", str(base), "--data_path", "x.json", "--save_path", str(tmp_path / "o.jsonl")]
    with pytest.raises(SystemExit):
        example_main(args + ["--adapter_registry", str(reg)])  # no --selector
    with pytest.raises(SystemExit):
        example_main(args + ["--adapter_registry", str(reg), "--selector", "s.pt", "--top_p_adapters", "0"])


def test_task_routed_model_generates_each_row_as_alone_and_can_be_called_again(tiny, tmp_path):
    """The in-process API: load once, generate twice (top-1, then top-p) on one model; top-1 rows equal
    each row generated alone with its own adapter (greedy, fp32)."""
    from moa import TaskRoutedModel, load_adapter
    from moa.infer.generate import encode_prompt
    from moa.tasks.selector import train_on_registry

    root, base, reg = tiny
    model, tok = load_model(base)
    sel_path = save_selector(train_on_registry(model, tok, load_registry(reg), "mlp", heldout_per_task=8,
                                               steps=200, max_tokens=96), tmp_path / "sel.pt")
    served = TaskRoutedModel.load(base, reg, sel_path)
    test = [dict(r, task=t) for t in TASKS for r in task_rows(t, 2, seed=98)]
    first = served.generate(test, max_gen_len=6, max_batch_size=4)
    assert [o["selected_task"] for o in first] == [r["task"] for r in test]
    for row, o in zip(test, first):
        alone, _ = load_model(base)
        load_adapter(alone, str(root / row["task"] / "adapter.pth"))
        tokens, _ = encode_prompt(tok, row, alone.args.max_seq_len - 1)
        assert o["generate"] == tok.decode(generate(alone, [tokens], 6, tokenizer=tok)[0])
        assert o["adapter_weights"] == {row["task"]: 1.0}
    again = served.generate([r["instruction"] for r in test[:2]], max_gen_len=6, fusion="topp", top_p_adapters=0.5)
    assert len(again) == 2 and all(abs(sum(o["adapter_weights"].values()) - 1) < 1e-4 for o in again)
    with pytest.raises(ValueError, match="--fusion"):
        served.generate(test, fusion="top3")


def overlapping(n_per_task: int, seed: int, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian clusters whose means are only 1.5 std apart: a selector cannot be sure."""
    means = torch.zeros(3, dim)
    means[0, 0], means[1, 1], means[2, 2] = 1.5, 1.5, 1.5
    labels = torch.arange(3).repeat_interleave(n_per_task)
    return means[labels] + torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(seed)), labels


def test_temperature_scaling_on_held_out_rows_matches_a_brute_force_minimum_and_softens_top_p():
    from moa.tasks.fusion import top_p_weights
    from moa.tasks.selector import calibrate_temperature

    x, y = overlapping(40, seed=1)
    # An MLP trained long on few rows is overconfident where the classes overlap.
    sel = fit_selector(SelectorConfig(kind="mlp", tasks=TASKS, dim=8, hidden=64, steps=600, lr=1e-2), x, y)
    hx, hy = overlapping(100, seed=2)
    before_pred, before_probs = sel.predict(hx), sel.probs(hx)
    result = calibrate_temperature(sel, hx, hy)
    # The reference: the NLL on a fine log grid of temperatures, computed directly.
    raw = sel.mlp((hx - sel.mean) / sel.std).double()
    grid = torch.logspace(-2, 2, 4001, dtype=torch.float64)
    nll = torch.stack([torch.nn.functional.cross_entropy(raw / t, hy) for t in grid])
    assert abs(math.log(result["temperature"]) - math.log(float(grid[nll.argmin()]))) < 2e-3
    assert result["temperature"] > 1.5  # overconfident, so softened
    assert result["nll_after"] < result["nll_before"] and abs(result["nll_after"] - float(nll.min())) < 1e-6
    assert torch.equal(sel.predict(hx), before_pred)  # routing by argmax unchanged
    # top-p 0.9 keeps more than one adapter on more rows once the probabilities are calibrated.
    kept = lambda p: int(((top_p_weights(p, 0.9) > 0).sum(-1) > 1).sum())
    assert kept(sel.probs(hx)) > kept(before_probs)


def test_calibration_is_saved_and_old_files_load_at_temperature_one(tmp_path):
    x, y = separable(20, seed=0)
    sel = fit_selector(SelectorConfig(kind="mlp", tasks=TASKS, dim=32, steps=50), x, y)
    assert sel.cfg.calibration == 1.0
    sel.cfg.calibration = 2.5
    again = load_selector(save_selector(sel, tmp_path / "sel.pt"))
    assert again.cfg.calibration == 2.5 and torch.allclose(again.probs(x), sel.probs(x))
    with pytest.raises(ValueError, match="calibration temperature"):
        SelectorConfig(kind="mlp", tasks=TASKS, dim=32, calibration=0.0)


# ---- what is embedded: --encoder and the row fields --------------------------------------------------

def test_encoder_hidden_layer_is_the_block_output_of_a_full_forward_and_later_blocks_never_run_rel1em5(tiny):
    """Reference: a forward hook on block 0 during the whole model's forward of each row alone."""
    _, base, _ = tiny
    model, tok = load_model(base)
    rows = task_rows("add", 2) + task_rows("pick", 2)
    cfg = EmbedConfig(encoder="hidden:0", max_tokens=96)
    calls = []
    later = model.layers[1].register_forward_hook(lambda *_: calls.append(1))
    emb = embed_rows(model, tok, rows, cfg, batch_size=4)  # one padded batch
    later.remove()
    assert calls == []
    for i, row in enumerate(rows):
        seen = {}
        hook = model.layers[0].register_forward_hook(lambda m, args, out: seen.update(h=out))
        with torch.no_grad():
            model(torch.tensor([row_tokens(tok, row, cfg)]))
        hook.remove()
        alone = seen["h"][0].mean(0)  # (dim,)
        assert float((emb[i] - alone).norm() / alone.norm()) <= 1e-5
    with pytest.raises(ValueError, match=r"--encoder hidden:2: the base has 2 blocks \(0-1\)"):
        embed_rows(model, tok, rows, EmbedConfig(encoder="hidden:2"))
    for bad in ("hidden:x", "final", "hidden:-1"):
        with pytest.raises(ValueError, match="--encoder: expected hidden, hidden:LAYER"):
            EmbedConfig(encoder=bad)


def test_encoder_input_embedding_is_the_mean_token_embedding_and_runs_no_block_exact(tiny):
    _, base, _ = tiny
    model, tok = load_model(base)
    rows = task_rows("yesno", 3)
    cfg = EmbedConfig(encoder="input_embedding", max_tokens=96)
    calls = []
    hooks = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in model.layers]
    emb = embed_rows(model, tok, rows, cfg)
    for h in hooks:
        h.remove()
    assert calls == []
    for i, row in enumerate(rows):
        ids = torch.tensor(row_tokens(tok, row, cfg))
        assert torch.allclose(emb[i], model.tok_embeddings.weight[ids].mean(0), rtol=1e-6, atol=1e-7)


def test_row_fields_hand_written_texts_and_output_for_training_rows_only():
    from moa.tasks.embedding import row_text

    row = {"instruction": "I", "input": "X", "output": "O"}
    assert row_text(row) == "I\n\nX"  # the default: instruction and input, as before
    assert row_text(row, EmbedConfig(use_input=False)) == "I"
    assert row_text(row, EmbedConfig(use_instruction=False)) == "X"
    with_output = EmbedConfig(use_output=True)
    assert row_text(row, with_output, training=True) == "I\n\nX\n\nO"
    assert row_text(row, with_output, training=False) == "I\n\nX"  # a row to route has no output
    assert row_text({"instruction": "I", "input": None}) == "I"
    with pytest.raises(ValueError, match=r"no text in the embedded field\(s\) \['input'\]"):
        row_text({"instruction": "I", "input": ""}, EmbedConfig(use_instruction=False))
    with pytest.raises(ValueError, match="--use_instruction False --use_input False: routing embeds"):
        EmbedConfig(use_instruction=False, use_input=False, use_output=True)
    with pytest.raises(ValueError, match="--use_input: expected True or False"):
        SelectorConfig(kind="mlp", tasks=TASKS, dim=8, use_input="yes")


def test_use_output_embeds_the_output_of_training_rows_not_of_held_out_rows(tiny, monkeypatch):
    """Reference: the token lists the embedder is given, against the texts written by hand."""
    import moa.tasks.selector as selector
    from moa.tasks.selector import task_splits, train_on_registry

    _, base, reg_path = tiny
    model, tok = load_model(base)
    seen: list[list[list[int]]] = []
    real = selector.embed_tokens
    monkeypatch.setattr(selector, "embed_tokens", lambda m, tokens, *a: seen.append(list(tokens)) or real(m, tokens, *a))
    reg = load_registry(reg_path)
    sel = train_on_registry(model, tok, reg, "mlp", rows_per_task=4, heldout_per_task=2, steps=5, max_tokens=200,
                            use_output=True)
    assert sel.cfg.use_output and sel.cfg.embed_config.fields(training=False) == ("instruction", "input")
    split = task_splits(reg, reg.tasks, 4, 2)["add"]
    train_row, held_row = split.rows[split.train[0]], split.rows[split.held[0]]
    tokens = seen[0]
    assert tokens[0] == tok.encode(f"{train_row['instruction']}\n\n{train_row['output']}", bos=True, eos=False)
    assert tokens[3 * 4] == tok.encode(held_row["instruction"], bos=True, eos=False)  # held-out rows follow


def test_encoder_and_fields_are_stored_and_routing_embeds_as_trained(tiny, tmp_path):
    """Reference: the selector's probabilities of the mean token embeddings computed by hand; an old
    file without these fields (tests/fixtures/legacy) loads as hidden over instruction + input."""
    from pathlib import Path

    from moa import TaskRoutedModel
    from moa.tasks.selector import train_on_registry

    _, base, reg_path = tiny
    model, tok = load_model(base)
    sel = train_on_registry(model, tok, load_registry(reg_path), "mlp", heldout_per_task=8, steps=100, max_tokens=96,
                            encoder="input_embedding")
    path = save_selector(sel, tmp_path / "sel.pt")
    assert load_selector(path).cfg.embed_config == EmbedConfig(encoder="input_embedding", max_tokens=96)
    rows = [r for t in TASKS for r in task_rows(t, 2, seed=97)]
    served = TaskRoutedModel.load(base, reg_path, path)
    by_hand = torch.stack([model.tok_embeddings.weight[torch.tensor(row_tokens(tok, r, EmbedConfig(max_tokens=96)))]
                           .mean(0) for r in rows]).detach()
    assert torch.allclose(served.route(rows).probs, sel.probs(by_hand), atol=1e-6)
    legacy = load_selector(Path(__file__).parent / "fixtures" / "legacy" / "selector.pt")
    assert legacy.cfg.embed_config == EmbedConfig(max_tokens=legacy.cfg.max_tokens) and legacy.task_data == {}
