"""Heterogeneous Mixture-of-Adapters on a frozen llama `Transformer` (docs/method.md).

    from moa import MoAConfig, attach_adapters
    model = attach_adapters(model, MoAConfig(lora_layers="0-32", prompt_layers="0-32", swi_x=4))

The packages, one concept each (docs/architecture.md): `moa.method` (the paper's method: config, experts,
routers, the injection seam, in-memory adapter state, router statistics), `moa.files` (adapter and
PEFT files, all-or-none writes), `moa.train`, `moa.infer`, `moa.eval` (scoring, pure Python),
`moa.lora` (merge, SVD extraction, combination), `moa.tasks` (many task adapters on one model).

The public names below are imported on first use (module `__getattr__`), so that `import moa.eval`
pulls in no torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "MoAConfig": "moa.method.config",
    "attach_adapters": "moa.method.inject",
    "reset_adapter_parameters": "moa.method.inject",
    "count_adapter_parameters": "moa.method.inject",
    "adapter_names": "moa.method.inject",
    "collect_aux_loss": "moa.method.routers",
    "adapter_state_dict": "moa.method.state",
    "load_adapter_state_dict": "moa.method.state",
    "merge_lora": "moa.method.state",
    "RouterStats": "moa.method.stats",
    "PRESETS": "moa.method.presets",
    "preset_config": "moa.method.presets",
    "preset_flags": "moa.method.presets",
    "save_adapter": "moa.files.adapters",
    "load_adapter": "moa.files.adapters",
    "load_trained_adapter": "moa.files.adapters",
    "TaskRoutedModel": "moa.tasks.serving",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'moa' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
