"""Trained adapter files -> a model: `adapter.pth` + the `adapter_params.json` beside it (every adapter
flag, plus the training `max_seq_len`), and `base_trained.pth` when training also changed base
tensors (--w_bias). Strict: a key missing or left over, or a shape that does not fit the base, is a
`ValueError` that says which and why.
"""
from __future__ import annotations

from dataclasses import dataclass
import os
from pathlib import Path
from typing import Optional

import torch

from llama.model import Transformer
from moa.config import read_adapter_params
from moa.inject import attach_adapters
from moa.state import ADAPTER_PARAMS, BASE_TRAINED, load_adapter_state_dict


@dataclass
class LoadedAdapter:
    """What `load_trained_adapter` loaded: the adapter's training `max_seq_len` (None when its
    adapter_params.json does not record it) and the names of the base tensors replaced from
    base_trained.pth (training with --w_bias; empty without that file)."""

    max_seq_len: Optional[int]
    base_trained: list[str]


def load_trained_adapter(model: Transformer, adapter_path: str | os.PathLike,
                         base_dir: str | os.PathLike) -> LoadedAdapter:
    """Attach the adapters described by `adapter_params.json` beside `adapter_path` to `model` and
    load `adapter_path` into them, strictly; with a `base_trained.pth` beside it (training with
    --w_bias), also copy its tensors over the base's.

    A key missing from or left over in adapter.pth is a ValueError naming it; so is a tensor whose
    shape differs from what this base needs (naming the tensor and both shapes: the adapter was
    trained on a different base than `base_dir`), and a base_trained.pth tensor the base lacks or
    holds in another shape.
    """
    path = Path(adapter_path)
    if not path.is_file():
        raise FileNotFoundError(f"--adapter_path {path}: no such file")
    params_path = path.parent / ADAPTER_PARAMS
    if not params_path.is_file():
        raise FileNotFoundError(f"--adapter_path {path}: no {ADAPTER_PARAMS} beside it (extract_adapter_from_"
                                "checkpoint.py writes both; it holds the flags that rebuild the adapters)")
    cfg, train_max_seq_len = read_adapter_params(params_path)

    a = model.args
    base = (f"{base_dir} (dim {a.dim}, n_layers {a.n_layers}, n_heads {a.n_heads}, "
            f"n_kv_heads {a.n_kv_heads}, vocab_size {a.vocab_size})")
    try:
        attach_adapters(model, cfg)
    except ValueError as e:
        raise ValueError(f"{params_path}: {e}: the adapter was trained on a different base model than "
                         f"--ckpt_dir {base}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a tensor dict
        raise ValueError(f"--adapter_path {path}: cannot read it as a saved tensor dict ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"--adapter_path {path}: expected a dict of adapter tensors, got {type(state).__name__}")
    params_now = dict(model.named_parameters())
    wrong = [(k, tuple(state[k].shape), tuple(params_now[k].shape)) for k in model.moa_adapter_names
             if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != params_now[k].shape]
    if wrong:
        key, got, want = wrong[0]
        more = f" ({len(wrong) - 1} more tensors differ)" if len(wrong) > 1 else ""
        raise ValueError(f"--adapter_path {path}: adapter tensor {key} has shape {got}, but the base model "
                         f"--ckpt_dir {base} needs {want}{more}: the adapter was trained on a different "
                         f"base model; pass the base it was trained on")
    try:
        load_adapter_state_dict(model, state)
    except ValueError as e:
        raise ValueError(f"--adapter_path {path}: {e} (adapter.pth does not match the {ADAPTER_PARAMS} "
                         "beside it)") from None
    return LoadedAdapter(train_max_seq_len, _load_base_trained(model, path.parent / BASE_TRAINED, base))


def _load_base_trained(model: Transformer, path: Path, base: str) -> list[str]:
    """Copy the tensors of `path` (when it exists) over the base parameters of the same name."""
    if not path.is_file():
        return []
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # as for adapter.pth
        raise ValueError(f"{path}: cannot read it as a saved tensor dict ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of base tensors, got {type(state).__name__}")
    params = dict(model.named_parameters())
    adapter_names = set(model.moa_adapter_names)
    for name, t in state.items():
        if name not in params or name in adapter_names:
            raise ValueError(f"{path}: {name!r} is not a parameter of the base model --ckpt_dir {base}")
        if not isinstance(t, torch.Tensor) or t.shape != params[name].shape:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{path}: {name} has shape {shape}, but the base model --ckpt_dir {base} needs "
                             f"{tuple(params[name].shape)}: it was trained on a different base model")
    with torch.no_grad():
        for name, t in state.items():
            params[name].copy_(t)
    return sorted(state)
