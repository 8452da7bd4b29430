"""The methods of the paper's tables as named flag sets, defined once (docs/method.md: every baseline is
a configuration of the one implementation).

`scripts/methods.sh` (the run scripts' `method_flags NAME N_LAYERS`), `scripts/reproduce.py`, the
benchmarks, the tests and the methods table of README.md and docs/method.md (between the
`methods-table` markers; a test keeps it equal to `methods_table()`) all read `PRESETS`.

    python -m moa.method.presets soft_moa 32     # the adapter flags, on one line
    python -m moa.method.presets --list          # the names
    python -m moa.method.presets --table         # the Markdown methods table (the 8B shape on the meta device)

A preset is an ordered list of (flag, value) pairs; `EVERY_LAYER` stands for the span of all
`n_layers` blocks (`0-n_layers`). `preset_flags` writes them as command-line flags in that order,
`preset_config` builds the `MoAConfig` that main_finetune.py builds from those flags.
"""
from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from moa.method.config import MoAConfig


class _EveryLayer:
    """The span value `0-{n_layers}`: every block of the model (shown as `L` in the methods table)."""

    def __repr__(self) -> str:
        return "L"


EVERY_LAYER = _EveryLayer()
Value = Union[str, int, float, bool, _EveryLayer]

# The LLaMA-3.1-8B shape (llama.ModelArgs) at which the methods table counts trainable parameters.
LLAMA31_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                  ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)


@dataclass(frozen=True)
class Preset:
    """One method: its name (`run_math.sh --method NAME`), what it is, and its flags in order."""

    name: str
    description: str
    flags: tuple[tuple[str, Value], ...]

    def flag_values(self, n_layers: int) -> list[tuple[str, Value]]:
        """(flag, value) pairs with `EVERY_LAYER` replaced by the span `0-{n_layers}`."""
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 0:
            raise ValueError(f"n_layers: expected an integer >= 0, got {n_layers!r}")
        return [(flag, f"0-{n_layers}" if value is EVERY_LAYER else value) for flag, value in self.flags]

    def config(self, n_layers: int) -> MoAConfig:
        """The `MoAConfig` of this method over all `n_layers` blocks."""
        return MoAConfig(**dict(self.flag_values(n_layers)))


# Building blocks, in the order the flags are written.
_LORA8 = (("lora_layers", EVERY_LAYER), ("lora_rank", 8), ("lora_alpha", 8), ("lora_targets", "Q,K,V,O,FFN_DOWN"))
# The LoRA and parallel-adapter types of Soft MoA (with one expert per type the hydra flags change nothing).
_MOA_TYPES = _LORA8 + (("expert_num", 1), ("hydra_moe", True), ("p_adapter_layers", EVERY_LAYER),
                       ("p_adapter_size", 16), ("p_adapter_hydra", True))
_PROMPT10 = (("prompt_layers", EVERY_LAYER), ("prompt_len", 10))
_P_ADAPTER16 = (("p_adapter_layers", EVERY_LAYER), ("p_adapter_size", 16))
_NO_TYPE_ROUTER = (("type_router", "none"),)  # a single-method baseline: its type is not weighed
_E8 = (("expert_num", 8),)

_PRESETS = (
    Preset("soft_moa", "Soft MoA, the paper's math setting (the MoA paper's main method): 7 types per block "
           "(LoRA r8 on Q,K,V,O,FFN_DOWN, parallel adapter 16, prompt 10), each weighed per token by a sigmoid "
           "SwiGLU type router",
           _MOA_TYPES + _PROMPT10 + (("swi_x", 4), ("type_router", "soft"))),
    Preset("soft_moa_cs", "Soft MoA, the paper's commonsense setting: as soft_moa with a linear type router",
           _MOA_TYPES + _PROMPT10 + (("swi_x", 0), ("type_router", "soft"))),
    Preset("sparse_moa", "Sparse MoA (the MoA paper): soft_moa's LoRA and parallel-adapter types (no prompt); a "
           "token runs only the types whose weight clears a learned threshold",
           _MOA_TYPES + (("swi_x", 4), ("type_router", "sparse"), ("max_threshold", 0.5))),
    Preset("instance_moa", "instance-level MoA: soft_moa's types, one weight per type per sequence (the type router "
           "reads the mean of the block input over the sequence)",
           _MOA_TYPES + _PROMPT10 + (("swi_x", 4), ("type_router", "instance"))),
    Preset("unipeft", "UniPEFT (UniPELT, Mao et al. 2022): LoRA r8, parallel adapter 16 and prompt 10, each "
           "kind behind its own sigmoid gate per block",
           _LORA8 + _P_ADAPTER16 + _PROMPT10 + (("type_router", "unipeft"),)),
    Preset("lora", "LoRA (Hu et al. 2022), r8 alpha 8 on Q,K,V,O,FFN_DOWN",
           _LORA8 + _NO_TYPE_ROUTER),
    Preset("lora_r16", "LoRA r16 alpha 16 on Q,K,V,O,FFN_DOWN (about Soft MoA's parameter count)",
           (("lora_layers", EVERY_LAYER), ("lora_rank", 16), ("lora_alpha", 16), ("lora_targets", "Q,K,V,O,FFN_DOWN"))
           + _NO_TYPE_ROUTER),
    Preset("hydralora", "HydraLoRA (Tian et al. 2024): per site one shared A and 8 heads B, softmax router",
           _LORA8 + _E8 + (("hydra_moe", True),) + _NO_TYPE_ROUTER),
    Preset("molora", "MoLoRA (Zadouri et al. 2024): 8 full LoRAs r8 per site mixed by a softmax router",
           _LORA8 + _E8 + _NO_TYPE_ROUTER),
    Preset("topk", "top-k MoE-LoRA: 8 LoRAs r8 per site, the top 2 router weights per token kept and "
           "renormalised",
           _LORA8 + _E8 + (("expert_router", "topk"), ("top_k", 2)) + _NO_TYPE_ROUTER),
    Preset("adamole", "AdaMoLE (Liu and Luo 2024): 8 LoRAs r8 per site, a learned per-token threshold decides "
           "which run",
           _LORA8 + _E8 + (("expert_router", "adamole"),) + _NO_TYPE_ROUTER),
    Preset("p_adapter", "parallel adapter (He et al. 2022): bottleneck 16 beside every FFN",
           _P_ADAPTER16 + _NO_TYPE_ROUTER),
    Preset("prompt", "prompt (LLaMA-Adapter's zero-gated prompt, Zhang et al. 2024): 10 vectors per block",
           _PROMPT10 + _NO_TYPE_ROUTER),
)
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name is a `ValueError` listing the known ones."""
    preset = PRESETS.get(name)
    if preset is None:
        raise ValueError(f"unknown method {name!r}; known: {' '.join(PRESETS)}")
    return preset


def preset_config(name: str, n_layers: int) -> MoAConfig:
    """The `MoAConfig` of method `name` over all `n_layers` blocks."""
    return get_preset(name).config(n_layers)


def _text(value: Value) -> str:
    return repr(value) if value is EVERY_LAYER else str(value)  # True -> 'True' (str2bool), 8 -> '8', 0.5 -> '0.5'


def preset_flags(name: str, n_layers: int) -> list[str]:
    """The command-line flags of method `name` (`['--lora_layers', '0-32', ...]`), in the preset's order."""
    return [x for flag, value in get_preset(name).flag_values(n_layers) for x in (f"--{flag}", _text(value))]


@functools.lru_cache(maxsize=None)
def count_params_8b(name: str) -> int:
    """Trainable adapter parameters of method `name` at the LLaMA-3.1-8B shape (built on the meta device)."""
    import torch

    from llama.model import ModelArgs, Transformer
    from moa.method.inject import attach_adapters, count_adapter_parameters

    with torch.device("meta"):
        model = Transformer(ModelArgs(**LLAMA31_8B))
    attach_adapters(model, preset_config(name, LLAMA31_8B["n_layers"]))
    return count_adapter_parameters(model)


def methods_table(names: Optional[Sequence[str]] = None) -> str:
    """The Markdown table of the methods (all, or `names`): name, what it is, flags (`L` = every block),
    trainable parameters at the LLaMA-3.1-8B shape in millions."""
    lines = ["| `--method` | what | flags (`L` = every block, `0-32` on the 8B model) | trainable params at 8B |",
             "|---|---|---|---|"]
    for name in names or PRESETS:
        preset = get_preset(name)
        flags = " ".join(f"--{flag} {_text(value)}" for flag, value in preset.flags)
        lines.append(f"| `{name}` | {preset.description} | `{flags}` | {count_params_8b(name) / 1e6:.2f}M |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moa.method.presets",
                                description="print the adapter flags of a method of the paper's tables")
    p.add_argument("name", nargs="?", help=f"one of: {' '.join(PRESETS)}")
    p.add_argument("n_layers", nargs="?", type=int, help="blocks of the base model (every block is adapted)")
    p.add_argument("--list", action="store_true", help="print the method names, one per line")
    p.add_argument("--table", action="store_true", help="print the Markdown methods table (8B parameter counts)")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(PRESETS))
        return 0
    if args.table:
        print(methods_table())
        return 0
    if args.name is None or args.n_layers is None:
        p.error("expected NAME N_LAYERS (or --list, --table)")
    try:
        print(" ".join(preset_flags(args.name, args.n_layers)))
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
