"""moa/lora/peft.py against PEFT itself (peft.PeftModel on transformers' LLaMA, tests/hf_reference.py):
export -> PeftModel.from_pretrained and get_peft_model -> save -> import give our logits (rel <= 1e-4, fp32)."""
from __future__ import annotations

import json

import pytest
import torch

from llama.checkpoint import load_model, load_params
from moa import MoAConfig, attach_adapters, load_adapter, save_adapter
from moa.lora.peft import export_peft, halves_to_interleaved, import_peft, interleaved_to_halves
from tests.helpers import make_lora_adapter, rel, write_meta_model_dir
from tests.hf_reference import hf_twin, interleaved_to_half_split

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

peft = pytest.importorskip("peft")

ALL_TARGETS = "Q,K,V,O,FFN_GATE,FFN_UP,FFN_DOWN"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("peft") / "base"
    write_meta_model_dir(d, seed=1)
    return d


def make_adapter(base_dir, path, targets=ALL_TARGETS, **kwargs):
    """A LoRA on the tiny base with random non-zero B (tests/helpers.make_lora_adapter)."""
    return make_lora_adapter(base_dir, path, targets=targets, **kwargs)


def peft_model_random_b(base, config, seed: int):
    """PEFT's LoRA `config` on transformers' twin of `base`, with B ~ 0.05 N(0, 1) (so it changes the logits)."""
    hf = peft.get_peft_model(hf_twin(base), config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return hf


def tokens():
    return torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))


def test_rotary_row_permutation_matches_hf_reference_exact():
    w = torch.randn(4 * 16, 5)
    assert torch.equal(interleaved_to_halves(w, 4), interleaved_to_half_split(w, 4))
    assert torch.equal(halves_to_interleaved(interleaved_to_halves(w, 4), 4), w)


@pytest.mark.parametrize("lora_layers", ["0-2", "1-2"])
def test_export_loads_in_peft_logits_match_fp32_rtol1em4(base_dir, tmp_path, lora_layers):
    ours = make_adapter(base_dir, tmp_path / "ad" / "adapter.pth", lora_layers=lora_layers)
    out = export_peft(tmp_path / "ad", tmp_path / "peft", load_params(base_dir))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    base, _ = load_model(base_dir)
    hf = peft.PeftModel.from_pretrained(hf_twin(base), str(out)).eval()
    t = tokens()
    with torch.no_grad():
        expected = ours(t)
        got = hf(t).logits
        plain = base(t)
    assert rel(expected, plain) > 1e-3  # the adapter changes the logits
    assert rel(got, expected) <= 1e-4


def test_adapter_trained_here_export_peft_logits_match_fp32_rtol1em4(base_dir, tmp_path):
    """A LoRA trained here (AdamW steps on next-token loss from the zero-B init, so A and B both move)
    -> export -> peft.PeftModel on transformers' LLaMA: same logits."""
    ours, _ = load_model(base_dir)
    attach_adapters(ours, MoAConfig(lora_layers="0-2", lora_rank=4, lora_alpha=8.0, lora_targets=ALL_TARGETS,
                                    type_router="none"))
    torch.manual_seed(0)
    init = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    data = torch.randint(0, 512, (4, 17), generator=torch.Generator().manual_seed(9))
    for _ in range(5):
        logits = ours(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(not torch.equal(p, init[n]) for n, p in ours.named_parameters() if n in init)
    save_adapter(ours, str(tmp_path / "ad" / "adapter.pth"))
    out = export_peft(tmp_path / "ad", tmp_path / "peft", load_params(base_dir))
    base, _ = load_model(base_dir)
    hf = peft.PeftModel.from_pretrained(hf_twin(base), str(out)).eval()
    t = tokens()
    with torch.no_grad():
        expected, plain = ours(t), base(t)
        got = hf(t).logits
    assert rel(expected, plain) > 1e-3
    assert rel(got, expected) <= 1e-4


@pytest.mark.parametrize("use_rslora", [False, True])
def test_import_peft_lora_logits_match_fp32_rtol1em4(base_dir, tmp_path, use_rslora):
    base, _ = load_model(base_dir)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                             "gate_proj", "up_proj", "down_proj"], use_rslora=use_rslora, lora_dropout=0.0)
    hf = peft_model_random_b(base, config, seed=5)
    hf.save_pretrained(str(tmp_path / "peft"))
    path = import_peft(tmp_path / "peft", tmp_path / "ours", load_params(base_dir))
    assert path.name == "adapter.pth"
    ours = load_adapter(base, str(path))
    t = tokens()
    with torch.no_grad():
        assert rel(ours(t), hf(t).logits) <= 1e-4


def test_export_import_roundtrip_exact(base_dir, tmp_path):
    make_adapter(base_dir, tmp_path / "ad" / "adapter.pth", lora_layers="1-2", targets="Q,K,FFN_DOWN")
    params = load_params(base_dir)
    export_peft(tmp_path / "ad", tmp_path / "peft", params)
    back = import_peft(tmp_path / "peft", tmp_path / "back" / "adapter.pth", params)
    first = torch.load(tmp_path / "ad" / "adapter.pth", weights_only=True)
    second = torch.load(back, weights_only=True)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((back.parent / "adapter_params.json").read_text()) == \
        json.loads((tmp_path / "ad" / "adapter_params.json").read_text())


def test_errors_wrong_base_mixture_and_ragged_peft_valueerror(base_dir, tmp_path):
    make_adapter(base_dir, tmp_path / "ad" / "adapter.pth")
    other = dict(load_params(base_dir), dim=32)
    with pytest.raises(ValueError, match="base model expects"):
        export_peft(tmp_path / "ad", tmp_path / "peft", other)
    export_peft(tmp_path / "ad", tmp_path / "peft_ok", load_params(base_dir))
    with pytest.raises(ValueError, match="base model expects"):
        import_peft(tmp_path / "peft_ok", tmp_path / "wrong_base", other)
    config_path = tmp_path / "peft_ok" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        import_peft(tmp_path / "peft_ok", tmp_path / "dora", load_params(base_dir))
    model, _ = load_model(base_dir)
    attach_adapters(model, MoAConfig(lora_layers="0-2", expert_num=2, type_router="none"))
    save_adapter(model, str(tmp_path / "mix" / "adapter.pth"))
    with pytest.raises(ValueError, match="expert_num 2"):
        export_peft(tmp_path / "mix", tmp_path / "peft2", load_params(base_dir))
    base, _ = load_model(base_dir)
    ragged_modules = r".*0\.self_attn\.q_proj|.*1\.mlp\.down_proj"  # Q in layer 0, FFN_DOWN in layer 1
    ragged = peft.get_peft_model(hf_twin(base), peft.LoraConfig(r=2, target_modules=ragged_modules))
    ragged.save_pretrained(str(tmp_path / "ragged"))
    with pytest.raises(ValueError, match="layers x targets"):
        import_peft(tmp_path / "ragged", tmp_path / "r_out", load_params(base_dir))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_import_peft_rank_and_alpha_patterns_logits_match_fp32_rtol1em4(base_dir, tmp_path, use_rslora):
    """Per-module ranks and alphas (PEFT's own patterns) import exactly: our logits equal PeftModel's."""
    base, _ = load_model(base_dir)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"v_proj": 3},
                             use_rslora=use_rslora, lora_dropout=0.0)
    hf = peft_model_random_b(base, config, seed=6)
    assert hf.base_model.model.model.layers[1].mlp.down_proj.lora_A["default"].weight.shape[0] == 6
    hf.save_pretrained(str(tmp_path / "peft"))
    path = import_peft(tmp_path / "peft", tmp_path / "ours", load_params(base_dir))
    ours = load_adapter(base, str(path))
    t = tokens()
    with torch.no_grad():
        assert rel(ours(t), hf(t).logits) <= 1e-4


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq"])
def test_import_peft_refuses_base_changing_inits(base_dir, tmp_path, init):
    make_adapter(base_dir, tmp_path / "ad" / "adapter.pth")
    export_peft(tmp_path / "ad", tmp_path / "peft", load_params(base_dir))
    config_path = tmp_path / "peft" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "init_lora_weights": init}))
    with pytest.raises(ValueError, match=f"init_lora_weights = '{init}'.*changed the base"):
        import_peft(tmp_path / "peft", tmp_path / "out", load_params(base_dir))
    assert not (tmp_path / "out").exists()
