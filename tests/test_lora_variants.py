"""LoRA variants: DoRA (`--lora_variant dora`) and rsLoRA (`--use_rslora True`) against PEFT on
transformers' LLaMA (forward, gradients, export and import), merged weights against the unmerged
model, DoRA under a type router against its dense recomputation, and where DoRA is refused (it does
not mix linearly) or allowed (top-1 routing of a bank). All fp32."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from llama.checkpoint import load_model, load_params
from moa import MoAConfig, attach_adapters, load_adapter, save_adapter
from moa.lora.algebra import read_plain_lora
from moa.lora.combine import combine
from moa.lora.peft import export_peft, halves_to_interleaved, import_peft
from moa.method.experts import LoRALinear
from moa.method.routers import Route, routing
from moa.method.state import merge_lora
from moa.tasks.fusion import attach_bank, load_bank
from tests.helpers import rel, write_meta_model_dir
from tests.hf_reference import hf_twin

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

peft = pytest.importorskip("peft")

TARGETS = "Q,K,V,O,FFN_GATE,FFN_UP,FFN_DOWN"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("variants") / "base"
    write_meta_model_dir(d, seed=2)
    return d


def randomise(model: nn.Module, seed: int) -> None:
    """B ~ 0.05 N(0, 1) and DoRA magnitudes times U(0.5, 1.5): the init (B = 0, m = ||W||) hides errors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif name.endswith("lora_magnitude"):
                p.mul_(0.5 + torch.rand(p.shape, generator=g))


def variant_adapter(base_dir, path, variant="dora", rslora=False, seed=0, **flags):
    model, _ = load_model(base_dir)
    attach_adapters(model, MoAConfig(**{"lora_layers": "0-2", "lora_rank": 4, "lora_alpha": 8.0,
                                        "lora_targets": TARGETS, "type_router": "none", "lora_variant": variant,
                                        "use_rslora": rslora, **flags}))
    randomise(model, seed)
    save_adapter(model, str(path))
    return model


def tokens():
    return torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))


def test_config_scale_and_refusals():
    assert MoAConfig(lora_rank=16, lora_alpha=8.0).lora_scale == 0.5
    assert MoAConfig(lora_rank=16, lora_alpha=8.0, use_rslora=True).lora_scale == 2.0  # 8 / sqrt(16)
    with pytest.raises(ValueError, match="--lora_variant: expected one of"):
        MoAConfig(lora_variant="vera")
    with pytest.raises(ValueError, match="--lora_variant dora.*--expert_num 4"):
        MoAConfig(lora_layers="0-2", lora_variant="dora", expert_num=4)
    # Files written before the flags existed stay as they were.
    assert "lora_variant" not in MoAConfig().to_dict() and "use_rslora" not in MoAConfig().to_dict()
    assert MoAConfig(lora_variant="dora").to_dict()["lora_variant"] == "dora"


@pytest.mark.parametrize("bias", [False, True])
def test_dora_site_forward_and_gradients_equal_peft_fp32(bias):
    torch.manual_seed(0)
    lin = nn.Linear(16, 12, bias=bias)
    cfg = MoAConfig(lora_layers="0-1", lora_rank=4, lora_alpha=8.0, lora_variant="dora", type_router="none")
    site = LoRALinear(copy.deepcopy(lin), cfg)
    assert torch.allclose(site.lora_magnitude, lin.weight.norm(dim=1))  # DoRA's init: m = ||W||
    randomise(site, 1)

    holder = nn.Module()
    holder.q = copy.deepcopy(lin)
    holder.forward = lambda x: holder.q(x)
    hf = peft.get_peft_model(holder, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q"], use_dora=True))
    q = hf.base_model.model.q
    with torch.no_grad():
        q.lora_A["default"].weight.copy_(site.lora_A)
        q.lora_B["default"].weight.copy_(site.lora_B)
        q.lora_magnitude_vector["default"].weight.copy_(site.lora_magnitude)
    x = torch.randn(5, 16)
    ours, theirs = site(x), hf(x)
    assert rel(ours, theirs) <= 1e-6
    (ours ** 2).sum().backward()
    (theirs ** 2).sum().backward()
    for mine, other in ((site.lora_A, q.lora_A["default"].weight), (site.lora_B, q.lora_B["default"].weight),
                        (site.lora_magnitude, q.lora_magnitude_vector["default"].weight)):
        assert rel(mine.grad, other.grad) <= 1e-5
    # The merged weight is the same map.
    with torch.no_grad():
        merged = x @ site.merged_weight().t() + (lin.bias if bias else 0)
    assert rel(merged, ours.detach()) <= 1e-6


@pytest.mark.parametrize("variant,rslora", [("dora", False), ("dora", True), ("lora", True)])
def test_export_peft_logits_equal_peft_and_import_roundtrip_exact(base_dir, tmp_path, variant, rslora):
    ours = variant_adapter(base_dir, tmp_path / "ad" / "adapter.pth", variant, rslora, lora_rank=4,
                           lora_alpha=6.0)
    params = load_params(base_dir)
    out = export_peft(tmp_path / "ad", tmp_path / "peft", params)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] == (variant == "dora") and config["use_rslora"] == rslora
    base, _ = load_model(base_dir)
    hf = peft.PeftModel.from_pretrained(hf_twin(base), str(out)).eval()
    t = tokens()
    with torch.no_grad():
        expected, got, plain = ours(t), hf(t).logits, base(t)
    assert rel(expected, plain) > 1e-3
    assert rel(got, expected) <= 1e-4
    back = import_peft(out, tmp_path / "back" / "adapter.pth", params)
    first, second = torch.load(tmp_path / "ad" / "adapter.pth", weights_only=True), torch.load(back, weights_only=True)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    flags = [json.loads((d / "adapter_params.json").read_text()) for d in (back.parent, tmp_path / "ad")]
    for f in flags:
        f.pop("files")  # the content hash: the tensors are equal, their order in the file is PEFT's
    assert flags[0] == flags[1]


def test_import_peft_dora_trained_by_peft_logits_match(base_dir, tmp_path):
    base, _ = load_model(base_dir)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                             use_dora=True, use_rslora=True, lora_dropout=0.0)
    hf = peft.get_peft_model(hf_twin(base), config).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
    hf.save_pretrained(str(tmp_path / "peft"))
    path = import_peft(tmp_path / "peft", tmp_path / "ours", load_params(base_dir))
    cfg = json.loads((path.parent / "adapter_params.json").read_text())
    assert cfg["lora_variant"] == "dora" and cfg["use_rslora"] is True
    ours = load_adapter(base, str(path))
    t = tokens()
    with torch.no_grad():
        assert rel(ours(t), hf(t).logits) <= 1e-4


def test_merge_dora_equals_unmerged_model(base_dir, tmp_path):
    model = variant_adapter(base_dir, tmp_path / "ad" / "adapter.pth", "dora", rslora=True)
    t = tokens()
    with torch.no_grad():
        expected = model(t)
        got = merge_lora(model)(t)
    assert rel(got, expected) <= 1e-5


def test_dora_under_a_type_router_equals_its_dense_recomputation():
    """A routed DoRA site adds w * ((g - 1) W z + g s B A z); a sparse route (index) gives the selected
    tokens the same and the others the bare projection."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    cfg = MoAConfig(lora_layers="0-1", lora_rank=4, lora_alpha=8.0, lora_variant="dora")
    site = LoRALinear(copy.deepcopy(lin), cfg, slot="lora.wq")
    randomise(site, 2)
    x = torch.randn(2, 3, 16)
    w = torch.rand(2, 3, 1)
    with torch.no_grad():
        g = site.lora_magnitude / (lin.weight + site.lora_weight()).norm(dim=1)
        dora = (g - 1) * (x @ lin.weight.t()) + g * (x @ site.lora_weight().t())
        base = lin(x)
        with routing({"lora.wq": Route(weight=w)}):
            dense = site(x)
        index = torch.tensor([0, 4, 5])
        with routing({"lora.wq": Route(weight=w.reshape(-1, 1)[index], index=index)}):
            sparse = site(x)
    assert rel(dense, base + w * dora) <= 1e-6
    expected = base.clone().reshape(-1, 12)
    expected[index] += (w * dora).reshape(-1, 12)[index]
    assert rel(sparse.reshape(-1, 12), expected) <= 1e-6


def test_dora_refused_where_it_would_be_mixed(base_dir, tmp_path):
    variant_adapter(base_dir, tmp_path / "d" / "adapter.pth", "dora")
    with pytest.raises(ValueError, match="--lora_variant dora: DoRA rescales"):
        read_plain_lora(tmp_path / "d")
    cfg, state = read_plain_lora(tmp_path / "d", dora_ok=True)
    with pytest.raises(ValueError, match="adapter #0.*not linear"):
        combine([(cfg, state), (cfg, state)], [0.5, 0.5], "cat")
    with pytest.raises(ValueError, match="not linear"):
        load_bank(["a"], [tmp_path / "d"])  # LoraHub's and fusion's bank


def test_bank_top1_rows_with_dora_equal_each_adapter_alone_and_refuse_mixing(base_dir, tmp_path):
    variant_adapter(base_dir, tmp_path / "d" / "adapter.pth", "dora", seed=1)
    variant_adapter(base_dir, tmp_path / "p" / "adapter.pth", "lora", rslora=True, seed=2, lora_targets="Q,V")
    bank = attach_bank(load_model(base_dir)[0], load_bank(["d", "p"], [tmp_path / "d", tmp_path / "p"],
                                                          dora_ok=True))
    assert bank.bank.dora_tasks == ["d"]
    t = tokens()
    alone = []
    for name in ("d", "p"):
        model, _ = load_model(base_dir)
        load_adapter(model, str(tmp_path / name / "adapter.pth"))
        with torch.no_grad():
            alone.append(model(t))
    with torch.no_grad(), bank.rows(torch.tensor([[1.0, 0.0], [0.0, 1.0]])):
        got = bank.model(t)
    assert rel(got[0], alone[0][0]) <= 1e-5 and rel(got[1], alone[1][1]) <= 1e-5
    with pytest.raises(ValueError, match="DoRA.*top-1"):
        with torch.no_grad(), bank.rows(torch.tensor([[0.5, 0.5], [0.0, 1.0]])):
            bank.model(t)


HF_PROJ = {"q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv", "o_proj": "attention.wo",
           "gate_proj": "feed_forward.w1", "up_proj": "feed_forward.w3", "down_proj": "feed_forward.w2"}


def test_pissa_site_starts_as_the_base_and_saves_the_rank_2r_delta():
    torch.manual_seed(0)
    lin = nn.Linear(16, 12, bias=False)
    cfg = MoAConfig(lora_layers="0-1", lora_rank=4, lora_alpha=8.0, lora_init="pissa", type_router="none")
    site = LoRALinear(copy.deepcopy(lin), cfg)
    u, s, vh = torch.linalg.svd(lin.weight.detach())
    principal = (u[:, :4] * s[:4]) @ vh[:4]
    assert rel(site.scale * site.pissa_B0 @ site.pissa_A0, principal) <= 1e-5  # W's best rank-r part
    assert torch.equal(site.lora_A, site.pissa_A0) and torch.equal(site.lora_B, site.pissa_B0)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert rel(site(x), lin(x)) <= 1e-6  # starts as the base
    # The randomised SVD (q = r, as PEFT's pissa_niter_N) finds the principal part where the spectrum
    # has a gap, as trained weights do: a rank-4 matrix plus small noise.
    spiky = nn.Linear(16, 12, bias=False)
    with torch.no_grad():
        spiky.weight.copy_(torch.randn(12, 4) @ torch.randn(4, 16) + 0.01 * torch.randn(12, 16))
    u, s, vh = torch.linalg.svd(spiky.weight.detach())
    fast = LoRALinear(spiky, MoAConfig(lora_layers="0-1", lora_rank=4, lora_alpha=8.0, lora_init="pissa_niter_4",
                                       type_router="none"))
    assert rel(fast.scale * fast.pissa_B0 @ fast.pissa_A0, (u[:, :4] * s[:4]) @ vh[:4]) <= 1e-4
    with pytest.raises(ValueError, match="--lora_init.*pissa_niter_N"):
        MoAConfig(lora_init="pissa_niter_0")
    with pytest.raises(ValueError, match="--lora_init pissa.*--expert_num 2"):
        MoAConfig(lora_layers="0-2", lora_init="pissa", expert_num=2)


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_trains_like_peft_and_its_file_is_a_plain_lora_peft_loads(base_dir, tmp_path, rslora):
    """PEFT's PiSSA (base weights replaced by the residual) and ours (base untouched) with the same
    trained A, B give the same logits; our adapter file (rank 2r, plain) exported to PEFT and loaded on
    the untouched base gives them too."""
    targets = ["q_proj", "k_proj", "v_proj", "down_proj"]
    base, _ = load_model(base_dir)
    hf = peft.get_peft_model(hf_twin(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                            init_lora_weights="pissa", use_rslora=rslora)).eval()
    ours, _ = load_model(base_dir)
    attach_adapters(ours, MoAConfig(lora_layers="0-2", lora_rank=4, lora_alpha=8.0, lora_targets="Q,K,V,FFN_DOWN",
                                    type_router="none", lora_init="pissa", use_rslora=rslora))
    t = tokens()
    with torch.no_grad():
        plain = base(t)
        assert rel(ours(t), plain) <= 1e-5 and rel(hf(t).logits, plain) <= 1e-4  # both start as the base
    g = torch.Generator().manual_seed(6)
    heads = {"q_proj": base.args.n_heads, "k_proj": base.args.n_kv_heads}
    with torch.no_grad():  # "training": the same step on both
        for name, p in hf.named_parameters():
            if "lora_" not in name:
                continue
            p.add_(0.05 * torch.randn(p.shape, generator=g))
            layer, proj = int(name.split("layers.")[1].split(".")[0]), name.split(".")[-4]
            site = ours.get_submodule(f"layers.{layer}.{HF_PROJ[proj]}")
            if "lora_A" in name:
                site.lora_A.copy_(p)
            else:
                site.lora_B.copy_(halves_to_interleaved(p, heads[proj]) if proj in heads else p)
        expected = hf(t).logits
        assert rel(expected, plain) > 1e-3
        assert rel(ours(t), expected) <= 1e-4
    path = save_adapter(ours, tmp_path / "pissa" / "adapter.pth")
    cfg, state = read_plain_lora(path)
    assert (cfg.lora_init, cfg.lora_rank, cfg.use_rslora) == ("default", 8, rslora)
    assert not any("pissa" in k for k in state)
    out = export_peft(path, tmp_path / "peft", load_params(base_dir))
    fresh, _ = load_model(base_dir)
    with torch.no_grad():
        assert rel(peft.PeftModel.from_pretrained(hf_twin(fresh), str(out)).eval()(t).logits, expected) <= 1e-4
        assert rel(load_adapter(fresh, str(path))(t), expected) <= 1e-4


def test_pissa_checkpoint_state_keeps_its_start_and_resumes_exactly(base_dir):
    from moa import adapter_state_dict, load_adapter_state_dict

    cfg = MoAConfig(lora_layers="0-2", lora_rank=4, lora_alpha=8.0, lora_targets="Q,FFN_DOWN", type_router="none",
                    lora_init="pissa_niter_2")
    model, _ = load_model(base_dir)
    attach_adapters(model, cfg)
    randomise(model, 3)
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    assert "layers.0.attention.wq.pissa_A0" in state and "layers.0.attention.wq.pissa_B0" in state
    torch.manual_seed(123)  # another random start: the loaded A0, B0 must replace it
    again, _ = load_model(base_dir)
    attach_adapters(again, cfg)
    load_adapter_state_dict(again, state)
    t = tokens()
    with torch.no_grad():
        assert torch.equal(again(t), model(t))
