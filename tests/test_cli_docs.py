"""docs/cli.md is what scripts/gen_cli_docs.py writes from the command lines' parsers and MoAConfig's
field metadata: a flag added, removed or reworded without regenerating the page fails here."""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from moa.method.config import MoAConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("_gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def text(gen) -> str:
    return gen.render()


def test_docs_cli_md_is_up_to_date(text):
    doc = ROOT / "docs" / "cli.md"
    assert doc.is_file() and doc.read_text(encoding="utf-8") == text, \
        "docs/cli.md is stale: run `python scripts/gen_cli_docs.py`"


def test_every_command_line_and_every_adapter_flag_is_listed_once(gen, text):
    for path in gen.cli_files():
        assert f"\n## python {path.relative_to(ROOT).as_posix()}\n" in text
    for name in ("main_finetune.py", "example.py", "evaluate_loss.py", "scripts/train_selector.py"):
        assert f"\n## python {name}\n" in text
    assert "\n### python scripts/lora_tools.py merge\n" in text and "\n### python scripts/registry.py import\n" in text
    finetune = text.split("\n## python main_finetune.py\n")[1].split("\n## ")[0]
    adapter = text.split("\n## Adapter flags\n")[1]
    for f in dataclasses.fields(MoAConfig):  # in their own section, not in main_finetune.py's table
        assert adapter.count(f"| `--{f.name}` |") == 1 and f"| `--{f.name}` |" not in finetune, f.name
    assert "Plus the [adapter flags](#adapter-flags)." in text
    assert str(ROOT) not in text and "`<repo>/data`" in text  # no machine-dependent default
    assert '`"cuda" if torch.cuda.is_available() else "cpu"`' in text


def test_check_exits_1_naming_the_stale_file(gen, text, tmp_path, monkeypatch, capsys):
    doc = tmp_path / "cli.md"
    monkeypatch.setattr(gen, "DOC", doc)
    monkeypatch.setattr(gen, "render", lambda: text)
    assert gen.main(["--check"]) == 1  # missing
    doc.write_text(text.replace("| flag |", "| option |", 1), encoding="utf-8")
    assert gen.main(["--check"]) == 1
    assert f"{doc} is stale: run `python scripts/gen_cli_docs.py`" in capsys.readouterr().err
    assert gen.main([]) == 0 and doc.read_text(encoding="utf-8") == text
    assert gen.main(["--check"]) == 0
