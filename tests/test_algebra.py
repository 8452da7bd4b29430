"""moa/lora/algebra.py: merge into a base dir (reference: the unmerged adapter, rel <= 1e-5 fp32), SVD
extraction (a known rank-r delta, known singular values), combine (reference: PEFT's
add_weighted_adapter on the same LoRAs exported with moa/lora/peft.py, rel <= 1e-5)."""
from __future__ import annotations

import pytest
import torch

from llama.checkpoint import load_model, load_params, load_state_dict
from moa import MoAConfig, attach_adapters, save_adapter
from moa.files.adapters import write_adapter_files
from moa.lora.algebra import extract_lora_svd, kept_energy, lora_delta, merge_into_base, read_plain_lora
from moa.lora.combine import COMBINE_METHODS, combine
from moa.lora.peft import export_peft, from_peft_state
from tests.helpers import make_lora_adapter, rel, write_meta_model_dir
from tests.hf_reference import hf_twin

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

ALL_TARGETS = "Q,K,V,O,FFN_GATE,FFN_UP,FFN_DOWN"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("algebra") / "base"
    write_meta_model_dir(d, seed=2)
    return d


def make_adapter(base_dir, path, targets=ALL_TARGETS, **kwargs):
    """A LoRA on the tiny base with random non-zero B (tests/helpers.make_lora_adapter)."""
    return make_lora_adapter(base_dir, path, targets=targets, **kwargs)


def tokens():
    return torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(4))


# ---- merge ----------------------------------------------------------------------------------------

def test_merged_base_matches_unmerged_adapter_fp32_rtol1em5(base_dir, tmp_path):
    ours = make_adapter(base_dir, tmp_path / "ad" / "adapter.pth")
    out = merge_into_base(base_dir, tmp_path / "ad", tmp_path / "merged")
    merged, _ = load_model(out)
    base, _ = load_model(base_dir)
    assert (out / "tokenizer.model").read_bytes() == (base_dir / "tokenizer.model").read_bytes()
    t = tokens()
    with torch.no_grad():
        expected = ours(t)
        assert rel(expected, base(t)) > 1e-3
        assert rel(merged(t), expected) <= 1e-5


def test_merge_keeps_base_dtype_bf16_values_match_fp32_fold_rtol4em3(tmp_path):
    """Reference: W + B A * alpha / r computed in fp32 from the bf16 base and the adapter file."""
    base = tmp_path / "bf16"
    write_meta_model_dir(base, dtype=torch.bfloat16, seed=3)
    make_adapter(base, tmp_path / "ad" / "adapter.pth")
    out = merge_into_base(base, tmp_path / "ad" / "adapter.pth", tmp_path / "merged")
    sd = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    assert load_params(out) == load_params(base)
    cfg, lora = read_plain_lora(tmp_path / "ad")
    before = load_state_dict(base, dtype=torch.float32)
    for key, t in sd.items():
        site = key.removesuffix(".weight")
        if f"{site}.lora_A" in lora:
            expected = before[key] + lora_delta(cfg, lora, site)
            assert rel(t.float(), expected) <= 4e-3, key
            assert rel(t.float(), before[key]) > 1e-3, key  # the fold is visible at bf16 precision
        else:
            assert torch.equal(t.float(), before[key]), key


def test_merge_training_files_max_seq_len_and_base_trained_fp32_rtol1em5(base_dir, tmp_path):
    """The files of extract_adapter_from_checkpoint.py: adapter_params.json with the training max_seq_len,
    base_trained.pth (--w_bias True) with trained norms. Reference: the unmerged adapter on a base whose
    norms were replaced by hand. Export/combine refuse it: a LoRA cannot carry the norms."""
    import json

    ours = make_adapter(base_dir, tmp_path / "ad" / "adapter.pth")
    params_path = tmp_path / "ad" / "adapter_params.json"
    params_path.write_text(json.dumps({**json.loads(params_path.read_text()), "max_seq_len": 64}))
    assert read_plain_lora(tmp_path / "ad")[0].lora_rank == 4
    norm = "layers.1.ffn_norm.weight"
    trained = {norm: 1.5 + 0.1 * torch.randn(64, generator=torch.Generator().manual_seed(2))}
    torch.save(trained, tmp_path / "ad" / "base_trained.pth")
    with torch.no_grad():
        ours.get_parameter(norm).copy_(trained[norm])
    merged, _ = load_model(merge_into_base(base_dir, tmp_path / "ad", tmp_path / "merged"))
    t = tokens()
    with torch.no_grad():
        assert rel(merged(t), ours(t)) <= 1e-5
    assert torch.equal(merged.get_parameter(norm), trained[norm])
    with pytest.raises(ValueError, match="base_trained.pth beside it"):
        read_plain_lora(tmp_path / "ad")


def test_merge_existing_out_dir_fileexistserror_before_work(base_dir, tmp_path):
    make_adapter(base_dir, tmp_path / "ad" / "adapter.pth")
    (tmp_path / "merged").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        merge_into_base(base_dir, tmp_path / "ad", tmp_path / "merged")
    assert list((tmp_path / "merged").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


@pytest.mark.parametrize("flags, reason", [
    ({"expert_num": 2}, "expert_num 2"),
    ({"type_router": "soft"}, "type_router soft"),
    ({"prompt_layers": "0-1"}, "prompt"),
    ({"p_adapter_layers": "0-1"}, "parallel adapter"),
])
def test_merge_refuses_mixture_router_prompt_p_adapter_valueerror(base_dir, tmp_path, flags, reason):
    make_adapter(base_dir, tmp_path / "ad" / "adapter.pth", **flags)
    with pytest.raises(ValueError, match=reason):
        merge_into_base(base_dir, tmp_path / "ad", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("change, detail", [({"dim": 32}, "shape"), ({"n_kv_heads": 4}, "attention.wk.lora_B"),
                                            ({"n_layers": 1}, "--lora_layers")])
def test_merge_wrong_base_valueerror(base_dir, tmp_path, change, detail):
    make_adapter(base_dir, tmp_path / "ad" / "adapter.pth")
    other = tmp_path / "other"
    write_meta_model_dir(other, params={**load_params(base_dir), **change})
    with pytest.raises(ValueError, match="does not fit the base model") as err:
        merge_into_base(other, tmp_path / "ad", tmp_path / "merged")
    assert detail in str(err.value)
    assert not (tmp_path / "merged").exists()


# ---- SVD extraction -------------------------------------------------------------------------------

def test_extract_recovers_known_rank_delta_and_energy_fp32_rtol1em5(base_dir, tmp_path):
    """Reference: deltas U diag(s) V^T built with known orthonormal U, V and singular values s that
    differ per layer and site, so the report must key each energy to its own layer and site."""
    sd = load_state_dict(base_dir)
    known = {}  # site -> its singular values, descending
    g = torch.Generator().manual_seed(7)
    for i in range(2):
        for j, proj in enumerate(("attention.wv", "feed_forward.w2")):
            site, w = f"layers.{i}.{proj}", sd[f"layers.{i}.{proj}.weight"]
            values = 0.02 * torch.tensor([4.0, 3.0, 2.0, 1.0]) ** (1 + i + 2 * j)
            u, _ = torch.linalg.qr(torch.randn(w.shape[0], 4, generator=g))
            v, _ = torch.linalg.qr(torch.randn(w.shape[1], 4, generator=g))
            sd[f"{site}.weight"] = w + (u * values) @ v.t()
            known[site] = values
    tuned = tmp_path / "tuned"
    write_meta_model_dir(tuned, sd=sd)

    cfg, state, report = extract_lora_svd(base_dir, tuned, rank=4, targets="V,FFN_DOWN")
    assert cfg.lora_alpha == 4.0 and cfg.lora_rank == 4 and report.other_changed == []
    assert report.kept_energy.keys() == known.keys()
    assert all(e == pytest.approx(1.0, abs=1e-6) for e in report.kept_energy.values())
    for site, values in known.items():
        assert torch.allclose(report.singular_values[site][:4], values, rtol=1e-4)
    write_adapter_files(tmp_path / "ex", cfg, state)
    merged = merge_into_base(base_dir, tmp_path / "ex", tmp_path / "merged")
    t = tokens()
    with torch.no_grad():
        assert rel(load_model(merged)[0](t), load_model(tuned)[0](t)) <= 1e-5

    _, _, low = extract_lora_svd(base_dir, tuned, rank=2, targets="V,FFN_DOWN")
    for site, values in known.items():
        expected = float((values[:2] ** 2).sum() / (values ** 2).sum())
        assert low.kept_energy[site] == pytest.approx(expected, rel=1e-5), site
        assert kept_energy(low.singular_values[site], 3) == pytest.approx(
            float((values[:3] ** 2).sum() / (values ** 2).sum()), rel=1e-5), site


def test_extract_errors_valueerror(base_dir, tmp_path):
    other = tmp_path / "other"
    write_meta_model_dir(other, params={**load_params(base_dir), "n_kv_heads": 4})
    with pytest.raises(ValueError, match=r"not a fine-tune of .*n_kv_heads"):
        extract_lora_svd(base_dir, other, rank=2)
    with pytest.raises(ValueError, match="--rank 40 exceeds min"):
        extract_lora_svd(base_dir, base_dir, rank=40, targets="K")  # wk: (32, 64)
    with pytest.raises(ValueError, match="--rank: expected a positive integer"):
        extract_lora_svd(base_dir, base_dir, rank=0)
    with pytest.raises(ValueError, match="--lora_targets"):
        extract_lora_svd(base_dir, base_dir, rank=2, targets="Q,X")
    with pytest.raises(FileNotFoundError):
        extract_lora_svd(base_dir, tmp_path / "missing", rank=2)


# ---- combine vs PEFT ------------------------------------------------------------------------------

def peft_combined(base_dir, tmp_path, adapter_dirs, weights, method, density=None, rank=None):
    """PEFT's add_weighted_adapter on our adapters (exported), read back into our layout."""
    peft = pytest.importorskip("peft")
    params = load_params(base_dir)
    peft_dirs = [export_peft(d, tmp_path / f"peft{i}", params) for i, d in enumerate(adapter_dirs)]
    base, _ = load_model(base_dir)
    model = peft.PeftModel.from_pretrained(hf_twin(base), str(peft_dirs[0]), adapter_name="a0")
    for i, d in enumerate(peft_dirs[1:], 1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(len(peft_dirs))], weights, "merged",
                               combination_type=method, density=density, svd_rank=rank)
    return peft.get_peft_model_state_dict(model, adapter_name="merged")


def deltas(state):
    return {k[:-len(".lora_A")]: state[k[:-1] + "B"] @ state[k] for k in state if k.endswith("lora_A")}


@pytest.mark.parametrize("method", [m for m in COMBINE_METHODS if not m.startswith("dare")])
def test_combine_matches_peft_add_weighted_adapter_fp32_rtol1em5(base_dir, tmp_path, method):
    equal_rank = method in ("linear", "ties", "magnitude_prune")
    dirs = [tmp_path / "ad0", tmp_path / "ad1"]
    make_adapter(base_dir, dirs[0] / "adapter.pth", rank=4, alpha=8.0, seed=0)
    make_adapter(base_dir, dirs[1] / "adapter.pth", rank=4 if equal_rank else 2, alpha=16.0, seed=1)
    weights, density = [0.7, -0.4], 0.5
    rank = 3 if method.endswith("svd") else None
    cfg, ours = combine([read_plain_lora(d) for d in dirs], weights, method, density=density, rank=rank)
    theirs = from_peft_state(cfg, peft_combined(base_dir, tmp_path, dirs, weights, method, density, rank),
                             load_model(base_dir)[0].args)
    assert cfg.lora_alpha == cfg.lora_rank == {"cat": 6, "linear": 4, "ties": 4, "magnitude_prune": 4}.get(method, 3)
    if method.endswith("svd"):  # factors are unique only up to signs: compare the products
        ours, theirs = deltas(ours), deltas(theirs)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert rel(ours[k], theirs[k]) <= 1e-5, k


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_combine_dare_matches_peft_same_seed_fp32_rtol1em5(base_dir, tmp_path, method, monkeypatch):
    """PEFT draws DARE masks from the global RNG after initialising the new adapter; reseeding right
    there makes its draws those of our seeded generator (same order: site by site, the A's then the
    B's). Targets without Q/K: PEFT masks their B (or delta) rows in transformers' rotary order."""
    import peft.tuners.lora.model as lora_model

    freeze = lora_model._freeze_adapter
    monkeypatch.setattr(lora_model, "_freeze_adapter", lambda m, name: (freeze(m, name), torch.manual_seed(11)))
    targets = "V,O,FFN_GATE,FFN_UP,FFN_DOWN"
    dirs = [tmp_path / "ad0", tmp_path / "ad1"]
    make_adapter(base_dir, dirs[0] / "adapter.pth", targets=targets, seed=0)
    make_adapter(base_dir, dirs[1] / "adapter.pth", targets=targets, alpha=4.0, seed=1)
    weights = [0.6, 0.9]
    cfg, ours = combine([read_plain_lora(d) for d in dirs], weights, method, density=0.5, seed=11)
    theirs = from_peft_state(cfg, peft_combined(base_dir, tmp_path, dirs, weights, method, 0.5),
                             load_model(base_dir)[0].args)
    if method.endswith("svd"):
        ours, theirs = deltas(ours), deltas(theirs)
    for k in ours:
        assert rel(ours[k], theirs[k]) <= 1e-5, k


def test_combine_errors_valueerror(base_dir, tmp_path):
    make_adapter(base_dir, tmp_path / "a" / "adapter.pth", rank=4)
    make_adapter(base_dir, tmp_path / "b" / "adapter.pth", rank=2)
    make_adapter(base_dir, tmp_path / "c" / "adapter.pth", targets="Q,V")
    a, b, c = (read_plain_lora(tmp_path / n) for n in "abc")
    with pytest.raises(ValueError, match="equal rank"):
        combine([a, b], [1.0, 1.0], "linear")
    with pytest.raises(ValueError, match="same layers and targets"):
        combine([a, c], [1.0, 1.0], "cat")
    with pytest.raises(ValueError, match="--density"):
        combine([a, a], [1.0, 1.0], "ties")
    with pytest.raises(ValueError, match="--weights"):
        combine([a, a], [1.0], "cat")
    with pytest.raises(ValueError, match="--method"):
        combine([a, a], [1.0, 1.0], "average")
    other = tmp_path / "other"
    write_meta_model_dir(other, params={**load_params(base_dir), "dim": 32})
    make_adapter(other, tmp_path / "d" / "adapter.pth", rank=4)
    with pytest.raises(ValueError, match="different base models"):
        combine([a, read_plain_lora(tmp_path / "d")], [1.0, 1.0], "cat")
    model, _ = load_model(base_dir)
    attach_adapters(model, MoAConfig(lora_layers="0-2", expert_num=2, type_router="none"))
    save_adapter(model, str(tmp_path / "mix" / "adapter.pth"))
    with pytest.raises(ValueError, match="not a plain LoRA.*expert_num 2"):
        read_plain_lora(tmp_path / "mix")


def test_cli_subcommands_cat_halves_equal_original_merge_fp32_rtol1em5(base_dir, tmp_path, capsys):
    from scripts.lora_tools import main

    make_adapter(base_dir, tmp_path / "ad" / "adapter.pth")
    ad, base = str(tmp_path / "ad"), str(base_dir)
    main(["combine", "--adapters", ad, ad, "--weights", "0.5", "0.5", "--method", "cat",
          "--out", str(tmp_path / "cat")])
    main(["merge", "--base", base, "--adapter", ad, "--out", str(tmp_path / "m1")])
    main(["merge", "--base", base, "--adapter", str(tmp_path / "cat"), "--out", str(tmp_path / "m2")])
    main(["extract", "--base", base, "--tuned", str(tmp_path / "m1"), "--rank", "4", "--targets", "Q,FFN_DOWN",
          "--out", str(tmp_path / "ex" / "adapter.pth")])
    main(["export-peft", "--adapter", ad, "--base", base, "--out", str(tmp_path / "peft")])
    main(["import-peft", "--peft", str(tmp_path / "peft"), "--base", base, "--out", str(tmp_path / "back")])
    printed = capsys.readouterr().out
    assert "| 0 | 1.0000 | 1.0000 |" in printed and "| 1 | 1.0000 | 1.0000 |" in printed  # layer | Q | FFN_DOWN
    assert "| target | r=1 | r=2 | r=4 |" in printed
    assert "not captured" in printed  # K, V, ... also changed
    m1, m2 = load_state_dict(tmp_path / "m1"), load_state_dict(tmp_path / "m2")
    assert all(rel(m2[k], m1[k]) <= 1e-5 for k in m1)
    assert read_plain_lora(tmp_path / "cat")[0].lora_rank == 8
    assert (tmp_path / "back" / "adapter.pth").is_file() and (tmp_path / "ex" / "adapter_params.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["merge", "--base", "{base}", "--adapter", "{mix}", "--out", "{tmp}/m"], "not a plain LoRA"),
    (["merge", "--base", "{base}", "--adapter", "{tmp}/nothing", "--out", "{tmp}/m"], "does not exist"),
    (["extract", "--base", "{base}", "--tuned", "{base}", "--rank", "40", "--targets", "K", "--out", "{tmp}/e"],
     "--rank 40 exceeds"),
    (["combine", "--adapters", "{mix}", "--weights", "1", "--method", "cat", "--out", "{tmp}/c"], "expert_num 2"),
    (["export-peft", "--adapter", "{mix}", "--base", "{base}", "--out", "{tmp}/p"], "expert_num 2"),
    (["import-peft", "--peft", "{tmp}", "--base", "{base}", "--out", "{tmp}/i"], "adapter_config.json"),
])
def test_cli_errors_exit_1_with_message_no_traceback(base_dir, tmp_path, capsys, argv, message):
    from scripts.lora_tools import main

    model, _ = load_model(base_dir)
    attach_adapters(model, MoAConfig(lora_layers="0-2", expert_num=2, type_router="none"))
    save_adapter(model, str(tmp_path / "mix" / "adapter.pth"))
    argv = [a.format(base=base_dir, mix=tmp_path / "mix", tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 1
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"lora_tools {argv[0]}: error: ") and message in stderr
    assert "Traceback" not in stderr


def test_energy_tables_hand_worked():
    """Site 0: s = (4, 3), rank 1 keeps 16/25 = 0.64; site 1: s = (1, 0) keeps all; mean 0.82, min 0.64."""
    from moa.lora.algebra import ExtractReport, energy_tables

    values = {"layers.0.attention.wq": torch.tensor([4.0, 3.0]), "layers.1.attention.wq": torch.tensor([1.0, 0.0])}
    report = ExtractReport({"layers.0.attention.wq": 0.64, "layers.1.attention.wq": 1.0}, values, [])
    assert energy_tables(report, 1, [1, 2]).splitlines() == [
        "kept energy at rank 1, per layer and target:", "",
        "| layer | Q |", "|---|---|", "| 0 | 0.6400 |", "| 1 | 1.0000 |", "",
        "kept energy by rank, mean over layers [min]:", "",
        "| target | r=1 | r=2 |", "|---|---|---|", "| Q | 0.8200 [0.6400] | 1.0000 [1.0000] |"]
