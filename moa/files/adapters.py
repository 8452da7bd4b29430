"""THE reader and THE writer of adapter files: `adapter.pth` (adapter tensors keyed by module path),
`adapter_params.json` beside it (every adapter flag, plus the training `max_seq_len` when training
wrote it) and, when training also changed base tensors (--w_bias True), `base_trained.pth`.

    write_adapter_files(path, cfg, state, ...)   all-or-none (temporary names, renamed once all exist)
    read_adapter_files(path) -> AdapterFiles     checked: flags parse, tensors load, keys are strings
    save_adapter(model, path) / load_adapter(model, path)      a model's adapters <-> files
    load_trained_adapter(model, path, base_dir)  what example.py loads: adapters + base_trained.pth

Strict: a key missing or left over, or a shape that does not fit the base, is a `ValueError` that
says which file, which tensor and why.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from moa.checks import load_tensors, read_json
from moa.files.atomic import atomic_write_files, write_json
from moa.method.config import MoAConfig, parse_adapter_params
from moa.method.inject import adapter_names, attach_adapters, moa_config
from moa.method.state import adapter_state_dict, load_adapter_state_dict

ADAPTER_FILE = "adapter.pth"
ADAPTER_PARAMS = "adapter_params.json"
# Base tensors that training changed (norms, biases; --w_bias True), beside adapter.pth.
BASE_TRAINED = "base_trained.pth"


@dataclass
class AdapterFiles:
    """What one adapter folder holds: the flags, the adapter tensors, the training `max_seq_len` (None
    when not recorded) and the base tensors training changed ({} without base_trained.pth)."""

    path: Path
    cfg: MoAConfig
    state: dict[str, torch.Tensor]
    max_seq_len: Optional[int] = None
    base_trained: dict[str, torch.Tensor] = field(default_factory=dict)


def adapter_file(path: str | os.PathLike) -> Path:
    """`path` itself when it is a file, else `path/adapter.pth`; FileNotFoundError when missing."""
    path = Path(path)
    file = path / ADAPTER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"adapter file {file} does not exist (expected {ADAPTER_FILE} with "
                                f"{ADAPTER_PARAMS} beside it)")
    return file


def read_adapter_params(path: str | os.PathLike) -> tuple[MoAConfig, Optional[int]]:
    """Read `adapter_params.json`: (the adapter flags, the training `max_seq_len` or None).
    `FileNotFoundError` / `ValueError` name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such adapter params file (it holds the flags that rebuild the "
                                "adapters; extract_adapter_from_checkpoint.py writes it beside adapter.pth)")
    return parse_adapter_params(read_json(path, "adapter params file"), path)


def _tensor_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    state = load_tensors(path, what)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path}: expected a dict of {what.replace(' file', '')} tensors keyed by name, "
                         f"got {type(state).__name__}")
    return state


def read_adapter_files(path: str | os.PathLike) -> AdapterFiles:
    """Read adapter.pth (a file or its folder), the adapter_params.json beside it and base_trained.pth
    when present. Tensors stay as saved (dtype), on the CPU."""
    file = adapter_file(path)
    params = file.parent / ADAPTER_PARAMS
    if not params.is_file():
        raise FileNotFoundError(f"{file}: no {ADAPTER_PARAMS} beside it (extract_adapter_from_checkpoint.py "
                                "writes both; it holds the flags that rebuild the adapters)")
    cfg, max_seq_len = read_adapter_params(params)
    state = _tensor_dict(file, "adapter file")
    base = file.parent / BASE_TRAINED
    base_trained = _tensor_dict(base, "base_trained file") if base.is_file() else {}
    return AdapterFiles(file, cfg, state, max_seq_len, base_trained)


def write_adapter_files(path: str | os.PathLike, cfg: MoAConfig, state: dict[str, torch.Tensor],
                        max_seq_len: Optional[int] = None,
                        base_trained: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write `state` to `path` (a file name such as `out/adapter.pth`; a folder, or a name without
    `.pth`, gets `adapter.pth` inside), `cfg` (+ `max_seq_len`) to adapter_params.json beside it and
    `base_trained` (when non-empty) to base_trained.pth, all of them or none. Returns the adapter path."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".pth":
        path = path / ADAPTER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    params = cfg.to_dict() | ({} if max_seq_len is None else {"max_seq_len": int(max_seq_len)})
    writers = {str(path): lambda tmp: torch.save(tensors, tmp),
               str(path.parent / ADAPTER_PARAMS): lambda tmp: write_json(params, tmp)}
    if base_trained:
        base = {k: v.detach().cpu().contiguous() for k, v in base_trained.items()}
        writers[str(path.parent / BASE_TRAINED)] = lambda tmp: torch.save(base, tmp)
    atomic_write_files(writers)
    return path


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write `adapter_state_dict(model)` to `path` (e.g. `.../adapter.pth`) and the model's `MoAConfig`
    to adapter_params.json beside it, all-or-none."""
    return write_adapter_files(path, moa_config(model), adapter_state_dict(model))


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load `path` (adapter.pth) with adapter_params.json beside it into `model` and return it.

    Attaches the adapters when the model has none; when it has, their flags must equal the file's
    (`ValueError` naming the flags that differ). An adapter whose training also changed base tensors
    (base_trained.pth beside it, --w_bias True) is refused: `load_trained_adapter` loads both.
    """
    files = read_adapter_files(path)
    if files.base_trained:
        raise ValueError(f"{path}: a {BASE_TRAINED} beside it holds base tensors that training changed "
                         "(--w_bias True); load both with moa.files.adapters.load_trained_adapter")
    current = moa_config(model, required=False)
    if current is None:
        attach_adapters(model, files.cfg)
    elif current != files.cfg:
        diff = sorted(k for k, v in files.cfg.to_dict().items() if current.to_dict()[k] != v)
        raise ValueError(f"{path}: adapter flags {diff} differ from the adapters attached to the model")
    load_adapter_state_dict(model, files.state)
    return model


@dataclass
class LoadedAdapter:
    """What `load_trained_adapter` loaded: the adapter's training `max_seq_len` (None when its
    adapter_params.json does not record it) and the names of the base tensors replaced from
    base_trained.pth (training with --w_bias; empty without that file)."""

    max_seq_len: Optional[int]
    base_trained: list[str]


def _describe_base(model: nn.Module, base_dir: str | os.PathLike) -> str:
    a = model.args
    return (f"{base_dir} (dim {a.dim}, n_layers {a.n_layers}, n_heads {a.n_heads}, "
            f"n_kv_heads {a.n_kv_heads}, vocab_size {a.vocab_size})")


def load_trained_adapter(model: nn.Module, adapter_path: str | os.PathLike,
                         base_dir: str | os.PathLike) -> LoadedAdapter:
    """Attach the adapters described by adapter_params.json beside `adapter_path` to `model` and load
    `adapter_path` into them, strictly; with a base_trained.pth beside it (training with --w_bias),
    also copy its tensors over the base's.

    A key missing from or left over in adapter.pth is a ValueError naming it; so is a tensor whose
    shape differs from what this base needs (naming the tensor and both shapes: the adapter was
    trained on a different base than `base_dir`), and a base_trained.pth tensor the base lacks or
    holds in another shape.
    """
    path = Path(adapter_path)
    if not path.is_file():
        raise FileNotFoundError(f"--adapter_path {path}: no such file")
    try:
        files = read_adapter_files(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--adapter_path {e}") from None
    except ValueError as e:
        raise ValueError(f"--adapter_path {e}") from None
    base = _describe_base(model, base_dir)
    params_path = path.parent / ADAPTER_PARAMS
    try:
        attach_adapters(model, files.cfg)
    except ValueError as e:
        raise ValueError(f"{params_path}: {e}: the adapter was trained on a different base model than "
                         f"--ckpt_dir {base}") from None
    params_now = dict(model.named_parameters())
    wrong = [(k, tuple(files.state[k].shape), tuple(params_now[k].shape)) for k in adapter_names(model)
             if k in files.state and files.state[k].shape != params_now[k].shape]
    if wrong:
        key, got, want = wrong[0]
        more = f" ({len(wrong) - 1} more tensors differ)" if len(wrong) > 1 else ""
        raise ValueError(f"--adapter_path {path}: adapter tensor {key} has shape {got}, but the base model "
                         f"--ckpt_dir {base} needs {want}{more}: the adapter was trained on a different "
                         f"base model; pass the base it was trained on")
    try:
        load_adapter_state_dict(model, files.state)
    except ValueError as e:
        raise ValueError(f"--adapter_path {path}: {e} (adapter.pth does not match the {ADAPTER_PARAMS} "
                         "beside it)") from None
    _copy_base_trained(model, files.base_trained, path.parent / BASE_TRAINED, base)
    return LoadedAdapter(files.max_seq_len, sorted(files.base_trained))


def _copy_base_trained(model: nn.Module, state: dict[str, torch.Tensor], path: Path, base: str) -> None:
    """Copy `state` (base_trained.pth) over the base parameters of the same name, after checking all."""
    params = dict(model.named_parameters())
    adapters = set(adapter_names(model))
    for name, t in state.items():
        if name not in params or name in adapters:
            raise ValueError(f"{path}: {name!r} is not a parameter of the base model --ckpt_dir {base}")
        if t.shape != params[name].shape:
            raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, but the base model --ckpt_dir {base} "
                             f"needs {tuple(params[name].shape)}: it was trained on a different base model")
    with torch.no_grad():
        for name, t in state.items():
            params[name].copy_(t)
