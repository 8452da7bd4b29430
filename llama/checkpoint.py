"""Base-model directories: `params.json` + `consolidated.NN.pth` (+ tokenizer files) <-> `Transformer`.

Loading builds the model on the `meta` device and then assigns each checkpoint tensor, converted
to the target dtype/device one at a time, so the model is never materialised twice (no fp32 copy
of a bf16 checkpoint, no random init that is thrown away). Meta's model-parallel shards are
merged on the way in.

Context length: `params.json` holds only Meta's keys (so `ModelArgs.from_params(**params)` works on it), and
none of them states the context the model was trained for, so it follows from the model family:
131072 for LLaMA-3.1 (`use_scaled_rope`), 8192 for any other model with a tiktoken tokenizer
(LLaMA-3, and SmolLM2 imported by `scripts/import_gguf.py`), 4096 for a sentencepiece tokenizer
(LLaMA-2).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from llama import hf
from llama.files import check_state_dict, check_stored_dtype, read_json_object
from llama.model import ModelArgs, Transformer
from llama.tokenizer import SentencePiece, load_hf_tokenizer, load_tokenizer
from llama.torchfile import load_torch_file, new_temp_dir

# How Meta's model parallelism splits each weight (fairscale layers in Meta's reference model):
# ColumnParallelLinear splits output rows (dim 0), RowParallelLinear and ParallelEmbedding split
# the input / embedding columns (dim 1), RMSNorm weights are replicated on every rank.
_COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")
_ROW_PARALLEL = ("wo", "w2", "tok_embeddings")
_REPLICATED = ("attention_norm", "ffn_norm", "norm")
# Precomputed RoPE table stored by LLaMA-1/2 checkpoints; the model recomputes it.
_IGNORED_KEYS = ("rope.freqs",)

_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")

CONTEXT_LLAMA31 = 131072
CONTEXT_TIKTOKEN = 8192
CONTEXT_SENTENCEPIECE = 4096


def load_params(model_dir: str | os.PathLike) -> dict:
    """The raw dict of `model_dir/params.json`.

    Raises FileNotFoundError (naming the path) when it is missing, ValueError when it is not a
    JSON object. A Hugging Face folder (`hf.is_hf_dir`): the same keys derived from its config.json.
    """
    if hf.is_hf_dir(model_dir):
        return hf.load_hf_params(model_dir)
    return read_json_object(Path(model_dir) / "params.json", "params.json", "a base-model directory holds params.json, "
                            "consolidated.NN.pth and tokenizer.model")


def read_model_args(model_dir: str | os.PathLike) -> ModelArgs:
    """The `ModelArgs` of a base-model directory from its params.json (a Hugging Face folder: its
    config.json) alone, reading no weight and no tokenizer: the sizes that checks made before a model
    loads need (dim, heads, layers, FFN width). A bad value is a ValueError naming the file. LLaMA-2's
    `vocab_size: -1` (the tokenizer's size) is given as 1 here: read `load_model`'s model for the vocabulary."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory not found")
    params = dict(load_params(model_dir))
    if params.get("vocab_size") == -1:
        params["vocab_size"] = 1
    try:
        return ModelArgs.from_params(**params)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{model_dir / (hf.CONFIG if hf.is_hf_dir(model_dir) else 'params.json')}: {e}") from None


def context_length(params: Mapping, tiktoken_tokenizer: bool) -> int:
    """Trained context length (tokens) of a model described by Meta's `params` (see module docstring)."""
    if params.get("use_scaled_rope", False):
        return CONTEXT_LLAMA31
    return CONTEXT_TIKTOKEN if tiktoken_tokenizer else CONTEXT_SENTENCEPIECE


def shard_paths(model_dir: str | os.PathLike) -> list[Path]:
    """`consolidated.00.pth`, `.01.pth`, ... of `model_dir` in order; FileNotFoundError on none or a gap."""
    model_dir = Path(model_dir)
    found = {}
    for p in model_dir.iterdir():
        m = _SHARD_RE.match(p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise FileNotFoundError(f"{model_dir}: no consolidated.NN.pth checkpoint shard")
    for i in range(max(found) + 1):
        if i not in found:
            width = len(next(iter(found.values())).name.split(".")[1])
            raise FileNotFoundError(f"{model_dir}: shard consolidated.{i:0{width}d}.pth is missing "
                                    f"(found shards {sorted(found)})")
    return [found[i] for i in range(len(found))]


def _merge_dim(key: str) -> Optional[int]:
    """The dim along which Meta's model parallelism split `key`, or None if replicated."""
    parts = key.split(".")
    name = parts[-2] if parts[-1] == "weight" and len(parts) >= 2 else parts[-1]
    if name in _COLUMN_PARALLEL:
        return 0
    if name in _ROW_PARALLEL:
        return 1
    if name in _REPLICATED:
        return None
    raise ValueError(f"don't know how Meta's model parallelism splits {key!r}: cannot merge shards")


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """One `consolidated.NN.pth`, memory-mapped: a ValueError naming the shard when it is damaged (e.g.
    truncated), not a torch file, a pickle of other objects, or not a dict of tensors keyed by name."""
    sd = load_torch_file(path, "checkpoint shard", mmap=True)
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"{path}: not a checkpoint shard (expected a dict of tensors keyed by Meta's "
                         f"parameter names, got {type(sd).__name__})")
    return sd


def load_state_dict(model_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Meta's state dict of `model_dir`, model-parallel shards merged, each tensor in `dtype` on `device`.

    The shards are memory-mapped; tensors are converted one at a time, so the peak extra memory is
    one tensor (plus the result). With a single shard already in `dtype` on the CPU the returned
    tensors stay backed by the (copy-on-write) mapping of the file. A Hugging Face folder: its
    safetensors tensors under Meta's names and rotary layout (`hf.load_hf_state_dict`).
    """
    if hf.is_hf_dir(model_dir):
        return hf.load_hf_state_dict(model_dir, dtype=dtype, device=device)
    model_dir = Path(model_dir)
    paths = shard_paths(model_dir)
    shards = [load_shard(p) for p in paths]
    keys = list(shards[0])
    for p, sd in zip(paths[1:], shards[1:]):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))
            raise ValueError(f"{p}: its keys differ from {paths[0].name}'s: {diff[:10]}")
    out = {}
    for key in keys:
        if key in _IGNORED_KEYS:
            continue
        parts = [sd.pop(key) for sd in shards]
        for path, part in zip(paths, parts):
            check_stored_dtype(part, key, str(path))
        if len(parts) == 1:
            t = parts[0]
        else:
            dim = _merge_dim(key)
            if dim is None:
                for p, other in zip(paths[1:], parts[1:]):
                    if not torch.equal(parts[0], other):
                        raise ValueError(f"{model_dir}: replicated tensor {key!r} differs between "
                                         f"{paths[0].name} and {p.name}")
                t = parts[0]
            else:
                t = torch.cat(parts, dim=dim)
        out[key] = t.to(device=device, dtype=dtype)
        del parts, t
    return out


def load_model(model_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", max_seq_len: Optional[int] = None,
               attn_impl: str = "sdpa"):
    """Build the `Transformer` of a base-model directory and its tokenizer.

    model_dir: `params.json`, `consolidated.NN.pth` (one or more of Meta's model-parallel shards,
        merged here), `tokenizer.model` (+ `tokenizer_config.json` for non-Meta models).
    dtype, device: where every weight ends up (converted tensor by tensor, never via fp32 copies).
    max_seq_len: the longest sequence (prompt + generation, in tokens) the model accepts; default
        and upper bound: the model's context length (see `context_length`).
    attn_impl: passed to `ModelArgs`.

    Returns `(model, tokenizer)`, the model in eval mode. `vocab_size: -1` in params.json
    (LLaMA-2) is taken from the tokenizer, and a sentencepiece model without `rope_theta` gets
    LLaMA-2's 10000. Errors name the file: missing params.json / shard -> FileNotFoundError;
    unknown or missing params key, missing or unexpected weights, wrong shapes -> ValueError.
    A Hugging Face folder (config.json, safetensors, tokenizer.json): see `_load_hf_model`.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory not found")
    if hf.is_hf_dir(model_dir):
        return _load_hf_model(model_dir, dtype=dtype, device=device, max_seq_len=max_seq_len, attn_impl=attn_impl)
    params = load_params(model_dir)
    params_path = model_dir / "params.json"
    tok_path = model_dir / "tokenizer.model"
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path}: no tokenizer.model beside params.json")
    tokenizer = load_tokenizer(model_dir)
    tiktoken_tok = not isinstance(tokenizer, SentencePiece)

    if params.get("vocab_size", 0) == -1:
        params["vocab_size"] = tokenizer.n_words
    if not tiktoken_tok and "rope_theta" not in params:
        params["rope_theta"] = 10000.0  # LLaMA-2's params.json leaves its RoPE base implicit

    context = context_length(params, tiktoken_tok)
    if max_seq_len is None:
        max_seq_len = context
    elif max_seq_len > context:
        raise ValueError(f"max_seq_len {max_seq_len} exceeds the context length {context} of the model in "
                         f"{model_dir} (131072 for LLaMA-3.1, 8192 for LLaMA-3 and other tiktoken models, "
                         f"4096 for LLaMA-2)")
    model = build_model(params, params_path, lambda: load_state_dict(model_dir, dtype=dtype, device=device),
                        max_seq_len=max_seq_len, attn_impl=attn_impl)
    return model, tokenizer


def _load_hf_model(model_dir: Path, *, dtype: torch.dtype, device: torch.device | str,
                   max_seq_len: Optional[int], attn_impl: str):
    """`(Transformer in eval mode, HFTokenizer)` of a Hugging Face folder, read by `llama.hf`.

    max_seq_len: default and upper bound `max_position_embeddings` of config.json.
    """
    where = str(model_dir / hf.CONFIG)
    config = hf.read_config(model_dir)
    params = hf.params_from_config(config, where)
    tokenizer = load_hf_tokenizer(model_dir)
    context = hf.context_length(config, where)
    if max_seq_len is None:
        max_seq_len = context
    elif max_seq_len > context:
        raise ValueError(f"max_seq_len {max_seq_len} exceeds the context length {context} of the model in "
                         f"{model_dir} ({where} field 'max_position_embeddings')")
    model = build_model(params, model_dir / hf.CONFIG,
                        lambda: hf.load_hf_state_dict(model_dir, dtype=dtype, device=device, params=params),
                        max_seq_len=max_seq_len, attn_impl=attn_impl)
    return model, tokenizer


def build_model(params: Mapping, params_path: Path, load_weights: Callable[[], dict[str, torch.Tensor]], *,
                max_seq_len: int, attn_impl: str = "sdpa") -> Transformer:
    """The `Transformer` (eval mode) of `params`, read from `params_path` (params.json or config.json), with
    the weights `load_weights()` returns assigned as they are (no copy). A bad `params` value is a ValueError
    naming `params_path`; weights that are not exactly the model's keys and shapes, one naming its folder."""
    try:
        args = ModelArgs.from_params(**params, max_seq_len=max_seq_len, attn_impl=attn_impl)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{params_path}: {e}") from None
    with torch.device("meta"):
        model = Transformer(args)
    sd = load_weights()
    check_state_dict(model.state_dict(), sd, str(params_path.parent), params_path.name)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def stored_dtype(model_dir: str | os.PathLike) -> torch.dtype:
    """The dtype in which a base-model directory (Meta or Hugging Face) stores its floating-point weights."""
    if hf.is_hf_dir(model_dir):
        return hf.stored_dtype(model_dir)
    sd = load_shard(shard_paths(model_dir)[0])
    return next(t.dtype for t in sd.values() if t.is_floating_point())


def save_model_dir(out_dir: str | os.PathLike, params: Mapping, state_dict: Mapping[str, torch.Tensor],
                   files: Mapping[str, bytes | str] | None = None) -> Path:
    """Write a base-model directory atomically: all of it appears at `out_dir`, or nothing does.

    params: Meta's params.json keys (checked by building `ModelArgs`).
    state_dict: Meta-named tensors, saved as `consolidated.00.pth`.
    files: extra files by name (e.g. `tokenizer.model`, `tokenizer_config.json`), bytes or text.

    Everything is written into a temporary directory beside `out_dir` and renamed into place;
    missing parent directories are created (and removed again on failure). `out_dir` must not
    exist yet (FileExistsError).
    """
    out_dir = Path(out_dir)
    try:
        ModelArgs.from_params(**params)
    except (ValueError, TypeError) as e:
        raise ValueError(f"params for {out_dir}: {e}") from None
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists: remove it or choose another output directory")
    created = []
    parent = out_dir.parent.absolute()
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for d in reversed(created):
        d.mkdir()
    tmp = new_temp_dir(out_dir)
    try:
        (tmp / "params.json").write_text(json.dumps(dict(params), indent=2) + "\n")
        torch.save(dict(state_dict), tmp / "consolidated.00.pth")
        for name, content in (files or {}).items():
            target = tmp / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return out_dir
