"""Adapter state in memory: the adapter tensors keyed by module path, strict loading, LoRA merging.

Keys are the parameter names inside the (unwrapped) `Transformer`, e.g.
`layers.3.attention.wq.lora_A`; the frozen base never appears. Files: `moa.files.adapters`.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from llama.files import first_keys, state_dict_mismatch
from moa.method.experts import LoRALinear
from moa.method.inject import MoABlock, adapter_buffers, adapter_names, moa_config

if TYPE_CHECKING:
    from moa.method.config import MoAConfig


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module path: tensor} of every adapter parameter (detached, sharing storage), then the fixed
    adapter tensors (PiSSA's `pissa_A0`, `pissa_B0`); never a base weight."""
    params = dict(model.named_parameters())
    return {name: params[name].detach() for name in adapter_names(model)} | adapter_buffers(model)


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the model's adapter parameters (cast to their dtype and device).

    Strict: a missing or unexpected key, or a shape that differs, is a `ValueError` naming it.
    """
    params = dict(model.named_parameters())
    tensors = {name: params[name] for name in adapter_names(model)} | adapter_buffers(model)
    missing, unexpected, wrong = state_dict_mismatch(tensors, state)
    if missing or unexpected:
        raise ValueError("adapter state does not match the model's adapters: "
                         + (f"missing keys {first_keys(missing)}" if missing else "")
                         + ("; " if missing and unexpected else "")
                         + (f"unexpected keys {first_keys(unexpected)}" if unexpected else "")
                         + _deciding_flags(missing + unexpected))
    if wrong:
        name, got, want = wrong[0]
        raise ValueError(f"adapter state: {name} has shape {got}, the model expects {want}")
    with torch.no_grad():
        for name, t in tensors.items():
            t.copy_(state[name])


# Which MoAConfig flags decide that a tensor of this kind exists (matched on its key, first match wins).
_KEY_FLAGS = ((".type_router.", "type_router"), (".router.", "expert_num, expert_router"),
              (".prompt.", "prompt_layers"), (".p_adapter.", "p_adapter_layers"),
              (".lora_magnitude", "lora_variant"), (".pissa_", "lora_init"),
              (".lora_", "lora_targets, lora_layers"))


def _deciding_flags(keys: list[str]) -> str:
    """`" (flags that decide these keys: ...)"` for the keys that differ, or "" for unknown keys."""
    flags = []
    for key in keys:
        flags += [f for part, f in _KEY_FLAGS if part in f".{key}"][:1]
    flags = list(dict.fromkeys(flags))
    return f" (the flags that decide these keys: {'; '.join(flags)})" if flags else ""


def pissa_as_plain_lora(cfg: MoAConfig, state: dict[str, torch.Tensor]) -> tuple[MoAConfig, dict[str, torch.Tensor]]:
    """A PiSSA adapter (`--lora_init pissa*`: trained A, B and the starting A0, B0 per site) as the plain
    LoRA of the same delta, PEFT's conversion: `A' = [A; A0]` (2r, in), `B' = [B, -B0]` (out, 2r),
    rank 2r and alpha 2 alpha (sqrt(2) alpha with rsLoRA), so the scale and `s B' A'` are unchanged.
    Other adapters are returned as they are."""
    if cfg.lora_init == "default":
        return cfg, state
    out = {k: v for k, v in state.items() if not k.endswith((".pissa_A0", ".pissa_B0"))}
    for key in [k for k in state if k.endswith(".pissa_A0")]:
        site = key.removesuffix(".pissa_A0")
        out[f"{site}.lora_A"] = torch.cat([state[f"{site}.lora_A"], state[key]])
        out[f"{site}.lora_B"] = torch.cat([state[f"{site}.lora_B"], -state[f"{site}.pissa_B0"]], dim=1)
    alpha = cfg.lora_alpha * (2 ** 0.5 if cfg.use_rslora else 2.0)
    return dataclasses.replace(cfg, lora_init="default", lora_rank=2 * cfg.lora_rank, lora_alpha=alpha), out


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every plain LoRA into its frozen weight (`W += s B A`; DoRA: `W = g * (W + s B A)`, g the
    magnitude over the row norm) and return the model.

    Each `LoRALinear` becomes a plain `nn.Linear` holding the same (updated) weight under the same
    key (so its tensors are no longer adapter tensors), and `model.moa_config` gets `lora_layers="0-0"`
    so that saved remaining adapters (prompt, parallel adapter) rebuild correctly. Refused with a
    `ValueError` for mixtures (`--expert_num > 1`) and for a type router other than `none`, whose
    weights depend on the input and cannot live in a fixed matrix, and for a LoRA on K or V in a
    layer with a prompt (the prompt reads the frozen wk/wv, which merging would change).
    """
    cfg = moa_config(model, required=False)
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
    with torch.no_grad():
        for name, site in sites:
            site.weight.copy_(site.merged_weight())
            plain = nn.Linear(site.in_features, site.out_features, bias=site.bias is not None, device="meta")
            plain.weight = site.weight
            plain.bias = site.bias
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, plain)
    for block in model.modules():
        if isinstance(block, MoABlock):
            block.moa_sites = {s: m for s, m in block.moa_sites.items() if not isinstance(m, LoRALinear)}
    model.moa_config = dataclasses.replace(cfg, lora_layers="0-0")
    return model
