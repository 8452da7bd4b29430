"""The paper's trainable-parameter table at the LLaMA-3.1-8B shape, built on the meta device.

Reference: the MoA paper's table (millions, 2 decimals), derived in DESIGN §1; tolerance: exact
to the printed 2 decimals.
"""
import pytest
import torch

from llama import ModelArgs, Transformer
from moa import MoAConfig, attach_adapters, count_adapter_parameters

LLAMA31_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                  ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
LORA8 = dict(lora_layers="0-32", lora_rank=8, lora_alpha=8, lora_targets="Q,K,V,O,FFN_DOWN")
SEED = dict(LORA8, hydra_moe=True, expert_num=1, p_adapter_layers="0-32", p_adapter_size=16,
            p_adapter_hydra=True, prompt_layers="0-32", prompt_len=10, swi_x=4)  # the paper's seed command
NONE = dict(type_router="none")  # single-method baselines have no type router

TABLE = {
    "soft_moa_math": (SEED, 24.52),
    "soft_moa_commonsense": (dict(SEED, swi_x=0), 18.09),
    "sparse_moa": (dict(SEED, prompt_layers="0-0", type_router="sparse"), 22.29),
    "lora_r16": (dict(LORA8, lora_rank=16, lora_alpha=16, **NONE), 23.07),
    "lora_r8": (dict(LORA8, **NONE), 11.53),
    "hydralora_e8": (dict(LORA8, expert_num=8, hydra_moe=True, **NONE), 45.09),
    "molora_e8": (dict(LORA8, expert_num=8, **NONE), 100.14),
    "top2_e8": (dict(LORA8, expert_num=8, expert_router="topk", top_k=2, **NONE), 100.14),
    "adamole_e8": (dict(LORA8, expert_num=8, expert_router="adamole", **NONE), 101.12),
    "unipeft": (dict(SEED, p_adapter_hydra=False, type_router="unipeft"), 17.57),
    "parallel_adapter": (dict(p_adapter_layers="0-32", p_adapter_size=16, **NONE), 4.33),
    "prompt": (dict(prompt_layers="0-32", prompt_len=10, **NONE), 1.31),
}


@pytest.mark.parametrize("name", list(TABLE))
def test_trainable_params_match_paper_table_8b_meta_2decimals(name):
    flags, millions = TABLE[name]
    with torch.device("meta"):
        model = Transformer(ModelArgs(**LLAMA31_8B))
    assert model.args.ffn_hidden_dim == 14336
    attach_adapters(model, MoAConfig(**flags))
    assert round(count_adapter_parameters(model) / 1e6, 2) == millions
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.moa_adapter_names)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_soft_moa_math_breakdown_exact():
    """24,520,288 = LoRA 11,534,336 + parallel adapter 4,325,888 + prompt 1,311,744 + routers 7,348,320."""
    with torch.device("meta"):
        model = Transformer(ModelArgs(**LLAMA31_8B))
    attach_adapters(model, MoAConfig(**SEED))
    parts = {"lora_": 0, "p_adapter": 0, "prompt": 0, "type_router": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            parts[next(k for k in parts if k in name)] += p.numel()
    assert parts == {"lora_": 11_534_336, "p_adapter": 4_325_888, "prompt": 1_311_744, "type_router": 7_348_320}
