"""Sentence embeddings from the frozen base model, for the task selector: the mean of the final
normed hidden states over a row's real prompt tokens (pads never count).

What is embedded is the row's own text, BOS + instruction (+ "\n\n" + input), cut to its first
`max_tokens` tokens: not the Alpaca template around it, which is the same for every row and would
dominate the mean (and fill a short `max_tokens` by itself). Training and inference embed alike.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from llama.model import Transformer
from moa.checks import check_int
from moa.train.data import pad_right
from moa.method.routers import masked_mean


def row_tokens(tokenizer: Any, row: dict, max_tokens: int) -> list[int]:
    """BOS + the row's instruction (+ blank line + input), its first `max_tokens` tokens."""
    text = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return tokenizer.encode(text, bos=True, eos=False)[:max_tokens]


@torch.inference_mode()
def embed_tokens(model: Transformer, tokens: Sequence[list[int]], batch_size: int = 16) -> torch.Tensor:
    """Mean-pooled final hidden states of each token list -> (N, dim) fp32 on the CPU.

    Rows are run longest first in right-padded batches with a token mask (a padded row computes
    exactly what it computes alone). The model must carry no adapters (the selector reads the frozen
    base) and no KV cache (it is dropped; `generate` makes a new one).
    """
    if getattr(model, "moa_config", None) is not None:
        raise ValueError("embed_tokens: the model has adapters attached; the selector embeds with the bare base")
    check_int("embed_batch_size", batch_size, 1)
    if model.cache_shape is not None:
        model.clear_caches()
    device = model.tok_embeddings.weight.device
    order = sorted(range(len(tokens)), key=lambda i: -len(tokens[i]))
    out = torch.zeros(len(tokens), model.args.dim)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        empty = [i for i in idx if not tokens[i]]
        if empty:
            raise ValueError(f"embed_tokens: row {empty[0]} has no tokens")
        batch, mask = pad_right([tokens[i] for i in idx])
        mask = mask.to(device)
        h = model.hidden_states(batch.to(device), token_mask=None if bool(mask.all()) else mask)  # (b, T, dim)
        out[idx] = masked_mean(h.float(), mask).cpu()  # (b, dim)
    return out


def embed_rows(model: Transformer, tokenizer: Any, rows: Sequence[dict], max_tokens: int = 256,
               batch_size: int = 16) -> torch.Tensor:
    """Embeddings (N, dim) fp32 of `rows` (see `row_tokens`, `embed_tokens`)."""
    return embed_tokens(model, [row_tokens(tokenizer, r, max_tokens) for r in rows], batch_size)
