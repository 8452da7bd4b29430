"""moa/tasks/selector_update.py (scripts/train_selector.py --update), the embedding cache, and the
Adapters Selector data-config format of a registry (moa/tasks/registry.py load_pool_registry).

References: the rows passed to the embedder, counted (an update embeds only the rows it never saw);
the same update with every row embedded afresh (probabilities within 1e-5: cached rows were embedded
in other padded batches); a fresh training on the same registry; the warm-started MLP's logits by hand
(x W1^T + b1 -> GELU -> W2^T + b2, rows picked by name); nearest keys kept bit for bit, new keys equal
to the new rows standardised with the old statistics; hand-counted rows per task (ceil(r n)).
"""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import moa.tasks.embedding as embedding
import moa.tasks.selector as selector
from llama.checkpoint import load_model
from moa.tasks.embedding import EmbedConfig, EmbeddingCache, base_identity, embed_rows
from moa.tasks.registry import add_task, balance_tasks, delete_task, load_pool_registry, load_registry
from moa.tasks.selector import (
    SelectorConfig,
    fit_selector,
    load_selector,
    row_order,
    save_selector,
    task_splits,
    train_on_registry,
)
from moa.tasks.selector_update import plan_update, update_selector, warm_start_mlp
from scripts.registry import main as registry_main
from scripts.train_selector import main as train_selector_main
from tests.helpers import write_meta_model_dir
from tests.task_helpers import make_task_adapter, task_rows, write_rows

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

ROWS = {"add": 40, "yesno": 45, "pick": 50}
HELD = 8
N = 32  # balanced training rows per task: min(40, 45, 50) - HELD
MLP = dict(steps=60, max_tokens=96)


def unique_rows(task: str, n: int) -> list[dict]:
    """n synthetic rows of `task` with distinct instructions (the cache embeds a repeated text once)."""
    rows = list({r["instruction"]: r for r in task_rows(task, 2 * n)}.values())
    assert len(rows) >= n
    return rows[:n]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny base, three task adapters and their rows (not registered)."""
    root = tmp_path_factory.mktemp("selector_update")
    base = root / "base"
    write_meta_model_dir(base, seed=3)
    adapters, data = {}, {}
    for i, (t, n) in enumerate(ROWS.items()):
        adapters[t] = make_task_adapter(base, root / t / "adapter.pth", seed=10 + i, scale=0.3)
        data[t] = write_rows(root / t / "train.json", unique_rows(t, n))
    model, tok = load_model(base)
    return base, adapters, data, model, tok


def registry(path, files, tasks):
    _, adapters, data, _, _ = files
    for t in tasks:
        add_task(path, "synthetic", t, adapters[t], data[t])
    return path


@pytest.fixture
def counted(monkeypatch):
    """The number of rows each call of embed_tokens is given (cache or not)."""
    calls: list[int] = []
    real = embedding.embed_tokens

    def counting(model, tokens, *args, **kwargs):
        calls.append(len(tokens))
        return real(model, tokens, *args, **kwargs)

    monkeypatch.setattr(embedding, "embed_tokens", counting)
    monkeypatch.setattr(selector, "embed_tokens", counting)
    return calls


def probe(model, tok) -> torch.Tensor:
    rows = [r for t in ROWS for r in task_rows(t, 4, seed=77)]
    return embed_rows(model, tok, rows, EmbedConfig(max_tokens=96))


def test_row_order_is_per_task_and_stable_under_a_shorter_prefix():
    order = row_order("add", 30, seed=0)
    assert sorted(order) == list(range(30))
    # the first 20 rows of the file (n_train 20) keep their relative order
    assert [i for i in order if i < 20] == row_order("add", 20, seed=0)
    assert row_order("add", 30, seed=1) != order and row_order("pick", 30, seed=0) != order


def test_update_add_embeds_only_the_new_tasks_rows_and_equals_embedding_everything_afresh(files, tmp_path, counted):
    base, _, _, model, tok = files
    reg_path = registry(tmp_path / "tasks.json", files, ["add", "yesno"])
    cache = EmbeddingCache(tmp_path / "cache", base_identity(base))
    old = train_on_registry(model, tok, load_registry(reg_path), "mlp", heldout_per_task=HELD, cache=cache, **MLP)
    assert counted == [2 * (N + HELD)]  # every row of the two tasks, once
    registry(reg_path, files, ["pick"])
    reg = load_registry(reg_path)

    counted.clear()
    mixed = update_selector(model, tok, old, reg, "add", "mix", 0.5, cache=cache)
    assert counted == [N + HELD]  # pick's rows only: the old tasks' rows come from the cache
    k = math.ceil(0.5 * N)
    assert mixed.report["train_rows"] == {"add": k, "yesno": k, "pick": N}
    assert mixed.cfg.tasks == ["add", "yesno", "pick"] and mixed.report["update"]["added"] == ["pick"]
    assert torch.equal(mixed.mean, old.mean) and torch.equal(mixed.std, old.std)  # mix keeps the statistics
    counted.clear()
    afresh = update_selector(model, tok, old, reg, "add", "mix", 0.5)  # no cache: every row embedded now
    assert counted == [2 * k + N + 3 * HELD]
    x = probe(model, tok)
    assert torch.allclose(mixed.probs(x), afresh.probs(x), atol=1e-5)
    assert torch.equal(mixed.predict(x), afresh.predict(x))
    assert mixed.report["heldout"]["rows"] == 3 * HELD

    counted.clear()
    new = update_selector(model, tok, old, reg, "add", "new", cache=cache)
    assert counted == []  # every row is cached: the old tasks' by the old training, pick's by the mix update
    fresh = train_on_registry(model, tok, reg, "mlp", heldout_per_task=HELD, **MLP)  # same classes, same order
    assert torch.allclose(new.probs(x), fresh.probs(x), atol=1e-5) and torch.equal(new.predict(x), fresh.predict(x))
    assert not torch.equal(new.mean, old.mean)  # new: its own statistics


def test_warm_started_mlp_keeps_each_old_class_row_by_name_logits_by_hand():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 8, generator=g), torch.arange(3).repeat(10)
    old = fit_selector(SelectorConfig(kind="mlp", tasks=["a", "b", "c"], dim=8, hidden=16, steps=5), x, y)
    before = {k: v.clone() for k, v in old.mlp.state_dict().items()}
    warm = warm_start_mlp(old, ["a", "c", "d"], seed=4)
    q = torch.randn(5, 8, generator=g)
    w1, b1, w2, b2 = (before[k] for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
    hidden = F.gelu(q @ w1.t() + b1)  # (5, 16)
    by_hand = hidden @ w2.t() + b2  # (5, 3): a, b, c
    with torch.no_grad():
        out = warm(q)
    assert out.shape == (5, 3)
    assert torch.allclose(out[:, 0], by_hand[:, 0], atol=1e-6) and torch.allclose(out[:, 1], by_hand[:, 2], atol=1e-6)
    torch.manual_seed(4)
    fresh = torch.nn.Linear(16, 3)  # the new class "d": nn.Linear's own initialisation, seeded
    assert torch.equal(warm[2].weight[2], fresh.weight[2]) and torch.equal(warm[2].bias[2], fresh.bias[2])
    assert all(torch.equal(v, old.mlp.state_dict()[k]) for k, v in before.items())  # the old one untouched


def test_nearest_update_keeps_unchanged_keys_and_adds_or_drops_only_the_affected(files, tmp_path, counted):
    base, _, _, model, tok = files
    reg_path = registry(tmp_path / "tasks.json", files, ["add", "yesno"])
    cache = EmbeddingCache(tmp_path / "cache", base_identity(base))
    # n_clusters >= the rows of a task: its keys are its rows themselves (no k-means averaging)
    opts = dict(max_tokens=96, metric="cos", n_clusters=64)
    old = train_on_registry(model, tok, load_registry(reg_path), "nearest", heldout_per_task=HELD, cache=cache, **opts)
    registry(reg_path, files, ["pick"])
    reg = load_registry(reg_path)
    added = update_selector(model, tok, old, reg, "add", "mix", cache=cache)
    for c, t in enumerate(["add", "yesno"]):
        assert torch.equal(added.keys[added.key_task == c], old.keys[old.key_task == c])
    split = task_splits(reg, reg.tasks, None, HELD, seed=0)["pick"]
    pick_rows = embed_rows(model, tok, [split.rows[i] for i in split.train], EmbedConfig(max_tokens=96))
    expected = F.normalize((pick_rows - old.mean) / old.std, dim=-1)  # in the old selector's space
    assert torch.allclose(added.keys[added.key_task == 2], expected, atol=1e-5)
    assert added.report["train_rows"] == {"add": 0, "yesno": 0, "pick": N}

    delete_task(reg_path, "yesno")
    counted.clear()
    dropped = update_selector(model, tok, added, load_registry(reg_path), "delete", "mix", cache=cache)
    assert counted == []  # only held-out rows, all cached
    assert dropped.cfg.tasks == ["add", "pick"]
    assert torch.equal(dropped.keys[dropped.key_task == 0], added.keys[added.key_task == 0])
    assert torch.equal(dropped.keys[dropped.key_task == 1], added.keys[added.key_task == 2])
    assert torch.equal(dropped.mean, old.mean) and dropped.report["train"] is None
    with pytest.raises(ValueError, match="--reduce_ratio: only for --mode mix of an mlp selector"):
        update_selector(model, tok, added, load_registry(reg_path), "delete", "mix", 0.5)


def test_the_action_must_match_what_changed_in_the_registry(files, tmp_path):
    _, _, _, model, tok = files
    reg_path = registry(tmp_path / "tasks.json", files, ["add", "yesno"])
    old = train_on_registry(model, tok, load_registry(reg_path), "mlp", heldout_per_task=HELD, steps=5, max_tokens=96)
    reg = load_registry(reg_path)
    with pytest.raises(ValueError, match="--action add: .*tasks.json registers no task the selector lacks"):
        plan_update(old, reg, "add")
    with pytest.raises(ValueError, match="--action delete: every class of the selector is still in"):
        plan_update(old, reg, "delete")
    with pytest.raises(ValueError, match="--action balance: every task in .* has the rows the selector was trained on"):
        plan_update(old, reg, "balance")
    balance_tasks(reg_path)  # n_train 40 each: add keeps its 40 rows, yesno loses 5
    plan = plan_update(old, load_registry(reg_path), "balance")
    assert plan.changed == ["yesno"] and plan.tasks == ["add", "yesno"]
    balanced = update_selector(model, tok, old, load_registry(reg_path), "balance", "mix", 0.25)
    assert balanced.report["train_rows"] == {"add": math.ceil(0.25 * N), "yesno": N}
    registry(reg_path, files, ["pick"])
    delete_task(reg_path, "add")
    with pytest.raises(ValueError, match=r"--action add: task\(s\) \['add'\] are no longer in"):
        plan_update(old, load_registry(reg_path), "add")
    delete_task(reg_path, "pick")
    with pytest.raises(ValueError, match=r"the selector would keep \['yesno'\]; a selector needs at least 2 tasks"):
        plan_update(old, load_registry(reg_path), "delete")
    old.task_data = {}  # a file written before task_data existed: every task counts as changed
    assert plan_update(old, reg, "balance").changed == ["add", "yesno"]


def test_train_selector_update_cli_prints_the_cache_and_refuses_a_changed_flag(files, tmp_path, capsys):
    base, _, _, _, _ = files
    reg_path = registry(tmp_path / "tasks.json", files, ["add", "yesno"])
    common = ["--adapter_registry", str(reg_path), "--ckpt_dir", str(base), "--heldout_per_task", str(HELD),
              "--device", "cpu"]
    old = tmp_path / "sel.pt"
    assert train_selector_main(common + ["--out", str(old), "--steps", "40", "--max_tokens", "96"]) == 0
    assert f"embedded {2 * (N + HELD)} rows with the base, 0 from the cache {tmp_path / 'embed_cache'}" in \
        capsys.readouterr().out
    registry(reg_path, files, ["pick"])
    new = tmp_path / "sel2.pt"
    assert train_selector_main(common + ["--out", str(new), "--update", str(old), "--action", "add", "--mode", "mix",
                                         "--reduce_ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    k = math.ceil(0.5 * N)
    assert f"embedded {N + HELD} rows with the base, {2 * (k + HELD)} from the cache" in out
    assert "updated (add, --mode mix, --reduce_ratio 0.5) from tasks ['add', 'yesno']: added ['pick']" in out
    sel = load_selector(new)
    assert sel.cfg.tasks == ["add", "yesno", "pick"] and sel.cfg.max_tokens == 96 and sel.cfg.steps == 40
    assert train_selector_main(common + ["--out", str(new), "--update", str(old), "--action", "add",
                                         "--encoder", "input_embedding"]) == 2
    assert "--encoder input_embedding: --update" in capsys.readouterr().err
    assert train_selector_main(common + ["--out", str(new), "--update", str(new), "--action", "balance"]) == 2
    assert "--action balance: every task in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_selector_main(common + ["--out", str(new), "--update", str(old)])  # no --action


def test_adapters_selector_data_config_and_adapter_pool_load_as_the_same_registry(files, tmp_path, capsys):
    base, adapters, data, model, tok = files
    reg_path = registry(tmp_path / "tasks.json", files, ["add", "yesno"])
    (tmp_path / "data.json").write_text(json.dumps({"synthetic": {t: str(data[t]) for t in ("add", "yesno")}}))
    (tmp_path / "pool.json").write_text(json.dumps({"synthetic": {t: str(adapters[t]) for t in ("add", "yesno")}}))
    pair = load_pool_registry(tmp_path / "data.json", tmp_path / "pool.json")
    plain = load_registry(reg_path)
    assert [(e.domain, e.task, e.adapter.resolve(), e.data.resolve()) for e in pair.entries] == \
        [(e.domain, e.task, e.adapter.resolve(), e.data.resolve()) for e in plain.entries]
    # the tree form of the data: ROOT/domain/task/train.json, relative pool paths
    for t in ("add", "yesno"):
        (tmp_path / "tree" / "synthetic" / t).mkdir(parents=True)
        shutil.copy(data[t], tmp_path / "tree" / "synthetic" / t / "train.json")
        shutil.copytree(adapters[t].parent, tmp_path / "pool" / t)
    (tmp_path / "rel_pool.json").write_text(json.dumps({"synthetic": {t: f"pool/{t}/adapter.pth"
                                                                      for t in ("add", "yesno")}}))
    tree = load_pool_registry(tmp_path / "tree", tmp_path / "rel_pool.json")
    assert tree.tasks == ["add", "yesno"] and tree.entry("yesno").adapter == tmp_path / "pool/yesno/adapter.pth"

    (tmp_path / "more.json").write_text(json.dumps({"synthetic": {t: str(adapters[t]) for t in ROWS}}))
    with pytest.raises(ValueError, match=r"task synthetic/pick is in --adapter_pool .*more.json but not in "
                                         r"--data_config .*data.json"):
        load_pool_registry(tmp_path / "data.json", tmp_path / "more.json")
    (tmp_path / "other.json").write_text(json.dumps({"other": {t: str(adapters[t]) for t in ("add", "yesno")}}))
    with pytest.raises(ValueError, match=r"task add is in domain 'synthetic' in --data_config .*data.json but in "
                                         r"domain 'other' in --adapter_pool .*other.json"):
        load_pool_registry(tmp_path / "data.json", tmp_path / "other.json")
    (tmp_path / "bad.json").write_text(json.dumps({"synthetic": {"add": {"adapter": "x"}}}))
    with pytest.raises(ValueError, match=r"--adapter_pool .*bad.json: task synthetic/add: expected the adapter "
                                         r"file's path \(a string\), got dict"):
        load_pool_registry(tmp_path / "data.json", tmp_path / "bad.json")

    # the command lines: a selector trained on the pair equals one trained on the registry JSON
    for name, flags in (("reg", ["--adapter_registry", str(reg_path)]),
                        ("pair", ["--data_config", str(tmp_path / "data.json"), "--adapter_pool",
                                  str(tmp_path / "pool.json")])):
        assert train_selector_main(flags + ["--ckpt_dir", str(base), "--out", str(tmp_path / f"{name}.pt"),
                                            "--heldout_per_task", str(HELD), "--steps", "20", "--max_tokens", "96",
                                            "--embed_cache", "none", "--device", "cpu"]) == 0
    x = probe(model, tok)
    assert torch.equal(load_selector(tmp_path / "reg.pt").probs(x), load_selector(tmp_path / "pair.pt").probs(x))
    assert train_selector_main(["--data_config", str(tmp_path / "data.json"), "--ckpt_dir", str(base),
                                "--out", str(tmp_path / "x.pt")]) == 2
    assert "--data_config and --adapter_pool go together" in capsys.readouterr().err
    assert registry_main(["import", "--data_config", str(tmp_path / "tree"), "--adapter_pool",
                          str(tmp_path / "rel_pool.json"), "--registry", str(tmp_path / "imported.json")]) == 0
    assert load_registry(tmp_path / "imported.json").tasks == ["add", "yesno"]
    assert registry_main(["list", "--data_config", str(tmp_path / "data.json"), "--adapter_pool",
                          str(tmp_path / "pool.json")]) == 0
    assert "synthetic/yesno" in capsys.readouterr().out


def test_routing_takes_the_adapters_in_the_selectors_class_order(files, tmp_path):
    """An updated selector's classes (old order + appended) may differ from the registry's order: routing
    matches them by name."""
    from moa import TaskRoutedModel

    base, _, _, model, tok = files
    reg_path = registry(tmp_path / "tasks.json", files, ["add", "yesno", "pick"])
    sel = train_on_registry(model, tok, load_registry(reg_path), "mlp", heldout_per_task=HELD, steps=200, max_tokens=96)
    assert sel.report["heldout"]["accuracy"] == 1.0
    reordered = registry(tmp_path / "reordered.json", files, ["pick", "add", "yesno"])
    served = TaskRoutedModel.load(base, reordered, save_selector(sel, tmp_path / "sel.pt"))
    assert served.tasks == ["add", "yesno", "pick"]
    rows = [dict(r, task=t) for t in ("pick", "add", "yesno") for r in task_rows(t, 2, seed=91)]
    plan = served.route(rows)
    assert [plan.row_info(i)["selected_task"] for i in range(len(rows))] == [r["task"] for r in rows]
    # each row runs on its own task's adapter: as with the registry in the selector's own order
    in_order = TaskRoutedModel.load(base, reg_path, tmp_path / "sel.pt")
    assert served.generate(rows, max_gen_len=5) == in_order.generate(rows, max_gen_len=5)
    two = registry(tmp_path / "two.json", files, ["add", "yesno"])
    with pytest.raises(ValueError, match=r"not there: \['pick'\]\); update it with scripts/train_selector.py --update"):
        TaskRoutedModel.load(base, two, tmp_path / "sel.pt")
