"""Adapter state (keys, strict load, files), LoRA merging, router statistics and the load-balance loss.

References: the unmerged model (merge, rel 1e-5), the saved model (round trip, exact), formulas
written here (statistics, load-balance loss, rel 1e-6).
"""
import math

import pytest
import torch

from llama import ModelArgs, Transformer
from moa import (
    MoAConfig,
    RouterStats,
    adapter_state_dict,
    attach_adapters,
    collect_aux_loss,
    load_adapter,
    load_adapter_state_dict,
    merge_lora,
    save_adapter,
)
from tests.helpers import rel

TINY = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64)
SOFT = dict(lora_layers="0-3", lora_rank=4, p_adapter_layers="0-3", p_adapter_size=8, prompt_layers="1-3",
            prompt_len=3, swi_x=4)


def bare_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**TINY))


def moa_model(flags, seed=0):
    model = attach_adapters(bare_model(seed), MoAConfig(**flags))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name in model.moa_adapter_names:
            p = model.get_parameter(name)
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def tokens(bsz=2, seqlen=10, seed=1):
    return torch.randint(0, TINY["vocab_size"], (bsz, seqlen), generator=torch.Generator().manual_seed(seed))


def test_adapter_state_keys_are_module_paths_without_base_exact():
    model = moa_model(dict(SOFT, expert_num=2, type_router="sparse"))
    keys = set(adapter_state_dict(model))
    assert {"layers.0.attention.wq.lora_A", "layers.0.attention.wq.lora_B", "layers.0.attention.wq.router.proj.weight",
            "layers.1.attention.prompt.vectors", "layers.1.attention.prompt.gate",
            "layers.0.feed_forward.p_adapter.down", "layers.0.feed_forward.p_adapter.up_bias",
            "layers.0.type_router.w1.weight", "layers.0.type_router.threshold.bias"} <= keys
    assert "layers.0.attention.prompt.vectors" not in keys  # prompt only in 1-3
    assert keys == set(model.moa_adapter_names) and not keys & set(bare_model().state_dict())


@pytest.mark.parametrize("flags", [SOFT, dict(SOFT, expert_num=3, expert_router="adamole", type_router="unipeft")])
def test_save_load_round_trip_identical_logits_exact(flags, tmp_path):
    model = moa_model(flags, seed=0)
    path = tmp_path / "out" / "adapter.pth"
    save_adapter(model, str(path))
    assert sorted(p.name for p in path.parent.iterdir()) == ["adapter.pth", "adapter_params.json"]
    loaded = load_adapter(bare_model(seed=0), str(path))  # attaches from adapter_params.json
    toks = tokens()
    assert torch.equal(loaded(toks), model(toks))
    other = moa_model(flags, seed=5)  # another base: the same adapters must give other logits
    load_adapter_state_dict(other, adapter_state_dict(model))
    assert not torch.equal(other(toks), model(toks))
    same_base = attach_adapters(bare_model(seed=0), MoAConfig(**flags))
    load_adapter_state_dict(same_base, torch.load(str(path), weights_only=True))
    assert torch.equal(same_base(toks), model(toks))


def test_load_adapter_reads_extracted_params_with_training_max_seq_len_exact(tmp_path):
    """extract_adapter_from_checkpoint.py adds the training max_seq_len to adapter_params.json: not a flag."""
    import json

    from moa.files.adapters import read_adapter_params

    model = moa_model(SOFT)
    path = tmp_path / "adapter.pth"
    save_adapter(model, str(path))
    params_path = tmp_path / "adapter_params.json"
    params_path.write_text(json.dumps({**json.loads(params_path.read_text()), "max_seq_len": 300}))
    assert read_adapter_params(params_path) == (MoAConfig(**SOFT), 300)
    toks = tokens()
    assert torch.equal(load_adapter(bare_model(), str(path))(toks), model(toks))
    params_path.write_text(json.dumps({**json.loads(params_path.read_text()), "max_seq_len": "long"}))
    with pytest.raises(ValueError, match="adapter_params.json: max_seq_len must be an integer"):
        read_adapter_params(params_path)


def test_strict_load_names_missing_unexpected_and_misshapen_keys():
    model = moa_model(SOFT)
    state = dict(adapter_state_dict(model))
    missing = dict(state)
    del missing["layers.2.attention.wo.lora_B"]
    with pytest.raises(ValueError, match=r"missing keys \['layers.2.attention.wo.lora_B'\]"):
        load_adapter_state_dict(model, missing)
    with pytest.raises(ValueError, match="unexpected keys.*layers.9.extra"):
        load_adapter_state_dict(model, dict(state, **{"layers.9.extra": torch.zeros(1)}))
    with pytest.raises(ValueError, match="layers.0.attention.wq.lora_A has shape"):
        load_adapter_state_dict(model, dict(state, **{"layers.0.attention.wq.lora_A": torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match="attach_adapters"):
        adapter_state_dict(bare_model())


def test_load_adapter_refuses_different_flags(tmp_path):
    model = moa_model(SOFT)
    save_adapter(model, str(tmp_path / "adapter.pth"))
    with pytest.raises(ValueError, match="swi_x"):
        load_adapter(attach_adapters(bare_model(), MoAConfig(**dict(SOFT, swi_x=0))), str(tmp_path / "adapter.pth"))


@pytest.mark.parametrize("flags", [
    dict(lora_layers="0-3", lora_targets="Q,K,V,O,FFN_UP,FFN_GATE,FFN_DOWN", lora_alpha=16, type_router="none"),
    dict(lora_layers="0-2", lora_targets="Q,O,FFN_DOWN", prompt_layers="1-3", p_adapter_layers="0-3",
         type_router="none"),
])
def test_merged_lora_equals_unmerged_rel1e_5(flags):
    model = moa_model(flags)
    toks = tokens()
    before = model(toks)
    n_before = len(model.moa_adapter_names)
    wq = model.layers[0].attention.wq.weight
    merge_lora(model)
    assert model.layers[0].attention.wq.weight is wq  # folded in place, same tensor and key
    assert type(model.layers[0].attention.wq) is torch.nn.Linear
    assert not any("lora_" in n for n in model.moa_adapter_names) and len(model.moa_adapter_names) < n_before
    assert set(adapter_state_dict(model)) == set(model.moa_adapter_names)
    assert model.moa_config.lora_layers == "0-0"
    assert rel(model(toks), before) <= 1e-5


@pytest.mark.parametrize("flags,match", [
    (dict(lora_layers="0-3", expert_num=2, type_router="none"), "molora mixture"),
    (dict(lora_layers="0-3", expert_num=2, hydra_moe=True, type_router="none"), "hydra mixture"),
    (dict(lora_layers="0-3", type_router="soft"), "type_router soft"),
    (dict(lora_layers="0-3", lora_targets="Q,V", prompt_layers="2-3", type_router="none"), "layers.2.attention.wv"),
])
def test_merge_refuses_mixtures_and_routed_lora_with_message(flags, match):
    with pytest.raises(ValueError, match=match):
        merge_lora(moa_model(flags))


def test_router_stats_match_recomputed_weights_and_active_share_rel1e_6():
    model = moa_model(dict(SOFT, type_router="sparse"))
    toks = tokens(bsz=3, seqlen=12)
    mask = torch.ones_like(toks, dtype=torch.bool)
    mask[2, 8:] = False
    captured = {}
    blk = model.layers[1]
    hook = blk.register_forward_pre_hook(lambda mod, args: None if "x" in captured else captured.update(x=args[0]))
    with RouterStats(model) as stats:
        model(toks, token_mask=mask)
        model(toks, token_mask=mask)  # accumulates: same means
    hook.remove()
    router = blk.type_router
    with torch.no_grad():
        w = torch.sigmoid(router._logits(captured["x"]))[mask]  # (n_real, n_types)
        t = torch.sigmoid(router.threshold(captured["x"]))[mask] * 0.5
    summary = stats.summary()
    assert sorted(summary) == [0, 1, 2]
    assert list(summary[1]) == list(router.slots) == ["lora.wq", "lora.wk", "lora.wv", "lora.wo", "lora.w2",
                                                      "prompt", "p_adapter"]
    for slot, j in router.col.items():
        assert summary[1][slot]["tokens"] == 2 * int(mask.sum())
        assert abs(summary[1][slot]["weight"] - w[:, j].mean().item()) <= 1e-6
        assert abs(summary[1][slot]["active"] - (w[:, j] > t[:, 0]).float().mean().item()) <= 1e-6
    tables = stats.tables()
    assert tables["layers"] == [0, 1, 2] and set(tables["slots"]) == set(router.slots)
    assert math.isnan(tables["weight"][0][tables["slots"].index("prompt")])  # layer 0 has no prompt
    model(toks)  # outside the with block: nothing recorded
    assert stats.summary() == summary


def test_router_stats_none_router_reports_weight_one_exact():
    model = moa_model(dict(lora_layers="0-3", type_router="none"))
    with RouterStats(model) as stats:
        model(tokens())
    assert all(v == {"weight": 1.0, "active": 1.0, "tokens": 20} for layer in stats.summary().values()
               for v in layer.values())


def test_load_balance_loss_matches_formula_and_ignores_pads_rel1e_6():
    flags = dict(lora_layers="0-1", lora_targets="Q", expert_num=4, expert_router="topk", top_k=2,
                 lb_loss_coeff=0.5, type_router="none")
    model = moa_model(flags)
    site = model.layers[0].attention.wq
    captured = {}
    site.register_forward_pre_hook(lambda mod, args: captured.__setitem__("z", args[0]))
    toks = tokens(bsz=2, seqlen=10)
    mask = torch.ones_like(toks, dtype=torch.bool)
    mask[1, 6:] = False
    model(toks, token_mask=mask)
    aux = collect_aux_loss(model)
    assert collect_aux_loss(model).item() == 0.0  # handed out once
    z = captured["z"][mask]  # real tokens only
    p = (z @ site.router.proj.weight.T + site.router.proj.bias).softmax(-1)  # (n, E)
    f = torch.zeros(4)
    for row in p:
        for e in row.topk(2).indices:
            f[e] += 1.0 / len(p)  # every one of the k selections counts (sum f = k), as the paper's code
    assert rel(aux, 0.5 * 4 * (f * p.mean(0)).sum()) <= 1e-6
    model(toks[:1])  # the unpadded first row alone gives its own (different) value; now pads vs none:
    alone = collect_aux_loss(model)
    model(torch.cat([toks[:1], toks[1:, :3]], 1), token_mask=torch.tensor([[True] * 10 + [False] * 3]))
    assert rel(collect_aux_loss(model), alone) <= 1e-6


def test_aux_loss_zero_without_coefficient_or_mixtures_exact():
    for flags in (dict(lora_layers="0-3", expert_num=3, type_router="none"), SOFT):
        model = moa_model(flags)
        model(tokens())
        assert collect_aux_loss(model).item() == 0.0


def test_meta_attach_then_materialise_and_reset_equals_bare_rel1e_5():
    """FSDP-style: attach on the meta device, to_empty, load the base weights, re-initialise adapters."""
    from moa import reset_adapter_parameters

    bare = bare_model(seed=2)
    with torch.device("meta"):
        model = Transformer(ModelArgs(**TINY))
    attach_adapters(model, MoAConfig(**dict(SOFT, type_router="sparse", expert_num=2)))
    model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(bare.state_dict(), strict=False)
    assert set(missing) == set(model.moa_adapter_names) and not unexpected
    reset_adapter_parameters(model)
    toks = tokens()
    assert rel(model(toks), bare(toks)) <= 1e-5
    assert torch.equal(model.layers[0].attention.wq.weight, bare.layers[0].attention.wq.weight)
