"""The single seam: `attach_adapters` turns a llama `Transformer` into a MoA model in place.

Nothing is copied: each adapted projection becomes a `LoRALinear` holding the same frozen weight
tensor under the same key (`layers.N.attention.wq.weight`), and adapted blocks, attentions and
FFNs switch their class to a subclass (`MoABlock`, `MoAAttention`, `MoAFeedForward`) that keeps
every existing submodule and adds the adapter ones. Base checkpoints therefore load unchanged.

Adapter keys (module paths): `layers.N.attention.wq.lora_A|lora_B|router.*`,
`layers.N.attention.prompt.vectors|gate|router.*`, `layers.N.feed_forward.p_adapter.*`,
`layers.N.type_router.*` (`proj` or `w1|w2|w3`, `threshold`, `gates.lora|prompt|p_adapter`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from llama.model import Attention, FeedForward, ForwardMeta, Transformer, TransformerBlock
from moa.adapters import LoRALinear, ParallelAdapter, PromptExpert, add_routed
from moa.config import LORA_TARGETS, MoAConfig
from moa.routers import BlockRouter


class MoAAttention(Attention):
    """Attention plus the prompt expert's contribution, added before `wo` (`self.prompt`)."""

    prompt: PromptExpert

    def forward(self, x: torch.Tensor, meta: ForwardMeta) -> torch.Tensor:
        q, k, v = self.qkv(x, meta)
        out = self.attend(q, k, v, meta)  # (B, T, H*hd)
        return self.wo(out + self.prompt(x, q, self.wk, self.wv))


class MoAFeedForward(FeedForward):
    """SwiGLU FFN plus the parallel adapter on the same input u = ffn_norm(h) (`self.p_adapter`)."""

    p_adapter: ParallelAdapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_routed(super().forward(x), x, self.p_adapter.delta, self.p_adapter.route)


class MoABlock(TransformerBlock):
    """A block whose type router (`self.type_router`) reads the block input x once per forward and
    hands every site (`self.moa_sites`: slot name -> module) its `Route` for the duration of that
    forward only, so activation checkpointing's recomputation routes again identically."""

    type_router: BlockRouter
    moa_sites: dict[str, nn.Module]

    def forward(self, x: torch.Tensor, meta: ForwardMeta) -> torch.Tensor:
        routes = self.type_router(x, meta.token_mask, meta.start_pos, self.attention.cache is not None)
        for slot, site in self.moa_sites.items():
            site.route = routes[slot]
        try:
            return super().forward(x, meta)
        finally:
            for site in self.moa_sites.values():
                site.route = None


def _swap_class(module: nn.Module, base: type, subclass: type) -> None:
    if type(module) is not base:
        raise ValueError(f"attach_adapters: expected a plain {base.__name__}, found {type(module).__name__}")
    module.__class__ = subclass


def attach_adapters(model: Transformer, cfg: MoAConfig, dtype: Optional[torch.dtype] = None) -> Transformer:
    """Add the adapters described by `cfg` to `model` in place and return it.

    Adapters are created on the base weights' device (`meta` included, for counting) in `dtype`
    (fp32 unless given), independent of the base dtype. Afterwards exactly the adapter parameters
    (routers and thresholds included) have `requires_grad=True`; their names are in
    `model.moa_adapter_names` and the config in `model.moa_config`. A span past the model's layers
    is a `ValueError` naming the flag. Attaching twice is a `ValueError`.
    """
    if getattr(model, "moa_config", None) is not None:
        raise ValueError("attach_adapters: this model already has adapters attached")
    dtype = torch.float32 if dtype is None else dtype
    args = model.args
    n = args.n_layers
    lora_layers, prompt_layers = cfg.layers("lora_layers", n), cfg.layers("prompt_layers", n)
    p_adapter_layers = cfg.layers("p_adapter_layers", n)
    mixture = "lora" if cfg.expert_num == 1 else ("hydra" if cfg.hydra_moe else "molora")
    targets = [t for t in LORA_TARGETS if t in cfg.target_list]  # canonical slot order, not the flag's

    base_ids = {id(p) for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for i, block in enumerate(model.layers):
        sites: dict[str, nn.Module] = {}
        device = block.attention.wq.weight.device
        if i in lora_layers:
            for target in targets:
                slot, path = LORA_TARGETS[target]
                parent_name, name = path.split(".")
                parent = getattr(block, parent_name)
                site = LoRALinear(getattr(parent, name), cfg, mixture, dtype)
                setattr(parent, name, site)
                sites[slot] = site
        if i in prompt_layers:
            _swap_class(block.attention, Attention, MoAAttention)
            block.attention.prompt = PromptExpert(args.dim, args.n_heads, args.n_kv_heads, cfg, device, dtype)
            sites["prompt"] = block.attention.prompt
        if i in p_adapter_layers:
            _swap_class(block.feed_forward, FeedForward, MoAFeedForward)
            block.feed_forward.p_adapter = ParallelAdapter(args.dim, cfg, device, dtype)
            sites["p_adapter"] = block.feed_forward.p_adapter
        if sites:
            _swap_class(block, TransformerBlock, MoABlock)
            block.type_router = BlockRouter(i, args.dim, tuple(sites), cfg, device, dtype)
            block.moa_sites = sites
    model.moa_adapter_names = tuple(name for name, p in model.named_parameters() if id(p) not in base_ids)
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) not in base_ids)
    model.moa_config = cfg
    return model


def reset_adapter_parameters(model: Transformer) -> None:
    """Re-initialise every adapter tensor as at creation (DESIGN §1), e.g. after `to_empty()` of a
    model attached on the meta device. Frozen base weights are never touched."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.reset_lora_parameters()
        elif isinstance(module, (ParallelAdapter, PromptExpert, BlockRouter)):
            module.reset_parameters()


def count_adapter_parameters(model: nn.Module) -> int:
    """Number of trainable (requires_grad) parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
