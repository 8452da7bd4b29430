"""MoAConfig: flag validation (ValueError naming the flag), layer spans, adapter_params.json round trip."""
import json

import pytest

from llama import ModelArgs, Transformer
from moa import MoAConfig, attach_adapters
from moa.method.config import parse_spans


def test_defaults_switch_every_type_off_exact():
    cfg = MoAConfig()
    for flag in ("lora_layers", "p_adapter_layers", "prompt_layers"):
        assert cfg.layers(flag, 32) == set()
    assert cfg.type_router == "soft" and cfg.expert_router == "soft"
    assert cfg.max_threshold == 0.5 and cfg.lb_loss_coeff == 0.0


def test_spans_end_exclusive_and_multiple_exact():
    cfg = MoAConfig(lora_layers="0-8,24-32", prompt_layers="3-4", p_adapter_layers="0-0")
    assert cfg.layers("lora_layers", 32) == set(range(8)) | set(range(24, 32))
    assert cfg.layers("prompt_layers", 32) == {3}
    assert cfg.layers("p_adapter_layers", 32) == set()
    assert parse_spans("x", " 0 - 2 , 5-6") == [(0, 2), (5, 6)]


@pytest.mark.parametrize("flag,value", [
    ("lora_layers", "0-"), ("lora_layers", "5-2"), ("prompt_layers", "a-b"), ("p_adapter_layers", 3),
    ("lora_targets", "Q,X"), ("lora_targets", "Q,Q"), ("lora_targets", ""),
    ("lora_rank", 0), ("expert_num", 0), ("p_adapter_size", 0), ("prompt_len", 0), ("swi_x", -1),
    ("type_router", "dense"), ("expert_router", "hard"), ("max_threshold", 1.5), ("lb_loss_coeff", -1.0),
    ("hydra_moe", "yes"), ("threshold_ste", 1), ("lora_alpha", "8"),
])
def test_invalid_flag_raises_valueerror_naming_it(flag, value):
    with pytest.raises(ValueError, match=flag):
        MoAConfig(**{flag: value})


def test_top_k_above_expert_num_names_top_k():
    with pytest.raises(ValueError, match="top_k"):
        MoAConfig(expert_num=4, expert_router="topk", top_k=5)


def test_bool_flags_accept_true_false_strings_exact():
    cfg = MoAConfig(hydra_moe="True", threshold_ste="False")
    assert cfg.hydra_moe is True and cfg.threshold_ste is False


def test_targets_normalised_and_list_accepted_exact():
    assert MoAConfig(lora_targets=" Q, FFN_DOWN ").target_list == ["Q", "FFN_DOWN"]
    assert MoAConfig(lora_targets=["K", "V"]).lora_targets == "K,V"


def test_span_out_of_range_at_attach_names_flag():
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=16, multiple_of=16))
    with pytest.raises(ValueError, match="prompt_layers"):
        attach_adapters(model, MoAConfig(prompt_layers="0-3"))
    with pytest.raises(ValueError, match="lora_layers"):
        MoAConfig(lora_layers="0-33").layers("lora_layers", 32)


def test_json_round_trip_exact(tmp_path):
    cfg = MoAConfig(lora_layers="0-8,24-32", lora_rank=16, lora_targets="Q,V,FFN_UP", lora_alpha=32,
                    expert_num=4, hydra_moe=True, p_adapter_layers="0-32", p_adapter_size=8,
                    p_adapter_hydra=True, prompt_layers="2-4", prompt_len=5, swi_x=4, type_router="sparse",
                    expert_router="topk", top_k=3, max_threshold=0.7, const_threshold=True,
                    threshold_ste=True, lb_loss_coeff=0.01)
    path = tmp_path / "adapter_params.json"
    cfg.to_json(str(path))
    assert MoAConfig.from_json(str(path)) == cfg
    assert json.loads(path.read_text())["lora_targets"] == "Q,V,FFN_UP"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_json_unknown_key_and_missing_file_name_them(tmp_path):
    path = tmp_path / "adapter_params.json"
    path.write_text(json.dumps({"lora_rank": 4, "lora_rnak": 8}))
    with pytest.raises(ValueError, match="lora_rnak"):
        MoAConfig.from_json(str(path))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        MoAConfig.from_json(str(tmp_path / "nope.json"))


def test_has_unused_params_only_for_sparse_learned_threshold_without_ste_exact():
    assert MoAConfig(type_router="sparse").has_unused_params
    assert not MoAConfig(type_router="sparse", threshold_ste=True).has_unused_params
    assert not MoAConfig(type_router="sparse", const_threshold=True).has_unused_params
    assert not MoAConfig(type_router="soft").has_unused_params
