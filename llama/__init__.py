"""A hand-written LLaMA-3/3.1: model, tokenizers, checkpoint loading and KV-cache generation.

Knows nothing about adapters (see `moa/`).
"""
from llama.model import ModelArgs, Transformer

__all__ = ["ModelArgs", "Transformer"]
