"""Task adapters that are not plain LoRA, served top-1 by attaching them to the model for their rows.

A task-registry entry's adapter is one of two kinds (`adapter_kind`, read from its adapter_params.json):
- `lora`: a plain LoRA (`moa.lora.algebra.check_plain_lora`, DoRA included, no base_trained.pth). The
  bank of `moa.tasks.fusion` serves it (every row on its own LoRA in one pass) and fusion weighs it.
- `moa`: any other adapter main_finetune.py writes: Soft / Sparse / instance-level MoA, UniPEFT,
  HydraLoRA, MoLoRA, top-k MoE-LoRA, AdaMoLE, a prompt, a parallel adapter, or a LoRA whose training
  also changed base tensors (--w_bias, base_trained.pth). Its routers and nonlinear branches are no
  weight change that a bank could gather per row, so its rows run as a group of their own with the
  adapter attached (`AdapterSwap.use`): `attach_adapters` (the one seam), its tensors copied in by
  `load_adapter_state_dict` (strict) and its base_trained.pth tensors copied over the base's. A
  `moa` adapter is never fused: fusion weighs LoRA deltas dW = s B A.

`AdapterSwap` keeps one adapter attached at a time: the next adapter of equal flags reuses the attached
modules (only its state is copied in); other flags re-attach. `restore` puts the model back as it was
before the first attach (`ModelSnapshot`: every module's class and attributes, requires_grad, and the
base tensors base_trained.pth overwrote), so the bank and the selector see the bare base again.

The adapters are read once (`read_adapter_files`, THE reader) and checked against the base once
(`load_trained_adapter`, the single-adapter path of example.py --adapter_path, with its errors: another
base's shapes or layer count name the file), then held in memory (CPU, as saved).
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Iterator, Mapping, Optional

import torch
from torch import nn

from llama.model import Transformer
from moa.files.adapters import (
    ADAPTER_PARAMS,
    BASE_TRAINED,
    adapter_file,
    load_trained_adapter,
    read_adapter_files,
    read_adapter_params,
)
from moa.lora.algebra import check_plain_lora
from moa.method.config import MoAConfig, parse_spans
from moa.method.inject import attach_adapters
from moa.method.state import load_adapter_state_dict

LORA_KIND = "lora"  # a plain LoRA: the bank serves it, fusion weighs it
MOA_KIND = "moa"  # any other adapter: attached for its rows (top-1), never fused
ADAPTER_KINDS = (LORA_KIND, MOA_KIND)

_TYPE_ROUTER_NAMES = {"soft": "Soft MoA", "sparse": "Sparse MoA", "instance": "instance-level MoA",
                      "unipeft": "UniPEFT"}


def _has(cfg: MoAConfig, flag: str) -> bool:
    return any(end > start for start, end in parse_spans(flag, getattr(cfg, flag)))


def adapter_method(cfg: MoAConfig, base_trained: bool = False) -> str:
    """The method an adapter's flags describe, for listings and messages: e.g. "LoRA", "HydraLoRA",
    "Soft MoA (LoRA + prompt + parallel adapter)", "LoRA with base_trained.pth (--w_bias)"."""
    parts = []
    if _has(cfg, "lora_layers"):
        if cfg.expert_num == 1:
            parts.append("DoRA" if cfg.lora_variant == "dora" else "LoRA")
        elif cfg.hydra_moe:
            parts.append("HydraLoRA" + ("" if cfg.expert_router == "soft" else f" ({cfg.expert_router} router)"))
        else:
            parts.append({"soft": "MoLoRA", "topk": "top-k MoE-LoRA", "adamole": "AdaMoLE"}[cfg.expert_router])
    if _has(cfg, "prompt_layers"):
        parts.append("prompt" if cfg.expert_num == 1 else f"{cfg.expert_num} prompt sets")
    if _has(cfg, "p_adapter_layers"):
        parts.append("parallel adapter" if cfg.expert_num == 1 else f"{cfg.expert_num} parallel adapters")
    inner = " + ".join(parts) or "no adapter type"
    router = _TYPE_ROUTER_NAMES.get(cfg.type_router)
    name = f"{router} ({inner})" if router else inner
    return name + (f" with {BASE_TRAINED} (--w_bias)" if base_trained else "")


def why_not_plain_lora(cfg: MoAConfig, file: Path, base_trained: bool) -> Optional[str]:
    """Why the adapter `file` with flags `cfg` (and a base_trained.pth beside it, when `base_trained`)
    is not a plain LoRA, as one message naming the file and each deciding flag (`check_plain_lora`'s,
    DoRA allowed), or None when it is one."""
    try:
        check_plain_lora(cfg, str(file), dora_ok=True)
    except ValueError as e:
        return str(e)
    if base_trained:
        return (f"{file}: {file.parent / BASE_TRAINED} beside it holds base tensors that training also changed "
                "(--w_bias True), which a LoRA delta cannot carry")
    return None


def not_plain_lora(path: str | os.PathLike) -> Optional[str]:
    """`why_not_plain_lora` of the adapter at `path` (adapter.pth or its folder), read from its
    adapter_params.json."""
    file = adapter_file(path)
    cfg, _ = read_adapter_params(file.parent / ADAPTER_PARAMS)
    return why_not_plain_lora(cfg, file, (file.parent / BASE_TRAINED).is_file())


def adapter_kind(path: str | os.PathLike) -> str:
    """`lora` (a plain LoRA) or `moa` (any other adapter) for the adapter at `path`, read from its
    adapter_params.json (and whether a base_trained.pth lies beside it). `FileNotFoundError` /
    `ValueError` name the file when it cannot be read."""
    return LORA_KIND if not_plain_lora(path) is None else MOA_KIND


def describe_adapter(path: str | os.PathLike) -> str:
    """`adapter_method` of the adapter at `path` (its adapter_params.json)."""
    file = adapter_file(path)
    return adapter_method(read_adapter_params(file.parent / ADAPTER_PARAMS)[0], (file.parent / BASE_TRAINED).is_file())


class ModelSnapshot:
    """A model's module tree as it is now, to put back after `attach_adapters` changed it in place:
    every module's class and attributes (shallow: the same submodules, parameters and buffers, so no
    tensor is copied), and every parameter's `requires_grad`. `restore` undoes whatever an attach
    added (subclass swaps, wrapped projections, routers, prompts), leaving the modules it created
    unreferenced."""

    def __init__(self, model: nn.Module):
        self.modules = [(m, type(m), _shallow(vars(m))) for m in model.modules()]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> None:
        """Put every module's class and attributes and every `requires_grad` back as they were."""
        for module, cls, attrs in self.modules:
            module.__class__ = cls
            state = vars(module)
            state.clear()
            state.update(_shallow(attrs))
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)


def _shallow(attrs: Mapping[str, object]) -> dict[str, object]:
    """`attrs` with its dict and set values copied one level (a module's `_modules`, `_parameters`, ...)."""
    return {k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in attrs.items()}


@dataclass
class SwapAdapter:
    """A `moa` task adapter held in memory: task name, adapter file, flags, tensors (CPU, as saved), the
    base tensors of its base_trained.pth ({} without) and its training max_seq_len (None if unknown)."""

    task: str
    path: Path
    cfg: MoAConfig
    state: dict[str, torch.Tensor]
    base_trained: dict[str, torch.Tensor] = field(default_factory=dict)
    max_seq_len: Optional[int] = None

    @property
    def method(self) -> str:
        return adapter_method(self.cfg, bool(self.base_trained))

    @property
    def why_not_lora(self) -> Optional[str]:
        """Why it is not a plain LoRA (naming the file and the deciding flags); None if it is one."""
        return why_not_plain_lora(self.cfg, self.path, bool(self.base_trained))


def load_swap_adapter(model: Transformer, task: str, path: str | os.PathLike, base_dir: str | os.PathLike,
                      where: str = "") -> SwapAdapter:
    """Read the adapter of `task` at `path` and check it against `model` (a model without adapters
    attached; `base_dir` names its base in messages) by loading it once through the single-adapter path
    (`load_trained_adapter`: another base's shapes or layer count, keys that do not match the flags),
    then put the model back. Errors are `ValueError` / `FileNotFoundError` prefixed by `where`."""
    with _errors_prefixed(where):
        files = read_adapter_files(path)
    snapshot = ModelSnapshot(model)
    params = dict(model.named_parameters())
    originals = {n: params[n].detach().clone() for n in files.base_trained if n in params}
    try:
        with _errors_prefixed(where, strip="--adapter_path "):
            load_trained_adapter(model, files.path, base_dir, files)
    finally:
        with torch.no_grad():
            for name, t in originals.items():
                params[name].copy_(t)
        snapshot.restore()
    return SwapAdapter(task, files.path, files.cfg, files.state, files.base_trained, files.max_seq_len)


@contextlib.contextmanager
def _errors_prefixed(where: str, strip: str = "") -> Iterator[None]:
    """Re-raise a `FileNotFoundError` / `ValueError` of the block with "`where`: " in front of its
    message (`strip` taken off the message's start first)."""
    try:
        yield
    except (FileNotFoundError, ValueError) as e:
        message = str(e).removeprefix(strip)
        kind = FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError
        raise kind(f"{where}: {message}" if where else message) from None


class AdapterSwap:
    """Serves `moa` task adapters (`adapters`: key -> `SwapAdapter`) on one model, one at a time.

    `use(key)` attaches that adapter (when none of equal flags is attached: otherwise the attached modules
    are reused) and copies its state and base tensors in; `restore()` puts the model back as before the
    first `use` (modules and base tensors). The model must have no adapters of its own when `use` attaches
    (a bank attached to it is suspended by the caller, `moa.tasks.routing.TaskAdapters`)."""

    def __init__(self, model: Transformer, adapters: Mapping[Hashable, SwapAdapter]):
        self.model = model
        self.adapters = dict(adapters)
        self.attaches = 0  # how often `use` attached modules (equal flags reuse them)
        self._snapshot: Optional[ModelSnapshot] = None
        self._cfg: Optional[MoAConfig] = None
        self._current: Optional[Hashable] = None
        self._base_originals: dict[str, torch.Tensor] = {}

    @property
    def current(self) -> Optional[Hashable]:
        """The key of the adapter in use, None when the model is as it was."""
        return self._current

    def use(self, key: Hashable) -> None:
        """Make the adapter `key` the model's: attach (or reuse equal flags' modules), copy its state in."""
        adapter = self.adapters[key]
        if key == self._current:
            return
        if self._snapshot is not None and self._cfg != adapter.cfg:
            self.restore()
        if self._snapshot is None:
            self._snapshot = ModelSnapshot(self.model)
            attach_adapters(self.model, adapter.cfg)
            self.model.train(self.model.training)  # the new modules follow the model's mode (eval)
            self._cfg = adapter.cfg
            self.attaches += 1
        self._current = None  # until its state is in
        self._put_base_back()
        load_adapter_state_dict(self.model, adapter.state)
        if adapter.base_trained:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, t in adapter.base_trained.items():
                    if name not in self._base_originals:
                        self._base_originals[name] = params[name].detach().clone()
                    params[name].copy_(t)
        self._current = key

    def restore(self) -> None:
        """Detach the attached adapter and put the base tensors back: the model as before the first `use`."""
        self._put_base_back()
        self._base_originals = {}
        if self._snapshot is not None:
            self._snapshot.restore()
        self._snapshot, self._cfg, self._current = None, None, None

    def _put_base_back(self) -> None:
        if not self._base_originals:
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in self._base_originals.items():
                params[name].copy_(t)
