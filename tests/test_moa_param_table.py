"""The paper's trainable-parameter table at the LLaMA-3.1-8B shape, built on the meta device.

Reference: the MoA paper's table (millions, 2 decimals), derived in docs/method.md; tolerance: exact
to the printed 2 decimals.
"""
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

import main_finetune
from llama import ModelArgs, Transformer
from moa import MoAConfig, attach_adapters, count_adapter_parameters
from moa.method.presets import LLAMA31_8B, PRESETS, methods_table, preset_config, preset_flags

REPO = Path(__file__).resolve().parent.parent

# test name -> (preset of moa/method/presets.py, the paper's millions)
TABLE = {
    "soft_moa_math": ("soft_moa", 24.52),  # the paper's Soft MoA command
    "soft_moa_commonsense": ("soft_moa_cs", 18.09),
    "sparse_moa": ("sparse_moa", 22.29),
    "lora_r16": ("lora_r16", 23.07),
    "lora_r8": ("lora", 11.53),
    "hydralora_e8": ("hydralora", 45.09),
    "molora_e8": ("molora", 100.14),
    "top2_e8": ("topk", 100.14),
    "adamole_e8": ("adamole", 101.12),
    "unipeft": ("unipeft", 17.57),
    "parallel_adapter": ("p_adapter", 4.33),
    "prompt": ("prompt", 1.31),
}


@pytest.mark.parametrize("name", list(TABLE))
def test_trainable_params_match_paper_table_8b_meta_2decimals(name):
    preset, millions = TABLE[name]
    with torch.device("meta"):
        model = Transformer(ModelArgs(**LLAMA31_8B))
    assert model.args.ffn_hidden_dim == 14336
    attach_adapters(model, preset_config(preset, LLAMA31_8B["n_layers"]))
    assert round(count_adapter_parameters(model) / 1e6, 2) == millions
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.moa_adapter_names)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_soft_moa_math_breakdown_exact():
    """24,520,288 = LoRA 11,534,336 + parallel adapter 4,325,888 + prompt 1,311,744 + routers 7,348,320."""
    with torch.device("meta"):
        model = Transformer(ModelArgs(**LLAMA31_8B))
    attach_adapters(model, preset_config("soft_moa", LLAMA31_8B["n_layers"]))
    parts = {"lora_": 0, "p_adapter": 0, "prompt": 0, "type_router": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            parts[next(k for k in parts if k in name)] += p.numel()
    assert parts == {"lora_": 11_534_336, "p_adapter": 4_325_888, "prompt": 1_311_744, "type_router": 7_348_320}


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("n_layers", [30, 32])
def test_preset_flags_parsed_by_main_finetune_give_preset_config(name, n_layers):
    args = main_finetune.build_parser().parse_args(["--llama_path", "m", "--data_path", "d",
                                                     *preset_flags(name, n_layers)])
    fields = set(MoAConfig.__dataclass_fields__)
    assert MoAConfig(**{k: v for k, v in vars(args).items() if k in fields}) == preset_config(name, n_layers)


def test_methods_sh_prints_preset_flags():
    out = subprocess.run(["bash", "-c", "source scripts/methods.sh; method_flags soft_moa 32"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert shlex.split(out) == preset_flags("soft_moa", 32)
    assert out == " ".join(preset_flags("soft_moa", 32)) + "\n"


def test_methods_sh_unknown_name_exit_2_lists_names():
    r = subprocess.run(["bash", "-c", "source scripts/methods.sh; method_flags soft_moe 32"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert "unknown method 'soft_moe'" in r.stderr and all(name in r.stderr for name in PRESETS)


def test_unknown_preset_is_value_error_listing_names():
    with pytest.raises(ValueError, match="unknown method 'soft_moe'; known: soft_moa soft_moa_cs"):
        preset_config("soft_moe", 32)
    with pytest.raises(ValueError, match="known: .*prompt"):
        preset_flags("soft_moe", 32)


@pytest.mark.parametrize("page", ["README.md", "docs/method.md"])
def test_methods_table_of_the_docs_is_the_rendered_one(page):
    """The methods table between the page's markers is `python -m moa.method.presets --table`."""
    text = (REPO / page).read_text()
    assert text.count("<!-- methods-table:start -->\n") == 1 and text.count("<!-- methods-table:end -->") == 1
    table = text.split("<!-- methods-table:start -->\n")[1].split("<!-- methods-table:end -->")[0]
    assert table.strip() == methods_table()
