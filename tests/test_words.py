"""The project's text speaks to its users: no in-house shorthand for the code it started from, and no
references to the tracker's internal issue numbers.

Every text file of the checkout (tracked or not yet added, .gitignore'd ones left out; data/ and
tests/fixtures/ skipped, binary files skipped) is searched, case-insensitively, for
- the shorthand for the upstream research code: "the <s>eeds" (unless a seed list follows, as in
  "the <s>eeds 0, 125, 1225" or "the <s>eeds (0, ...)"), "the <s>eeds'", "<s>eeds' two", "the <s>eed's",
  "<s>eed command". Name the system instead: MoA's official code (GitHub DCDmllm/MoA), the Adapters
  Selector data-config format (a data config and an adapter pool), DLP-LoRA, MoLE, Multi-LoRAs, LoraHub;
  the paper's Soft MoA command;
- internal issue references: "<i>ssue 18", "<i>ssue #18", "(#" with a number and ")".
The patterns are assembled from pieces so that this file does not match itself.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = ("data/", "tests/fixtures/")

_SEED = "se" + "ed"
_ISSUE = "iss" + "ue"
PATTERNS = [re.compile(p, re.IGNORECASE) for p in (
    rf"\bthe\s+{_SEED}s\b(?!'|\s+\(?\d)",  # "the <s>eeds" not followed by a list of seeds
    rf"\bthe\s+{_SEED}s'",
    rf"\b{_SEED}s'\s+two\b",
    rf"\bthe\s+{_SEED}'s\b",
    rf"\b{_SEED}\s+command\b",
    rf"\b{_ISSUE}s?\s+#?\d+",
    r"\(" + "#" + r"\d+\)",
)]


def project_files() -> list[str]:
    """Paths (relative to the checkout) of the tracked files and the untracked ones git does not ignore."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no file list")
    return sorted({p for p in out.decode().split("\0") if p and not p.startswith(SKIPPED)})


def text_of(path: Path) -> str | None:
    """The file's text, or None for a file that is gone or binary (a NUL byte, or not UTF-8)."""
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    if b"\0" in raw[:8192]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def hits(rel: str, text: str) -> list[str]:
    """'FILE:LINE: text of the line' for each line where a pattern starts."""
    lines = text.splitlines()
    found: dict[int, None] = {}
    for pattern in PATTERNS:
        for m in pattern.finditer(text):
            found[text.count("\n", 0, m.start()) + 1] = None
    return [f"{rel}:{n}: {lines[n - 1].strip()}" for n in sorted(found)]


def test_patterns_catch_the_shorthand_and_spare_seed_lists():
    bad = [f"the {_SEED}s' two files", f"The {_SEED}s' form", f"the {_SEED} command", f"{_SEED} command)",
           f"the {_SEED}'s experts", f"over the {_SEED}s that finished", f"{_ISSUE} 18, item 5",
           f"{_ISSUE.title()} #6's command", f"LoRA variants (#{20})", f"as the\n{_SEED}s write them"]
    fine = [f"the paper's {_SEED}s (0, 125, 1225)", f"the {_SEED}s 0, 125 and 1225", f"the {_SEED}-125 runs",
            f"--{_SEED} 0", "the training seeds", f"github.com/openai/tiktoken/{_ISSUE}s/195", "adapter #0"]
    assert [s for s in bad if not hits("x", s)] == []
    assert [s for s in fine if hits("x", s)] == []


def test_no_insider_words_in_the_project_text():
    found = []
    for rel in project_files():
        text = text_of(ROOT / rel)
        if text is not None:
            found += hits(rel, text)
    assert not found, ("in-house words (name the upstream system, e.g. MoA's official code, the Adapters Selector "
                       "data-config format, the paper's Soft MoA command; drop internal issue numbers):\n"
                       + "\n".join(found))
