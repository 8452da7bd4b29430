"""The independent references the benchmarks measure against, loaded from tests/ by file path.

`python benchmarks/bench_X.py` puts benchmarks/ on sys.path, not the repository root, and tests/ is no
package: so `tests/hf_reference.py` is loaded from its file, once, on first use (it imports
transformers, which only the benchmarks that compare against it need).
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

TESTS = Path(__file__).resolve().parents[1] / "tests"


@functools.lru_cache(maxsize=None)
def hf_reference() -> ModuleType:
    """tests/hf_reference.py as a module: transformers' LlamaForCausalLM twins of our models."""
    spec = importlib.util.spec_from_file_location("hf_reference", TESTS / "hf_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hf_twin(model, attn_implementation: str = "sdpa"):
    """transformers' LlamaForCausalLM holding `model`'s weights (tests/hf_reference.py's `hf_twin`)."""
    return hf_reference().hf_twin(model, attn_implementation=attn_implementation)
