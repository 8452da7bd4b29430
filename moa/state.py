"""Adapter state: the adapter tensors keyed by module path, strict loading, adapter files, LoRA merging.

Keys are the parameter names inside the (unwrapped) `Transformer`, e.g.
`layers.3.attention.wq.lora_A`; the frozen base never appears. `adapter.pth` holds that dict,
`adapter_params.json` beside it the `MoAConfig` that rebuilds the same adapters.
"""
from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from moa.adapters import LoRALinear
from moa.atomic import atomic_write_files, write_json
from moa.config import MoAConfig
from moa.inject import MoABlock, attach_adapters

ADAPTER_PARAMS = "adapter_params.json"
# Written beside adapter.pth by extract_adapter_from_checkpoint.py when training ran with --w_bias: the
# base tensors training changed (norms, biases).
BASE_TRAINED = "base_trained.pth"


def _adapter_names(model: nn.Module) -> tuple[str, ...]:
    names = getattr(model, "moa_adapter_names", None)
    if names is None:
        raise ValueError("this model has no adapters: call moa.attach_adapters(model, cfg) first "
                         "(pass the unwrapped Transformer, not a DDP/FSDP wrapper)")
    return names


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module path: tensor} of every adapter parameter (detached, sharing storage); never a base weight."""
    params = dict(model.named_parameters())
    return {name: params[name].detach() for name in _adapter_names(model)}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the model's adapter parameters (cast to their dtype and device).

    Strict: a missing or unexpected key, or a shape that differs, is a `ValueError` naming it.
    """
    names = _adapter_names(model)
    missing = [n for n in names if n not in state]
    unexpected = sorted(set(state) - set(names))
    if missing or unexpected:
        raise ValueError("adapter state does not match the model's adapters: "
                         + (f"missing keys {missing}" if missing else "")
                         + ("; " if missing and unexpected else "")
                         + (f"unexpected keys {unexpected}" if unexpected else ""))
    params = dict(model.named_parameters())
    for name in names:
        if tuple(state[name].shape) != tuple(params[name].shape):
            raise ValueError(f"adapter state: {name} has shape {tuple(state[name].shape)}, "
                             f"the model expects {tuple(params[name].shape)}")
    with torch.no_grad():
        for name in names:
            params[name].copy_(state[name])


def save_adapter(model: nn.Module, path: str) -> None:
    """Write `adapter_state_dict(model)` to `path` (e.g. `.../adapter.pth`) and the model's
    `MoAConfig` to `adapter_params.json` beside it, all-or-none (temporary names, then renamed)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    state = {k: v.cpu() for k, v in adapter_state_dict(model).items()}
    atomic_write_files({path: lambda tmp: torch.save(state, tmp),
                        os.path.join(folder, ADAPTER_PARAMS): lambda tmp: write_json(model.moa_config.to_dict(), tmp)})


def load_adapter(model: nn.Module, path: str) -> nn.Module:
    """Load `path` (adapter.pth) with `adapter_params.json` beside it into `model` and return it.

    A model without adapters gets them attached from the JSON first (fp32); one with adapters must
    have been attached with the same config (else `ValueError` naming the differing flags). An
    adapter whose training also changed base tensors (`base_trained.pth` beside it, --w_bias True) is
    refused: `moa.loading.load_trained_adapter` loads both.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter file {path} does not exist")
    if os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(path)), BASE_TRAINED)):
        raise ValueError(f"{path}: a {BASE_TRAINED} beside it holds base tensors that training changed "
                         "(--w_bias True); load both with moa.loading.load_trained_adapter")
    cfg = MoAConfig.from_json(os.path.join(os.path.dirname(os.path.abspath(path)), ADAPTER_PARAMS))
    current = getattr(model, "moa_config", None)
    if current is None:
        attach_adapters(model, cfg)
    elif current != cfg:
        diff = sorted(k for k, v in cfg.to_dict().items() if current.to_dict()[k] != v)
        raise ValueError(f"{path}: adapter flags {diff} differ from the adapters attached to the model")
    state = torch.load(path, map_location="cpu", weights_only=True)
    load_adapter_state_dict(model, state)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every plain LoRA into its frozen weight (`W += B A * alpha / r`) and return the model.

    Each `LoRALinear` becomes a plain `nn.Linear` holding the same (updated) weight under the same
    key; the LoRA tensors leave `moa_adapter_names`, and `model.moa_config` gets `lora_layers="0-0"`
    so that saved remaining adapters (prompt, parallel adapter) rebuild correctly. Refused with a
    `ValueError` for mixtures (`--expert_num > 1`) and for a type router other than `none`, whose
    weights depend on the input and cannot live in a fixed matrix, and for a LoRA on K or V in a
    layer with a prompt (the prompt reads the frozen wk/wv, which merging would change).
    """
    cfg: MoAConfig = getattr(model, "moa_config", None)
    if cfg is None:
        raise ValueError("merge_lora: this model has no adapters attached")
    sites = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not sites:
        return model
    if cfg.type_router != "none":
        raise ValueError(f"merge_lora: --type_router {cfg.type_router} weights each LoRA per token/sequence, "
                         "which a merged weight cannot express; only --type_router none can be merged")
    mixtures = [(name, m.mixture) for name, m in sites if m.mixture != "lora"]
    if mixtures:
        raise ValueError(f"merge_lora: {mixtures[0][0]} is a {mixtures[0][1]} mixture (--expert_num "
                         f"{cfg.expert_num}) whose weights depend on the input; only plain LoRA can be merged")
    for name, _ in sites:
        block_name, _, proj = name.rpartition(".")
        attention = model.get_submodule(block_name)
        if proj in ("wk", "wv") and getattr(attention, "prompt", None) is not None:
            raise ValueError(f"merge_lora: {name} shares its layer with a prompt, whose keys/values must go "
                             "through the frozen (unmerged) weight; merging would change the prompt")
    removed = set()
    with torch.no_grad():
        for name, site in sites:
            w = site.weight
            w.add_(((site.lora_B.float() @ site.lora_A.float()) * site.scale).to(w.dtype))
            plain = nn.Linear(site.in_features, site.out_features, bias=site.bias is not None, device="meta")
            plain.weight = site.weight
            plain.bias = site.bias
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, plain)
            removed.update(f"{name}.{p}" for p, _ in site.named_parameters() if p not in ("weight", "bias"))
    for block in model.modules():
        if isinstance(block, MoABlock):
            block.moa_sites = {s: m for s, m in block.moa_sites.items() if not isinstance(m, LoRALinear)}
    model.moa_adapter_names = tuple(n for n in model.moa_adapter_names if n not in removed)
    model.moa_config = dataclasses.replace(cfg, lora_layers="0-0")
    return model
