"""A hand-written LLaMA-3/3.1: model, tokenizers, checkpoint loading and KV-cache generation.

Knows nothing about adapters (see `moa/`).
"""
from __future__ import annotations

from typing import Any

__all__ = ["ModelArgs", "Transformer"]


def __getattr__(name: str) -> Any:
    """`from llama import Transformer` imports torch on first use only, so that the pure-Python
    modules of llama/ (llama/tempnames.py) load without it."""
    if name in __all__:
        from llama import model

        return getattr(model, name)
    raise AttributeError(f"module 'llama' has no attribute {name!r}")
