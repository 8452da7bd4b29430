"""Registry entries whose adapter is not a plain LoRA (moa/tasks/swap.py, routing.py, serving.py): a Soft
MoA, a second Soft MoA of the same flags (with a base_trained.pth) and a HydraLoRA registered beside two
plain LoRAs, routed top-1 in mixed batches.

References: every row generated alone with its own adapter loaded through the single-adapter path of
example.py --adapter_path (`load_trained_adapter` on a freshly loaded base; the CLI itself for the
example.py test), greedy, fp32, token for token. "Clean" is checked against the model as loaded: the
same module classes, state_dict keys and values, requires_grad, and logits of the bare base outside rows.
A data config and an adapter pool (`--data_config D --adapter_pool P`, `load_pool_registry`) are checked against the
registry JSON that `scripts/registry.py import` writes from them (records and text equal).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from example import main as example_main
from llama.checkpoint import load_model
from llama.generation import generate
from llama.model import Transformer
from moa import MoAConfig, attach_adapters
from moa.files.adapters import load_trained_adapter, write_adapter_files
from moa.infer.generate import Prompt, encode_prompt, make_batches
from moa.method.inject import adapter_names
from moa.method.state import adapter_state_dict
from moa.tasks.registry import add_task, load_registry
from moa.tasks.routing import RoutingPlan, load_task_adapters
from moa.tasks.selector import Selector, SelectorConfig, save_selector
from moa.tasks.swap import adapter_method
from scripts.registry import main as registry_main
from tests.helpers import TINY_PARAMS, write_meta_model_dir
from tests.task_helpers import make_task_adapter, write_rows

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

TASKS = ["lora0", "lora1", "soft_a", "soft_b", "hydra"]
# Soft MoA: 5 LoRA types + prompt + parallel adapter in layer 1, SwiGLU type router (the paper's Soft MoA
# command's shape).
SOFT = MoAConfig(lora_layers="0-2", lora_targets="Q,K,V,O,FFN_DOWN", lora_rank=4, lora_alpha=8, prompt_layers="1-2",
                 prompt_len=3, p_adapter_layers="0-2", p_adapter_size=8, type_router="soft", swi_x=4)
HYDRA = MoAConfig(lora_layers="0-2", lora_targets="Q,V,FFN_UP", lora_rank=4, lora_alpha=8, expert_num=3,
                  hydra_moe=True, type_router="none")
TEXTS = {"lora0": "Add the numbers {a} and {b}.", "lora1": "Is the sky {c} over town {a}? yes or no",
         "soft_a": "Translate the colour {c} into French, number {b}.", "soft_b": "Write a haiku about {a} {c} cats",
         "hydra": "Sort {a}, {b} and {a}{b} in ascending order"}
COLORS = ["blue", "red", "green", "grey", "black", "white"]


def make_moa_adapter(base: Path, path: Path, cfg: MoAConfig, seed: int, scale: float = 0.2,
                     base_trained: dict | None = None) -> Path:
    """Write an adapter of `cfg` whose every tensor (routers, prompt gates, B) is its init plus seeded noise
    (zero-init gates and B would hide a wrong swap)."""
    model, _ = load_model(base)
    attach_adapters(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in adapter_names(model):
            p = model.get_parameter(name)
            p.add_(scale * torch.randn(p.shape, generator=g))
    return write_adapter_files(path, cfg, adapter_state_dict(model), base_trained=base_trained)


def rows_of(task: str, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed + sum(map(ord, task)))
    out = []
    for _ in range(n):
        a, b, c = (int(v) for v in torch.randint(0, 100, (3,), generator=g))
        out.append({"instruction": TEXTS[task].format(a=a, b=b, c=COLORS[c % len(COLORS)]), "input": "",
                    "output": "x", "answer": "x", "task": task})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny base, the five adapters, and the registry listing them in TASKS order."""
    root = tmp_path_factory.mktemp("moa_entries")
    base = root / "base"
    write_meta_model_dir(base, seed=11)
    g = torch.Generator().manual_seed(5)
    norms = {"layers.0.attention_norm.weight": 1 + 0.3 * torch.randn(TINY_PARAMS["dim"], generator=g),
             "norm.weight": 1 + 0.3 * torch.randn(TINY_PARAMS["dim"], generator=g)}
    paths = {"lora0": make_task_adapter(base, root / "lora0" / "adapter.pth", seed=0, scale=0.3),
             "lora1": make_task_adapter(base, root / "lora1" / "adapter.pth", seed=1, rank=2, targets="Q,K,O",
                                        scale=0.3),
             "soft_a": make_moa_adapter(base, root / "soft_a" / "adapter.pth", SOFT, seed=2),
             "soft_b": make_moa_adapter(base, root / "soft_b" / "adapter.pth", SOFT, seed=3, base_trained=norms),
             "hydra": make_moa_adapter(base, root / "hydra" / "adapter.pth", HYDRA, seed=4)}
    reg = root / "tasks.json"
    for t in TASKS:
        add_task(reg, "demo", t, paths[t], write_rows(root / "data" / f"{t}.json", rows_of(t, 4, seed=0)))
    return root, base, paths, reg


def alone(base: Path, path: Path, prompts: list[list[int]], n: int, **kw) -> list[list[int]]:
    """Each prompt generated alone (batch of 1) with the adapter at `path` loaded as example.py
    --adapter_path loads it (`path` None: the bare base)."""
    model, _ = load_model(base)
    if path is not None:
        load_trained_adapter(model, path, base)
    model.eval()
    return [generate(model, [p], n, **kw)[0] for p in prompts]


def module_state(model: torch.nn.Module) -> tuple[list, dict, list]:
    """What "the model as loaded" means: module classes in order, state_dict (cloned), requires_grad."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def assert_same_state(model: torch.nn.Module, before: tuple[list, dict, list]) -> None:
    classes, sd, grads = module_state(model)
    assert type(model) is Transformer and getattr(model, "moa_config", None) is None
    assert classes == before[0] and grads == before[2]
    assert set(sd) == set(before[1]) and all(torch.equal(sd[k], before[1][k]) for k in sd)


def test_registry_records_each_entry_kind_and_the_cli_lists_it(setup, tmp_path, capsys):
    root, base, paths, reg = setup
    assert [e.kind for e in load_registry(reg).entries] == ["lora", "lora", "moa", "moa", "moa"]
    out = tmp_path / "tasks.json"
    assert registry_main(["add", "--registry", str(out), "--domain", "d", "--task", "soft", "--adapter",
                          str(paths["soft_a"]), "--data", str(root / "data" / "soft_a.json")]) == 0
    printed = capsys.readouterr().out
    assert "d/soft: moa adapter (Soft MoA (LoRA + prompt + parallel adapter))" in printed
    assert json.loads(out.read_text())["d"]["soft"].keys() == {"adapter", "data"}  # the kind is never stored
    # A plain LoRA whose training also changed base tensors (--w_bias) is served by attaching it too.
    lora_cfg = MoAConfig(lora_layers="0-1", lora_targets="Q", lora_rank=2, type_router="none")
    model, _ = load_model(base)
    attach_adapters(model, lora_cfg)
    write_adapter_files(tmp_path / "wb" / "adapter.pth", lora_cfg, adapter_state_dict(model),
                        base_trained={"norm.weight": torch.ones(TINY_PARAMS["dim"])})
    add_task(out, "d", "wbias", tmp_path / "wb" / "adapter.pth", root / "data" / "lora0.json")
    assert [e.kind for e in load_registry(out).entries] == ["moa", "moa"]
    assert registry_main(["list", "--registry", str(out)]) == 0
    assert "d/wbias: moa adapter (LoRA with base_trained.pth (--w_bias))" in capsys.readouterr().out
    # An adapter_params.json that cannot be read is refused before the registry is written.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter.pth").write_bytes((paths["lora0"]).read_bytes())
    (tmp_path / "bad" / "adapter_params.json").write_text('{"lora_rank": "four"}')
    before = out.read_text()
    with pytest.raises(ValueError, match=r"task d/bad: adapter: .*bad/adapter_params.json.*lora_rank"):
        add_task(out, "d", "bad", tmp_path / "bad" / "adapter.pth", root / "data" / "lora0.json")
    assert out.read_text() == before


def test_adapter_method_names_hand_checked():
    assert adapter_method(SOFT) == "Soft MoA (LoRA + prompt + parallel adapter)"
    assert adapter_method(HYDRA) == "HydraLoRA"
    assert adapter_method(MoAConfig(lora_layers="0-2", expert_num=4, type_router="none")) == "MoLoRA"
    assert adapter_method(MoAConfig(lora_layers="0-2", expert_num=4, expert_router="topk",
                                    type_router="none")) == "top-k MoE-LoRA"
    assert adapter_method(MoAConfig(lora_layers="0-2", p_adapter_layers="0-2", type_router="sparse")) == \
        "Sparse MoA (LoRA + parallel adapter)"
    assert adapter_method(MoAConfig(prompt_layers="0-2", type_router="none")) == "prompt"
    assert adapter_method(MoAConfig(p_adapter_layers="0-2", type_router="none")) == "parallel adapter"
    assert adapter_method(MoAConfig(lora_layers="0-2", lora_variant="dora", type_router="none")) == "DoRA"


def test_mixed_top1_batches_equal_each_row_alone_with_its_adapter_and_leave_the_model_clean(setup):
    """Rows of all five tasks in one pass: the LoRA rows in mixed bank batches, each moa adapter's rows in
    batches of their own (soft_a and soft_b share flags: one attach for both); greedy, token for token."""
    root, base, paths, reg = setup
    model, _ = load_model(base)
    model.eval()
    adapters = load_task_adapters(model, load_registry(reg), str(base))
    assert adapters.kinds == ["lora", "lora", "moa", "moa", "moa"] and adapters.bank.tasks == ["lora0", "lora1"]
    before = module_state(model)
    g = torch.Generator().manual_seed(3)
    choice = [2, 0, 4, 3, 1, 2, 4, 3, 0, 2, 1]
    tokens = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in (5, 9, 7, 4, 8, 6, 9, 3, 7, 5, 6)]
    plan = RoutingPlan(TASKS, "top1", torch.zeros(len(choice), 5),
                       torch.nn.functional.one_hot(torch.tensor(choice), 5).float(), choice, adapters)
    prompts = [Prompt(i, t, 6, None) for i, t in enumerate(tokens)]
    parts = plan.partition(prompts)
    # Serving order: the bank's rows, then soft_a and soft_b (equal flags, next to each other), then hydra.
    assert [sorted({choice[p.index] for p in part}) for part in parts] == [[0, 1], [2], [3], [4]]
    got: dict[int, list[int]] = {}
    with plan.serving():
        for part in parts:
            for batch in make_batches(part, 3, model.args.max_seq_len):
                with plan.rows(batch):
                    for p, out in zip(batch, generate(model, [p.tokens for p in batch], 6, stop_tokens=[])):
                        got[p.index] = out
        assert adapters.swap.attaches == 2  # Soft MoA once (soft_b only copied its state in), HydraLoRA once
    assert_same_state(model, before)
    bare = alone(base, None, tokens, 6, stop_tokens=[])
    for t, task in enumerate(TASKS):
        rows = [i for i, c in enumerate(choice) if c == t]
        ref = alone(base, paths[task], [tokens[i] for i in rows], 6, stop_tokens=[])
        assert [got[i] for i in rows] == ref, task
        assert any(got[i] != bare[i] for i in rows), f"{task} does not change the text: the test would be vacuous"
    t = torch.tensor(tokens[1][:4])[None]
    with torch.no_grad():  # outside rows: the bare base (bank passive, base_trained.pth undone)
        assert torch.equal(model(t), load_model(base)[0](t))
    with pytest.raises(ValueError, match="mixes rows served differently"):
        with plan.rows(prompts[:2]):  # a soft_a row and a lora0 row
            pass


def test_fusion_refuses_a_moa_adapter_in_a_fused_set_naming_task_file_and_why(setup):
    """Top-p: a set {lora0, soft_a} is refused; a set that is soft_a alone runs on it (top-1). LoraHub and
    combine (plain-LoRA files) refuse it too, naming the file and the deciding flag."""
    from moa.lora.algebra import read_plain_lora
    from moa.tasks.lorahub import LoraHubConfig, lorahub

    root, base, paths, reg = setup
    model, tok = load_model(base)
    adapters = load_task_adapters(model, load_registry(reg), str(base))
    fused = torch.tensor([[0.6, 0.0, 0.4, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError) as err:
        RoutingPlan(TASKS, "topp", fused, fused, [0, 4, 0], adapters)
    msg = str(err.value)
    for part in ("--fusion topp: row 0 fuses tasks ['lora0', 'soft_a'] (weights [0.6, 0.4])", "task 'soft_a'",
                 str(paths["soft_a"]), "Soft MoA (LoRA + prompt + parallel adapter) adapter",
                 "fusion weighs LoRA deltas dW = s B A", "--type_router soft", "--prompt_layers 1-2",
                 "--p_adapter_layers 0-2", "--fusion top1"):
        assert part in msg, (part, msg)
    alone_sets = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0], [0.3, 0.7, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    plan = RoutingPlan(TASKS, "topp", alone_sets, alone_sets, [4, 1, 2], adapters)
    assert plan.groups == [4, None, 2]
    g = torch.Generator().manual_seed(8)
    tokens = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (6, 4, 7)]
    with plan.serving():
        for part in plan.partition([Prompt(i, t, 5, None) for i, t in enumerate(tokens)]):
            with plan.rows(part):
                outs = generate(model, [p.tokens for p in part], 5, stop_tokens=[])
            for p, out in zip(part, outs):
                if p.index != 1:  # the moa rows: exactly top-1 on their adapter
                    task = TASKS[plan.choice[p.index]]
                    assert out == alone(base, paths[task], [p.tokens], 5, stop_tokens=[])[0]
    with pytest.raises(ValueError, match=rf"{paths['hydra']}: not a plain LoRA.*--expert_num 3"):
        lorahub(load_model(base)[0], tok, [paths["lora0"], paths["hydra"]], rows_of("lora0", 2, 0),
                LoraHubConfig(steps=1))
    with pytest.raises(ValueError, match=rf"{paths['soft_a']}: not a plain LoRA.*--type_router soft"):
        read_plain_lora(paths["soft_a"])  # what lora_tools combine reads


def test_a_moa_entry_trained_on_another_base_names_its_file_and_leaves_the_model_bare(setup, tmp_path):
    root, base, paths, _ = setup
    reg = tmp_path / "tasks.json"
    for t in ("lora0", "soft_a"):
        add_task(reg, "demo", t, paths[t], root / "data" / f"{t}.json")
    wide = tmp_path / "wide"
    write_meta_model_dir(wide, params=dict(TINY_PARAMS, dim=2 * TINY_PARAMS["dim"]), seed=1)
    model, _ = load_model(wide)
    before = module_state(model)
    # (The registry stores the path relative to its folder: the message names it as ...tasks.json's/../soft_a/...)
    with pytest.raises(ValueError, match=r"tasks.json: task demo/soft_a: \S*soft_a/adapter.pth: adapter tensor "
                                         r"layers.0.attention.wq.lora_A has shape \(4, 64\), but the base model "
                                         r".*needs \(4, 128\).*trained on a different base model"):
        load_task_adapters(model, load_registry(reg), str(wide))
    assert_same_state(model, before)
    shallow = tmp_path / "shallow"
    write_meta_model_dir(shallow, params=dict(TINY_PARAMS, n_layers=1), seed=1)
    with pytest.raises(ValueError, match=r"task demo/soft_a: \S*soft_a/adapter_params.json: "
                                         r"--lora_layers.*trained on a different base model"):
        load_task_adapters(load_model(shallow)[0], load_registry(reg), str(shallow))


def exact_selector(base: Path, rows: list[dict], tasks: list[str]) -> Selector:
    """A nearest-key selector whose keys are the rows' own embeddings (the base's mean-pooled final states of
    BOS + instruction, as routing embeds them), so that each row routes to its own task."""
    from moa.tasks.embedding import embed_tokens

    model, tok = load_model(base)
    emb = embed_tokens(model, [tok.encode(r["instruction"], bos=True, eos=False) for r in rows])
    cfg = SelectorConfig(kind="nearest", tasks=tasks, dim=emb.shape[1], standardize=False, n_clusters=1,
                         temperature=1e-3)
    return Selector(cfg, torch.zeros(emb.shape[1]), torch.ones(emb.shape[1]), keys=emb,
                    key_task=torch.tensor([tasks.index(r["task"]) for r in rows]))


def test_task_routed_model_called_again_and_again_equals_each_row_alone_and_stays_clean(setup, tmp_path):
    from moa import TaskRoutedModel

    root, base, paths, reg = setup
    test = [r for t in ("soft_a", "lora0", "hydra", "soft_b", "lora1", "soft_a") for r in rows_of(t, 1, seed=7)]
    test[-1] = rows_of("soft_a", 2, seed=7)[1]
    served = TaskRoutedModel.load(base, reg, save_selector(exact_selector(base, test, TASKS), tmp_path / "sel.pt"))
    before = module_state(served.model)
    tok = served.tokenizer
    context = served.model.args.max_seq_len
    expected = {}
    for t in TASKS:
        rows = [i for i, r in enumerate(test) if r["task"] == t]
        prompts = [encode_prompt(tok, test[i], context - 1)[0] for i in rows]
        expected.update(zip(rows, (tok.decode(o) for o in alone(base, paths[t], prompts, 6, tokenizer=tok))))
    for call, order in enumerate(([0, 1, 2, 3, 4, 5], [5, 3, 0], [2, 4, 1, 3])):
        outs = served.generate([test[i] for i in order], max_gen_len=6, max_batch_size=2)
        assert [o["selected_task"] for o in outs] == [test[i]["task"] for i in order]
        assert [o["generate"] for o in outs] == [expected[i] for i in order], call
        assert all(o["adapter_weights"] == {test[i]["task"]: 1.0} for o, i in zip(outs, order))
        assert_same_state(served.model, before)
    # top-p with a confident selector: every set is one adapter, so the moa rows run top-1.
    outs = served.generate(test, max_gen_len=6, fusion="topp", top_p_adapters=0.5)
    assert [o["generate"] for o in outs] == [expected[i] for i in range(len(test))]
    served.selector.cfg.calibration = 1e4  # nearly uniform probabilities: top-p 1.0 fuses every task in every row
    with pytest.raises(ValueError, match=r"--fusion topp: row 0 fuses tasks \['lora0', 'lora1', 'soft_a', 'soft_b', "
                                         r"'hydra'\] .*\(5 more rows fuse such an adapter\), but task 'soft_a'"):
        served.generate(test, max_gen_len=6, fusion="topp", top_p_adapters=1.0)
    assert_same_state(served.model, before)


def test_example_py_routes_moa_entries_top1_as_each_adapter_alone(setup, tmp_path):
    root, base, paths, _ = setup
    tasks = ["lora0", "soft_a", "hydra"]
    reg = tmp_path / "tasks.json"
    for t in tasks:
        add_task(reg, "demo", t, paths[t], root / "data" / f"{t}.json")
    test = [r for t in ("hydra", "lora0", "soft_a", "soft_a", "lora0") for r in rows_of(t, 1, seed=9)]
    test[3] = rows_of("soft_a", 2, seed=9)[1]
    sel = save_selector(exact_selector(base, test, tasks), tmp_path / "sel.pt")
    test_path = write_rows(tmp_path / "test.json", test)
    common = ["--ckpt_dir", str(base), "--data_path", str(test_path), "--max_gen_len", "6", "--min_gen_len", "6",
              "--temperature", "0", "--max_batch_size", "2", "--progress", "False", "--dtype", "float32"]
    example_main(common + ["--adapter_registry", str(reg), "--selector", str(sel), "--save_path",
                           str(tmp_path / "routed.jsonl")])
    routed = [json.loads(line) for line in (tmp_path / "routed.jsonl").read_text().splitlines()]
    assert [r["selected_task"] for r in routed] == [r["task"] for r in test]
    for t in tasks:
        example_main(common + ["--adapter_path", str(paths[t]), "--save_path", str(tmp_path / f"{t}.jsonl")])
        ref = [json.loads(line)["generate"] for line in (tmp_path / f"{t}.jsonl").read_text().splitlines()]
        assert [r["generate"] for r, row in zip(routed, test) if row["task"] == t] == \
            [g for g, row in zip(ref, test) if row["task"] == t], t


def pool_files(root: Path, paths: dict[str, Path], folder: Path, tasks: list[str]) -> tuple[Path, Path]:
    """The Adapters Selector data-config format's two files for `tasks` (in that order) in `folder`: a data
    config and an adapter pool, their paths relative to `folder` (as Adapters Selector writes them)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data_config.json"
    pool = folder / "adapter_pool.json"
    data.write_text(json.dumps({"demo": {t: os.path.relpath(root / "data" / f"{t}.json", folder) for t in tasks}}))
    pool.write_text(json.dumps({"demo": {t: os.path.relpath(paths[t], folder) for t in tasks}}))
    return data, pool


def test_example_py_with_data_config_and_adapter_pool_writes_the_records_of_the_imported_registry(setup, tmp_path,
                                                                                                   capsys):
    """example.py --data_config D --adapter_pool P against --adapter_registry of the JSON that
    `scripts/registry.py import` writes from the same two files: the same records, line for line; a rerun
    with either file changed is refused naming it."""
    root, base, paths, _ = setup
    tasks = ["hydra", "lora1", "soft_b"]
    data, pool = pool_files(root, paths, tmp_path / "pool_files", tasks)
    imported = tmp_path / "imported.json"
    assert registry_main(["import", "--data_config", str(data), "--adapter_pool", str(pool),
                          "--registry", str(imported)]) == 0
    assert load_registry(imported).tasks == tasks
    test = [r for t in ("soft_b", "hydra", "lora1", "soft_b") for r in rows_of(t, 1, seed=13)]
    test[3] = rows_of("soft_b", 2, seed=13)[1]
    sel = save_selector(exact_selector(base, test, tasks), tmp_path / "sel.pt")
    common = ["--ckpt_dir", str(base), "--data_path", str(write_rows(tmp_path / "test.json", test)), "--max_gen_len",
              "6", "--min_gen_len", "6", "--temperature", "0", "--max_batch_size", "2", "--progress", "False",
              "--dtype", "float32", "--selector", str(sel)]
    pair = ["--data_config", str(data), "--adapter_pool", str(pool)]
    example_main(common + ["--adapter_registry", str(imported), "--save_path", str(tmp_path / "reg.jsonl")])
    example_main(common + pair + ["--save_path", str(tmp_path / "pair.jsonl")])
    records = {n: [json.loads(line) for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
               for n in ("reg", "pair")}
    assert records["pair"] == records["reg"]
    assert [r["selected_task"] for r in records["pair"]] == [r["task"] for r in test]
    assert all(r["adapter_weights"] == {row["task"]: 1.0} for r, row in zip(records["pair"], test))
    settings = json.loads((tmp_path / "pair.jsonl.settings.json").read_text())["settings"]
    assert settings["data_config"] == str(data) and settings["adapter_pool"] == str(pool)
    assert settings["data_config_file"].startswith("size ") and "adapter_registry" not in settings

    capsys.readouterr()
    example_main(common + pair + ["--save_path", str(tmp_path / "pair.jsonl")])
    assert "already holds predictions for all 4 rows: left alone" in capsys.readouterr().out
    for changed, key in ((pool, "adapter_pool_file"), (data, "data_config_file")):
        original = changed.read_text()
        changed.write_text(original + "\n")  # the same tasks, another file
        with pytest.raises(SystemExit, match=rf"pair.jsonl was written with other settings \({key} 'size"):
            example_main(common + pair + ["--save_path", str(tmp_path / "pair.jsonl")])
        changed.write_text(original)


def test_example_py_routing_flags_name_the_two_registry_forms(setup, tmp_path, capsys):
    """Both registry forms at once, one of the two files alone, a selector without a registry, and an
    adapter with the pair: each refused on the command line, naming the flags, before any file is read."""
    args = ["--ckpt_dir", "no_model", "--data_path", "x.json", "--save_path", str(tmp_path / "o.jsonl")]
    pair = ["--data_config", "data.json", "--adapter_pool", "pool.json"]
    cases = [(["--adapter_registry", "tasks.json", "--selector", "s.pt"] + pair,
              "--adapter_registry excludes --data_config / --adapter_pool"),
             (["--data_config", "data.json", "--selector", "s.pt"], "--data_config and --adapter_pool go together"),
             (["--adapter_pool", "pool.json", "--selector", "s.pt"], "--data_config and --adapter_pool go together"),
             (pair, "--data_config / --adapter_pool and --selector go together"),
             (["--selector", "s.pt"], "--selector goes with the registry it was trained on: --adapter_registry, "
                                      "or --data_config with --adapter_pool"),
             (pair + ["--selector", "s.pt", "--adapter_path", "a.pth"],
              "--data_config / --adapter_pool and --adapter_path exclude each other")]
    for flags, message in cases:
        with pytest.raises(SystemExit):
            example_main(args + flags)
        assert message in capsys.readouterr().err, flags


def test_task_routed_model_loads_data_config_and_adapter_pool_as_the_imported_registry(setup, tmp_path):
    """TaskRoutedModel.load with `load_pool_registry(D, P)` against the registry JSON imported from the same
    files: the same routing and text per row; a selector of other tasks is refused naming both files."""
    from moa import TaskRoutedModel
    from moa.tasks.registry import load_pool_registry

    root, base, paths, _ = setup
    tasks = ["soft_a", "lora0"]
    data, pool = pool_files(root, paths, tmp_path / "pool_files", tasks)
    imported = tmp_path / "imported.json"
    assert registry_main(["import", "--data_config", str(data), "--adapter_pool", str(pool),
                          "--registry", str(imported)]) == 0
    test = [r for t in ("lora0", "soft_a", "soft_a") for r in rows_of(t, 1, seed=21)]
    test[2] = rows_of("soft_a", 2, seed=21)[1]
    sel = save_selector(exact_selector(base, test, tasks), tmp_path / "sel.pt")
    served = TaskRoutedModel.load(base, load_pool_registry(data, pool), sel)
    ref = TaskRoutedModel.load(base, imported, sel)
    assert served.tasks == ref.tasks == tasks and served.adapters.kinds == ["moa", "lora"]
    outs = served.generate(test, max_gen_len=6, max_batch_size=2)
    assert outs == ref.generate(test, max_gen_len=6, max_batch_size=2)
    assert [o["selected_task"] for o in outs] == [r["task"] for r in test]
    other = exact_selector(base, test, tasks)
    other.cfg.tasks = ["soft_a", "lora1"]
    other = save_selector(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=re.escape(f"does not fit --data_config {data} with --adapter_pool {pool}, "
                                                   "which lists ['soft_a', 'lora0']")):
        TaskRoutedModel.load(base, load_pool_registry(data, pool), other)
