"""Heterogeneous Mixture-of-Adapters on a frozen llama `Transformer` (DESIGN §1).

    from moa import MoAConfig, attach_adapters, collect_aux_loss
    model = attach_adapters(model, MoAConfig(lora_layers="0-32", prompt_layers="0-32", swi_x=4))
    loss = task_loss + collect_aux_loss(model)   # zero unless --lb_loss_coeff > 0 with mixtures

State: `adapter_state_dict` / `load_adapter_state_dict` (strict, keys = module paths),
`save_adapter` / `load_adapter` (adapter.pth + adapter_params.json), `merge_lora` (plain LoRA only).
Statistics: `with RouterStats(model) as stats: model(...)`, then `stats.summary()`.
"""
from moa.config import MoAConfig
from moa.inject import attach_adapters, count_adapter_parameters, reset_adapter_parameters
from moa.routers import collect_aux_loss
from moa.state import (adapter_state_dict, load_adapter, load_adapter_state_dict, merge_lora,
                       save_adapter)
from moa.stats import RouterStats

__all__ = [
    "MoAConfig",
    "attach_adapters",
    "reset_adapter_parameters",
    "count_adapter_parameters",
    "collect_aux_loss",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "save_adapter",
    "load_adapter",
    "merge_lora",
    "RouterStats",
]
