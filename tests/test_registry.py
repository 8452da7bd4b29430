"""moa/tasks/registry.py and scripts/registry.py: the registry file after add/delete/balance (hand-written
expected JSON), the directory-tree form, and clear errors (missing adapter or data, duplicate task)."""
from __future__ import annotations

import json

import pytest

from moa.tasks.registry import add_task, balance_tasks, delete_task, load_registry
from scripts.registry import main as adapters_main
from tests.helpers import write_meta_model_dir
from tests.task_helpers import make_task_adapter, task_rows, write_rows

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    write_meta_model_dir(root / "base", seed=1)
    adapters = {t: make_task_adapter(root / "base", root / "ad" / t / "adapter.pth", seed=i)
                for i, t in enumerate(("add", "yesno", "pick"))}
    data = {t: write_rows(root / "data" / f"{t}.json", task_rows(t, n)) for t, n in
            (("add", 12), ("yesno", 7), ("pick", 9))}
    return root, adapters, data


def test_add_delete_balance_edit_the_file(files, tmp_path, capsys):
    root, adapters, data = files
    reg = tmp_path / "tasks.json"
    assert adapters_main(["add", "--registry", str(reg), "--domain", "math", "--task", "add",
                          "--adapter", str(adapters["add"]), "--data", str(data["add"])]) == 0
    add_task(reg, "qa", "yesno", adapters["yesno"], data["yesno"])
    add_task(reg, "qa", "pick", adapters["pick"].parent, data["pick"])  # a folder is accepted too
    rel = lambda p: str(p.relative_to(root).as_posix())  # noqa: E731
    up = "../" * len(tmp_path.relative_to(root).parts) if tmp_path.is_relative_to(root) else None
    saved = json.loads(reg.read_text())
    assert list(saved) == ["math", "qa"] and list(saved["qa"]) == ["yesno", "pick"]
    loaded = load_registry(reg)
    assert loaded.tasks == ["add", "yesno", "pick"]
    assert loaded.entry("yesno").adapter.resolve() == adapters["yesno"].resolve()
    assert loaded.entry("pick").data.resolve() == data["pick"].resolve()
    if up is not None:
        assert saved["math"]["add"] == {"adapter": up + rel(adapters["add"]), "data": up + rel(data["add"])}

    balance_tasks(reg)  # the smallest task has 7 rows
    assert [e.n_train for e in load_registry(reg).entries] == [7, 7, 7]
    assert json.loads(reg.read_text())["qa"]["pick"]["n_train"] == 7
    assert adapters_main(["balance", "--registry", str(reg), "--n_train", "5"]) == 0
    assert {t: s["n_train"] for d in json.loads(reg.read_text()).values() for t, s in d.items()} == \
        {"add": 5, "yesno": 5, "pick": 5}
    with pytest.raises(ValueError, match=r"--n_train 8: task\(s\) \{'yesno': 7\}"):
        balance_tasks(reg, 8)

    delete_task(reg, "yesno")
    assert json.loads(reg.read_text()) == {
        "math": {"add": {**saved["math"]["add"], "n_train": 5}},
        "qa": {"pick": {**saved["qa"]["pick"], "n_train": 5}}}
    assert adapters_main(["delete", "--registry", str(reg), "--task", "yesno"]) == 2
    assert "no task 'yesno'" in capsys.readouterr().err
    assert adapters_main(["list", "--registry", str(reg)]) == 0
    assert "math/add" in capsys.readouterr().out


def test_duplicate_task_name_is_a_clear_error(files, tmp_path):
    _, adapters, data = files
    reg = tmp_path / "tasks.json"
    add_task(reg, "math", "add", adapters["add"], data["add"])
    before = reg.read_text()
    with pytest.raises(ValueError, match=r"duplicate task name 'add' \(already in domain 'math'\)"):
        add_task(reg, "other", "add", adapters["yesno"], data["yesno"])
    assert reg.read_text() == before  # the file is left as it was
    spec = {"adapter": str(adapters["add"]), "data": str(data["add"])}
    two_domains = tmp_path / "two.json"
    two_domains.write_text(json.dumps({"a": {"x": spec}, "b": {"x": spec}}))
    with pytest.raises(ValueError, match=r"duplicate task name 'x' \(in domain 'a' and 'b'\)"):
        load_registry(two_domains)
    same_domain = tmp_path / "same.json"
    same_domain.write_text('{"a": {"x": %s, "x": %s}}' % (json.dumps(spec), json.dumps(spec)))
    with pytest.raises(ValueError, match=r"same.json: duplicate key 'x'"):
        load_registry(same_domain)


def test_missing_adapter_or_data_is_a_clear_error(files, tmp_path):
    _, adapters, data = files
    reg = tmp_path / "tasks.json"
    with pytest.raises(FileNotFoundError, match=r"task math/add: adapter: adapter file .*nope.pth does not exist"):
        add_task(reg, "math", "add", tmp_path / "nope.pth", data["add"])
    assert not reg.exists()
    reg.write_text(json.dumps({"math": {"add": {"adapter": str(adapters["add"]), "data": "missing.json"}}}))
    with pytest.raises(FileNotFoundError, match=r"task math/add: data file .*missing.json does not exist"):
        load_registry(reg)
    reg.write_text(json.dumps({"math": {"add": {"adapter": str(adapters["add"])}}}))
    with pytest.raises(ValueError, match=r"task math/add: expected an object with \"adapter\" and \"data\""):
        load_registry(reg)
    with pytest.raises(FileNotFoundError, match="--adapter_registry .*absent.json: no such file"):
        load_registry(tmp_path / "absent.json")


def test_directory_tree_registry(files, tmp_path):
    _, adapters, data = files
    for domain, task in (("math", "add"), ("qa", "pick")):
        folder = tmp_path / "tree" / domain / task
        folder.mkdir(parents=True)
        for f in adapters[task].parent.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        (folder / "train.json").write_bytes(data[task].read_bytes())
    reg = load_registry(tmp_path / "tree")
    assert [(e.domain, e.task) for e in reg.entries] == [("math", "add"), ("qa", "pick")]
    (tmp_path / "tree" / "qa" / "pick" / "adapter.pth").unlink()
    with pytest.raises(FileNotFoundError, match="task qa/pick: adapter"):
        load_registry(tmp_path / "tree")
    with pytest.raises(ValueError, match="directory tree registry"):
        add_task(tmp_path / "tree", "x", "y", adapters["add"], data["add"])
