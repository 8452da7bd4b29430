"""The single seam: `attach_adapters` turns a llama `Transformer` into a MoA model in place.

Nothing is copied: each adapted projection becomes a `LoRALinear` holding the same frozen weight
tensor under the same key (`layers.N.attention.wq.weight`), and the model, adapted blocks, attentions
and FFNs switch their class to a subclass (`MoATransformer`, `MoABlock`, `MoAAttention`,
`MoAFeedForward`) that keeps every existing submodule and adds the adapter ones. Base checkpoints
therefore load unchanged.

Adapter keys (module paths): `layers.N.attention.wq.lora_A|lora_B|router.*`,
`layers.N.attention.prompt.vectors|gate|router.*`, `layers.N.feed_forward.p_adapter.*`,
`layers.N.type_router.*` (`proj` or `w1|w2|w3`, `threshold`, `gates.lora|prompt|p_adapter`).
Which tensors are adapters is declared by the adapter modules themselves (`adapter_params()`).
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn

from llama.model import Attention, FeedForward, ForwardMeta, Transformer, TransformerBlock
from moa.method.config import LORA_TARGETS, P_ADAPTER_SLOT, PROMPT_SLOT, MoAConfig
from moa.method.experts import LoRALinear, ParallelAdapter, PromptExpert, add_routed
from moa.method.routers import BlockRouter, collecting_aux_losses, current_route, set_routes


class MoAAttention(Attention):
    """Attention plus the prompt expert's contribution, added before `wo` (`self.prompt`)."""

    prompt: PromptExpert

    def forward(self, x: torch.Tensor, meta: ForwardMeta) -> torch.Tensor:
        q, k, v = self.qkv(x, meta)
        out = self.attend(q, k, v, meta)  # (B, T, H*hd)
        extra = None if self.cache is None else self.cache.extra
        return self.wo(out + self.prompt(x, q, self.wk, self.wv, extra, meta.continues))


class MoAFeedForward(FeedForward):
    """SwiGLU FFN plus the parallel adapter on the same input u = ffn_norm(h) (`self.p_adapter`)."""

    p_adapter: ParallelAdapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_routed(super().forward(x), x, self.p_adapter.delta, current_route(P_ADAPTER_SLOT),
                          stages=self.p_adapter.stages())


class MoABlock(TransformerBlock):
    """A block whose type router (`self.type_router`) reads the block input x once per forward and
    hands every site (`self.moa_sites`: slot name -> module) its `Route` for the duration of that
    forward only (`set_routes`), so activation checkpointing's recomputation routes again identically."""

    type_router: BlockRouter
    moa_sites: dict[str, nn.Module]

    def forward(self, x: torch.Tensor, meta: ForwardMeta) -> torch.Tensor:
        routes = self.type_router(x, meta.token_mask, meta.continues, self.attention.cache)
        previous = set_routes(routes)
        try:
            return super().forward(x, meta)
        finally:
            set_routes(previous)


class MoATransformer(Transformer):
    """A `Transformer` with adapters attached: `moa_config` holds their flags; each forward collects
    the routers' load-balance terms into `aux_loss` (handed out by `moa.collect_aux_loss`)."""

    moa_config: MoAConfig
    aux_loss: Optional[torch.Tensor]

    @property
    def moa_adapter_names(self) -> tuple[str, ...]:
        return adapter_names(self)

    def hidden_states(self, tokens: torch.Tensor, start_pos: int = 0, token_mask: Optional[torch.Tensor] = None,
                      *, slot: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not torch.is_grad_enabled():  # no router adds a term without autograd (and generation is traced)
            self.aux_loss = None
            return super().hidden_states(tokens, start_pos, token_mask, slot=slot)
        with collecting_aux_losses() as terms:
            h = super().hidden_states(tokens, start_pos, token_mask, slot=slot)
        self.aux_loss = torch.stack(terms).sum() if terms else None
        return h


def _adapter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if hasattr(module, "adapter_params"):
            yield name, module


def adapter_names(model: nn.Module) -> tuple[str, ...]:
    """Module paths of every adapter tensor, in the model's parameter order; never a base weight.
    A `ValueError` for a model without adapters (or a DDP wrapper: pass the unwrapped model)."""
    if moa_config(model, required=False) is None:
        raise ValueError("this model has no adapters: call moa.attach_adapters(model, cfg) first "
                         "(pass the unwrapped Transformer, not a DDP/FSDP wrapper)")
    declared = {f"{prefix}.{name}" for prefix, module in _adapter_modules(model)
                for name, _ in module.adapter_params()}
    return tuple(name for name, _ in model.named_parameters() if name in declared)


def adapter_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module path: tensor} of the fixed tensors the adapter modules declare (`adapter_buffers()`,
    e.g. PiSSA's starting A0, B0): not trained, but part of an adapter's state."""
    return {f"{prefix}.{name}": t for prefix, module in _adapter_modules(model)
            if hasattr(module, "adapter_buffers") for name, t in module.adapter_buffers()}


def moa_config(model: nn.Module, required: bool = True) -> Optional[MoAConfig]:
    """The flags of the adapters attached to `model` (None, or a ValueError when `required`, without)."""
    cfg = getattr(model, "moa_config", None) if isinstance(model, MoATransformer) else None
    if cfg is None and required:
        raise ValueError("this model has no adapters attached (moa.attach_adapters)")
    return cfg


def _swap_class(module: nn.Module, base: type, subclass: type) -> None:
    if type(module) is not base:
        raise ValueError(f"attach_adapters: expected a plain {base.__name__}, found {type(module).__name__}")
    module.__class__ = subclass


def _attach_block(block: TransformerBlock, layer: int, cfg: MoAConfig, args, dtype: torch.dtype,
                  lora: bool, prompt: bool, p_adapter: bool) -> None:
    sites: dict[str, nn.Module] = {}
    device = block.attention.wq.weight.device
    mixture = "lora" if cfg.expert_num == 1 else ("hydra" if cfg.hydra_moe else "molora")
    if lora:
        for target in [t for t in LORA_TARGETS if t in cfg.target_list]:  # canonical slot order
            slot, path = LORA_TARGETS[target]
            parent_name, name = path.split(".")
            parent = getattr(block, parent_name)
            site = LoRALinear(getattr(parent, name), cfg, mixture, dtype, slot=slot)
            setattr(parent, name, site)
            sites[slot] = site
    if prompt:
        _swap_class(block.attention, Attention, MoAAttention)
        block.attention.prompt = PromptExpert(args.dim, args.n_heads, args.n_kv_heads, cfg, device, dtype)
        sites[PROMPT_SLOT] = block.attention.prompt
    if p_adapter:
        _swap_class(block.feed_forward, FeedForward, MoAFeedForward)
        block.feed_forward.p_adapter = ParallelAdapter(args.dim, cfg, device, dtype)
        sites[P_ADAPTER_SLOT] = block.feed_forward.p_adapter
    if sites:
        _swap_class(block, TransformerBlock, MoABlock)
        block.type_router = BlockRouter(layer, args.dim, tuple(sites), cfg, device, dtype)
        block.moa_sites = sites


def attach_adapters(model: Transformer, cfg: MoAConfig, dtype: Optional[torch.dtype] = None) -> Transformer:
    """Add the adapters described by `cfg` to `model` in place and return it.

    Adapters are created on the base weights' device (`meta` included, for counting) in `dtype`
    (fp32 unless given), independent of the base dtype. Afterwards exactly the adapter parameters
    (routers and thresholds included) have `requires_grad=True` (`adapter_names(model)` lists them)
    and `model.moa_config` is `cfg`. A span past the model's layers is a `ValueError` naming the flag.
    Attaching twice is a `ValueError`.
    """
    if isinstance(model, MoATransformer):
        raise ValueError("attach_adapters: this model already has adapters attached")
    n = model.args.n_layers
    lora, prompt, p_adapter = (cfg.layers(flag, n) for flag in ("lora_layers", "prompt_layers", "p_adapter_layers"))
    _swap_class(model, Transformer, MoATransformer)
    for p in model.parameters():
        p.requires_grad_(False)
    for i, block in enumerate(model.layers):
        _attach_block(block, i, cfg, model.args, torch.float32 if dtype is None else dtype,
                      i in lora, i in prompt, i in p_adapter)
    model.moa_config = cfg
    model.aux_loss = None
    for name in adapter_names(model):
        model.get_parameter(name).requires_grad_(True)
    return model


def reset_adapter_parameters(model: Transformer) -> None:
    """Re-initialise every adapter tensor as at creation (docs/method.md), e.g. after `to_empty()` of a
    model attached on the meta device. Frozen base weights are never touched."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.reset_lora_parameters()
        elif isinstance(module, (ParallelAdapter, PromptExpert, BlockRouter)):
            module.reset_parameters()


def count_adapter_parameters(model: nn.Module) -> int:
    """Number of trainable (requires_grad) parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
