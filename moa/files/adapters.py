"""THE reader and THE writer of adapter files: `adapter.pth` (adapter tensors keyed by module path),
`adapter_params.json` beside it (every adapter flag, plus the training `max_seq_len` when training
wrote it) and, when training also changed base tensors (--w_bias True), `base_trained.pth`.

    write_adapter_files(path, cfg, state, ...)   all-or-none (temporary names, renamed once all exist)
    read_adapter_files(path) -> AdapterFiles     checked: flags parse, tensors load, keys are strings
    save_adapter(model, path) / load_adapter(model, path)      a model's adapters <-> files
    load_trained_adapter(model, path, base_dir)  what example.py loads: adapters + base_trained.pth

All-or-none on disk: adapter_params.json records the SHA-256 of every tensor file written with it
(`"files": {"adapter.pth": HEX, ...}`) and is renamed into place first, so a write killed between
the renames leaves a pair whose hashes disagree, which reading refuses. Files of older code (no
`"files"`) load unchecked.

Strict: a key missing or left over, or a shape that does not fit the base, is a `ValueError` that
says which file, which tensor and why.
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from llama.files import state_dict_mismatch
from moa.atomic import atomic_write_files, write_json
from moa.checks import load_tensors, read_json
from moa.files.settings import file_identity, sha256_file
from moa.method.config import WRITE_MANIFEST, MoAConfig, parse_adapter_params
from moa.method.inject import adapter_names, attach_adapters, moa_config
from moa.method.state import adapter_state_dict, load_adapter_state_dict, pissa_as_plain_lora

ADAPTER_FILE = "adapter.pth"
ADAPTER_PARAMS = "adapter_params.json"
# Base tensors that training changed (norms, biases; --w_bias True), beside adapter.pth.
BASE_TRAINED = "base_trained.pth"


def adapter_identity(adapter_path: Optional[str | os.PathLike]) -> dict[str, Any]:
    """An adapter, for the settings record of an output (moa/files/settings.py): its path and the content
    of adapter.pth and the files beside it that it is read with (adapter_params.json, base_trained.pth);
    {"adapter_path": None} for the bare model."""
    if not adapter_path:
        return {"adapter_path": None}
    path = os.path.abspath(adapter_path)
    file = os.path.join(path, ADAPTER_FILE) if os.path.isdir(path) else path
    folder = os.path.dirname(file)
    files = {n: file_identity(os.path.join(folder, n)) for n in (ADAPTER_PARAMS, BASE_TRAINED)}
    files[os.path.basename(file)] = file_identity(file)
    return {"adapter_path": path, "adapter_files": {k: v for k, v in files.items() if v is not None}}


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


def _is_training_checkpoint(obj: object) -> bool:
    return isinstance(obj, dict) and {"model", "optimizer", "adapter_params"} <= set(obj)


def _tensor_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    state = load_tensors(path, what)
    if _is_training_checkpoint(state):
        raise ValueError(f"{path}: this is a training checkpoint of main_finetune.py, not an {what}; write its "
                         f"adapter with: python extract_adapter_from_checkpoint.py --checkpoint {path}")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path}: expected a dict of {what.replace(' file', '')} tensors keyed by name, "
                         f"got {type(state).__name__}")
    return state


def check_same_write(params_path: Path, manifest: object) -> None:
    """A ValueError unless every file `manifest` names exists beside `params_path` with the hash recorded
    there (written together with it). No manifest: files of older code, unchecked."""
    if manifest is None:
        return
    if not isinstance(manifest, dict):
        raise ValueError(f"{params_path}: {WRITE_MANIFEST!r} must map file names to SHA-256 hashes")
    for name, digest in sorted(manifest.items()):
        file = params_path.parent / str(name)
        if not file.is_file() or sha256_file(file) != digest:
            why = "missing" if not file.is_file() else "its content hash differs from the one recorded there"
            raise ValueError(f"{file} and {params_path} are from different writes ({name} {why}): write the "
                             "adapter again (python extract_adapter_from_checkpoint.py --checkpoint PATH)")


def read_adapter_files(path: str | os.PathLike) -> AdapterFiles:
    """Read adapter.pth (a file or its folder), the adapter_params.json beside it and base_trained.pth
    when present, after checking that they come from one write (`check_same_write`). Tensors stay as
    saved (dtype), on the CPU."""
    file = adapter_file(path)
    params = file.parent / ADAPTER_PARAMS
    state = _tensor_dict(file, "adapter file")
    if not params.is_file():
        raise FileNotFoundError(f"{file}: no {ADAPTER_PARAMS} beside it (extract_adapter_from_checkpoint.py "
                                "writes both; it holds the flags that rebuild the adapters)")
    raw = read_json(params, "adapter params file")
    cfg, max_seq_len = parse_adapter_params(raw, params)
    base = file.parent / BASE_TRAINED
    check_same_write(params, raw.get(WRITE_MANIFEST))
    base_trained = _tensor_dict(base, "base_trained file") if base.is_file() else {}
    return AdapterFiles(file, cfg, state, max_seq_len, base_trained)


def write_adapter_files(path: str | os.PathLike, cfg: MoAConfig, state: dict[str, torch.Tensor],
                        max_seq_len: Optional[int] = None,
                        base_trained: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write `state` to `path` (a file name such as `out/adapter.pth`; a folder, or a name without
    `.pth`, gets `adapter.pth` inside), `cfg` (+ `max_seq_len`) to adapter_params.json beside it and
    `base_trained` (when non-empty) to base_trained.pth, all of them or none. Returns the adapter path.
    A PiSSA adapter is written as the plain LoRA of its delta (rank 2r, `pissa_as_plain_lora`), which
    every consumer (merge, PEFT export, fusion) loads; its training checkpoints keep A0, B0 apart."""
    cfg, state = pissa_as_plain_lora(cfg, state)
    path = Path(path)
    if path.is_dir() or path.suffix != ".pth":
        path = path / ADAPTER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    blobs = {path.name: _serialized(state)}
    if base_trained:
        blobs[BASE_TRAINED] = _serialized(base_trained)
    params = cfg.to_dict() | ({} if max_seq_len is None else {"max_seq_len": int(max_seq_len)})
    params[WRITE_MANIFEST] = {name: hashlib.sha256(blob).hexdigest() for name, blob in blobs.items()}
    # adapter_params.json first: a kill after any rename leaves hashes that the tensor files do not match
    writers = {str(path.parent / ADAPTER_PARAMS): lambda tmp: write_json(params, tmp)}
    writers.update({str(path.parent / name): _bytes_writer(blob) for name, blob in blobs.items()})
    stale = path.parent / BASE_TRAINED
    if not base_trained and stale.is_file():  # an earlier write's, whose manifest lists it: never left beside ours
        stale.unlink()
    atomic_write_files(writers)
    return path


def _serialized(state: dict[str, torch.Tensor]) -> bytes:
    """`torch.save` of `state` (detached, on the CPU, contiguous) as bytes."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, buffer)
    return buffer.getvalue()


def _bytes_writer(blob: bytes) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(blob)
    return write


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


def load_trained_adapter(model: nn.Module, adapter_path: str | os.PathLike, base_dir: str | os.PathLike,
                         files: Optional[AdapterFiles] = None) -> LoadedAdapter:
    """Attach the adapters described by adapter_params.json beside `adapter_path` to `model` and load
    `adapter_path` into them, strictly; with a base_trained.pth beside it (training with --w_bias),
    also copy its tensors over the base's. `files`: those files as `read_adapter_files(adapter_path)`
    already read them (not read again).

    A key missing from or left over in adapter.pth is a ValueError naming it; so is a tensor whose
    shape differs from what this base needs (naming the tensor and both shapes: the adapter was
    trained on a different base than `base_dir`), and a base_trained.pth tensor the base lacks or
    holds in another shape.
    """
    path = Path(adapter_path)
    if not path.is_file():
        raise FileNotFoundError(f"--adapter_path {path}: no such file")
    try:
        files = files or read_adapter_files(path)
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
                         f"--ckpt_dir {base}, or this {ADAPTER_PARAMS} was changed") from None
    params_now = dict(model.named_parameters())
    wrong = state_dict_mismatch({k: params_now[k] for k in adapter_names(model)}, files.state)[2]
    if wrong:
        raise ValueError(_shape_mismatch(model, files.cfg, path, params_path, base, wrong))
    try:
        load_adapter_state_dict(model, files.state)
    except ValueError as e:
        raise ValueError(f"--adapter_path {path}: {e} ({path} does not match the flags of {params_path})") from None
    _copy_base_trained(model, files.base_trained, path.parent / BASE_TRAINED, base)
    return LoadedAdapter(files.max_seq_len, sorted(files.base_trained))


def _base_sizes(model: nn.Module) -> set[int]:
    """The sizes an adapter tensor takes from its base: widths of the projections and heads."""
    a = model.args
    return {a.dim, a.n_heads, a.head_dim, a.n_kv_heads * a.head_dim, a.ffn_hidden_dim, a.vocab_size}


def _shape_mismatch(model: nn.Module, cfg: MoAConfig, path: Path, params_path: Path, base: str,
                    wrong: list[tuple[str, tuple, tuple]]) -> str:
    """Why adapter tensors have other shapes than the adapters attached from `cfg` on this base: a
    needed size that is an adapter flag's value means adapter_params.json and adapter.pth disagree
    (naming the flag); one that is a width of the base means another base; both are said when a size
    is both."""
    key, got, want = wrong[0]
    more = f" ({len(wrong) - 1} more tensors differ)" if len(wrong) > 1 else ""
    sizes = {w for g, w in zip(got, want) if g != w} if len(got) == len(want) else set(want)
    flags = [f"{k} {v}" for k, v in cfg.to_dict().items() if isinstance(v, int) and not isinstance(v, bool)
             and v in sizes]
    other_base = sizes <= _base_sizes(model)
    head = f"--adapter_path {path}: adapter tensor {key} has shape {got}, but "
    if not flags:
        return (head + f"the base model --ckpt_dir {base} needs {want}{more}: the adapter was trained on a "
                "different base model; pass the base it was trained on")
    return (head + f"{', '.join(flags)} in {params_path} needs {want}{more}: {path.name} and {params_path.name} "
            "disagree" + (f" (or the adapter was trained on another base than --ckpt_dir {base})" if other_base else ""))


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
