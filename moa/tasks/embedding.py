"""Sentence embeddings from the frozen base model, for the task selector, and a cache of them.

What is embedded (`EmbedConfig`, stored in the selector file so that routing embeds as training did):
- the text: a row's own fields, `instruction` and/or `input` (`use_instruction`, `use_input`; default
  both, as before), joined by a blank line, with BOS, cut to its first `max_tokens` tokens: not the
  Alpaca template around it, which is the same for every row and would dominate the mean (and fill a
  short `max_tokens` by itself). `use_output` adds the row's `output` to the selector's *training*
  rows only, as Adapters Selector's `--use_output` does (its routing prompt never holds the output):
  a row to route has none (a test row's output is its reference answer, never read).
- the states (`encoder`), mean-pooled over the real tokens (pads never count):
  `hidden`: the final normed hidden states (the whole forward without the vocabulary projection);
  `hidden:LAYER`: the residual stream after block LAYER (0-based, before any final norm; the blocks
  after it are not run); `input_embedding`: the token embeddings (no transformer forward at all).

`EmbeddingCache` keeps the pooled vectors of rows already embedded, so that a selector update embeds
only the rows it has not seen (scripts/train_selector.py --update).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from llama.model import Transformer
from moa.atomic import atomic_write_files
from moa.checks import check_int, load_tensors
from moa.files.settings import file_identity
from moa.method.routers import masked_mean
from moa.train.data import pad_right

ENCODERS = ("hidden", "hidden:LAYER", "input_embedding")
ROW_FIELDS = ("instruction", "input", "output")


def parse_encoder(encoder: str) -> tuple[str, Optional[int]]:
    """"hidden" -> ("hidden", None); "hidden:L" -> ("hidden", L); "input_embedding" -> ("input_embedding", None).
    Anything else is a `ValueError` naming --encoder."""
    if encoder in ("hidden", "input_embedding"):
        return encoder, None
    head, _, layer = encoder.partition(":")
    if head == "hidden" and layer.isdigit():
        return "hidden", int(layer)
    raise ValueError(f"--encoder: expected hidden, hidden:LAYER (a block index >= 0) or input_embedding, "
                     f"got {encoder!r}")


@dataclass(frozen=True)
class EmbedConfig:
    """How a row becomes a vector (see the module docstring)."""

    encoder: str = "hidden"
    max_tokens: int = 256
    use_instruction: bool = True
    use_input: bool = True
    use_output: bool = False  # the selector's training rows only

    def __post_init__(self) -> None:
        parse_encoder(self.encoder)
        check_int("max_tokens", self.max_tokens, 1)
        for flag in ("use_instruction", "use_input", "use_output"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"--{flag}: expected True or False, got {getattr(self, flag)!r}")
        if not (self.use_instruction or self.use_input):
            raise ValueError("--use_instruction False --use_input False: routing embeds a row's instruction "
                             "and/or input, so one of them must be True (a row to route has no output: "
                             "--use_output adds it to the selector's training rows only)")

    def fields(self, training: bool) -> tuple[str, ...]:
        """The row fields embedded: for a training row (`training`) or a row to route."""
        use = (self.use_instruction, self.use_input, self.use_output and training)
        return tuple(f for f, on in zip(ROW_FIELDS, use) if on)


def row_text(row: dict, cfg: EmbedConfig = EmbedConfig(), training: bool = False) -> str:
    """The text embedded for `row`: its non-empty `cfg.fields(training)`, joined by a blank line. A row
    with none of them is a `ValueError` naming the fields."""
    parts = []
    for f in cfg.fields(training):
        value = row.get(f)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"field {f!r} must be a string, got {type(value).__name__}")
        if value:
            parts.append(value)
    if not parts:
        raise ValueError(f"no text in the embedded field(s) {list(cfg.fields(training))} (see --use_instruction, "
                         "--use_input)")
    return "\n\n".join(parts)


def row_tokens(tokenizer: Any, row: dict, cfg: EmbedConfig = EmbedConfig(), training: bool = False) -> list[int]:
    """BOS + `row_text(row, cfg, training)`, its first `cfg.max_tokens` tokens."""
    return tokenizer.encode(row_text(row, cfg, training), bos=True, eos=False)[: cfg.max_tokens]


def _states(model: Transformer, tokens: torch.Tensor, token_mask: Optional[torch.Tensor], encoder: str) -> torch.Tensor:
    """tokens (b, T) -> the states `encoder` pools, (b, T, dim)."""
    kind, layer = parse_encoder(encoder)
    if kind == "input_embedding":
        return model.tok_embeddings(tokens)
    if layer is None:
        return model.hidden_states(tokens, token_mask=token_mask)
    if layer >= model.args.n_layers:
        n = model.args.n_layers
        raise ValueError(f"--encoder {encoder}: the base has {n} blocks (0-{n - 1})")
    meta = model._meta(tokens, 0, token_mask)  # positions and attention mask, as hidden_states builds them
    h = model.tok_embeddings(tokens)
    for block in model.layers[: layer + 1]:  # the blocks after LAYER are never run
        h = block(h, meta)
    return h


@torch.inference_mode()
def embed_tokens(model: Transformer, tokens: Sequence[list[int]], batch_size: int = 16,
                 encoder: str = "hidden") -> torch.Tensor:
    """Mean-pooled states (`encoder`) of each token list -> (N, dim) fp32 on the CPU.

    Rows are run longest first in right-padded batches with a token mask (a padded row computes
    exactly what it computes alone). The model must carry no adapters (the selector reads the frozen
    base) and no KV cache (it is dropped; `generate` makes a new one).
    """
    if getattr(model, "moa_config", None) is not None:
        raise ValueError("embed_tokens: the model has adapters attached; the selector embeds with the bare base")
    check_int("embed_batch_size", batch_size, 1)
    parse_encoder(encoder)
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
        h = _states(model, batch.to(device), None if bool(mask.all()) else mask, encoder)  # (b, T, dim)
        out[idx] = masked_mean(h.float(), mask).cpu()  # (b, dim)
    return out


def embed_rows(model: Transformer, tokenizer: Any, rows: Sequence[dict], cfg: EmbedConfig = EmbedConfig(),
               batch_size: int = 16, training: bool = False, cache: Optional[EmbeddingCache] = None) -> torch.Tensor:
    """Embeddings (N, dim) fp32 of `rows` (`row_tokens`, then `embed_tokens`, or `cache.embed`): as
    training rows of the selector (`training`) or as rows to route."""
    tokens = []
    for i, row in enumerate(rows):
        try:
            tokens.append(row_tokens(tokenizer, row, cfg, training))
        except ValueError as e:
            raise ValueError(f"row {i}: {e}") from None
    if cache is not None:
        return cache.embed(model, tokens, cfg.encoder, batch_size)
    return embed_tokens(model, tokens, batch_size, cfg.encoder)


# ---- the cache -----------------------------------------------------------------------------------------

CACHE_FORMAT = "moa-embedding-cache-v1"
SMALL_FILE = 1 << 20  # base-model files up to 1 MiB (params.json, config.json, tokenizers) are hashed


def base_identity(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """A base-model folder as the cache keys it: its path, and each file in it by size and SHA-256 (files
    up to 1 MiB) or size and mtime (the weights, too large to hash on every run)."""
    folder = Path(ckpt_dir).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"--ckpt_dir {folder}: no such directory")
    files = {p.name: file_identity(p, hash_limit=SMALL_FILE) for p in sorted(folder.iterdir()) if p.is_file()}
    return {"ckpt_dir": str(folder), "files": files}


def token_key(tokens: Sequence[int]) -> str:
    """The cache key of one token list (the row's text, fields and max_tokens, through the tokenizer)."""
    return hashlib.sha256(",".join(map(str, tokens)).encode()).hexdigest()


class EmbeddingCache:
    """Pooled embeddings already computed, in `folder`: one file per embedding space (the base model's
    files, the encoder, the weights' dtype and device type), `SPACE.pt` = {"format", "space", "keys":
    [token_key ...], "emb": (N, dim) fp32}. A row is found by its token ids, so a change of text,
    fields, max_tokens or tokenizer is a new row. Files are written whole (temporary name, renamed);
    two runs writing one file at once may keep only one's new rows (the other's are embedded again
    next time). Deleting the folder only costs the time to embed again.

    `computed` / `reused`: rows embedded / found by this object's `embed` calls so far."""

    def __init__(self, folder: str | os.PathLike, base: dict[str, Any]):
        self.folder, self.base = Path(folder), base
        self.computed = self.reused = 0

    def space(self, model: Transformer, encoder: str) -> dict[str, Any]:
        """What decides every embedding of one cache file (all but the row's tokens)."""
        w = model.tok_embeddings.weight
        return {"format": CACHE_FORMAT, "base": self.base, "encoder": encoder,
                "dtype": str(w.dtype).removeprefix("torch."), "device": w.device.type}

    def path(self, space: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(space, sort_keys=True).encode()).hexdigest()
        return self.folder / f"{digest[:20]}.pt"

    def _read(self, path: Path, space: dict[str, Any]) -> dict[str, torch.Tensor]:
        if not path.is_file():
            return {}
        try:
            blob = load_tensors(path, "embedding cache")
        except ValueError as e:
            raise ValueError(f"embedding cache {path}: cannot read it ({e}); delete it (it only saves time)") from None
        if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT or blob.get("space") != space:
            raise ValueError(f"embedding cache {path}: not this cache's file for {space['encoder']} of "
                             f"{space['base']['ckpt_dir']}; delete it (it only saves time)")
        return dict(zip(blob["keys"], blob["emb"]))

    def embed(self, model: Transformer, tokens: Sequence[list[int]], encoder: str = "hidden",
              batch_size: int = 16) -> torch.Tensor:
        """`embed_tokens` of `tokens` (N, dim), computing only the rows not in the cache (each distinct
        token list once) and adding them to its file."""
        space = self.space(model, encoder)
        path = self.path(space)
        stored = self._read(path, space)
        keys = [token_key(t) for t in tokens]
        first: dict[str, int] = {}  # each new key -> its first row
        for i, k in enumerate(keys):
            if k not in stored:
                first.setdefault(k, i)
        self.computed += len(first)
        self.reused += sum(k in stored for k in keys)
        if first:
            new = embed_tokens(model, [tokens[i] for i in first.values()], batch_size, encoder)
            self._write(path, space, dict(zip(first, new)))
            stored.update(zip(first, new))
        if not keys:
            return torch.zeros(0, model.args.dim)
        return torch.stack([stored[k] for k in keys])

    def _write(self, path: Path, space: dict[str, Any], new: dict[str, torch.Tensor]) -> None:
        merged = {**self._read(path, space), **new}  # what another run may have added meanwhile, kept
        blob = {"format": CACHE_FORMAT, "space": space, "keys": list(merged), "emb": torch.stack(list(merged.values()))}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_files({str(path): lambda tmp: torch.save(blob, tmp)})
