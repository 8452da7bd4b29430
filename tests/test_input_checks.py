"""Inputs checked before anything heavy, each refused with one line naming the file, field or flag: a
Hugging Face config.json field of the wrong type or range, a weight stored in a non-float dtype (Meta
shards, safetensors shards), a PiSSA rank above a target's size, a broken PEFT folder, and a task
selector trained on another base."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import main_finetune
from example import main as example_main
from llama.checkpoint import load_model, read_model_args
from llama.hf import converted_tokenizer_files, hf_config, params_from_config, save_hf_dir, to_hf_state_dict
from llama.model import ModelArgs
from llama.tokenizer import load_tokenizer
from moa import MoAConfig
from moa.lora.peft import export_peft
from moa.method.config import check_pissa_rank
from moa.tasks.registry import add_task
from moa.tasks.selector import Selector, SelectorConfig, save_selector
from scripts.lora_tools import main as lora_tools_main
from tests.helpers import (
    TINY_PARAMS,
    TINY_VOCAB,
    make_lora_adapter,
    random_state_dict,
    write_byte_tokenizer,
    write_meta_model_dir,
)
from tests.task_helpers import task_rows, write_rows

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


def write_hf_dir(path: Path, sd: dict | None = None, **config_changes) -> Path:
    """The tiny base as a Hugging Face folder (config.json, model.safetensors, the byte tokenizer's
    tokenizer.json), with `config_changes` written into config.json."""
    pytest.importorskip("tokenizers")
    (path.parent / "tok").mkdir(exist_ok=True)
    write_byte_tokenizer(path.parent / "tok")
    tok = load_tokenizer(path.parent / "tok")
    args = ModelArgs(**TINY_PARAMS)
    sd = random_state_dict(TINY_PARAMS) if sd is None else sd
    config = hf_config(args, tie=False, context=256, dtype=torch.float32, bos_id=None, eos_ids=[0])
    save_hf_dir(path, {**config, **config_changes}, to_hf_state_dict(sd, args, tie=False),
                converted_tokenizer_files(tok, TINY_VOCAB, 256))
    return path


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# ---- 1. config.json fields ------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,expected", [
    ("num_attention_heads", "four", "num_attention_heads: expected an integer >= 1, got 'four' (str)"),
    ("hidden_size", 64.5, "hidden_size: expected an integer >= 1, got 64.5 (float)"),
    ("num_hidden_layers", 0, "num_hidden_layers: expected an integer >= 1, got 0 (int)"),
    ("intermediate_size", "128", "intermediate_size: expected an integer >= 1, got '128' (str)"),
    ("num_key_value_heads", [2], "num_key_value_heads: expected an integer >= 1 or null, got [2] (list)"),
    ("rms_norm_eps", "1e-5", "rms_norm_eps: expected a number > 0, got '1e-5' (str)"),
    ("rope_theta", -1.0, "rope_theta: expected a number > 0, got -1.0 (float)"),
    ("tie_word_embeddings", "false", "tie_word_embeddings: expected true or false, got 'false' (str)"),
    ("max_position_embeddings", "256", "max_position_embeddings: expected an integer >= 1, got '256' (str)"),
    ("rope_scaling", {"rope_type": "llama3", "factor": "x"}, "rope_scaling.factor: expected a number > 0, got 'x'"),
])
def test_hf_config_field_of_the_wrong_type_names_the_file_and_field(field, value, expected):
    config = hf_config(ModelArgs(**TINY_PARAMS), tie=False, context=256, dtype=torch.float32, bos_id=None,
                       eos_ids=[0])
    with pytest.raises(ValueError) as e:
        params_from_config({**config, field: value}, "m/config.json")
    assert str(e.value).startswith(f"m/config.json: {expected}"), str(e.value)


def test_hf_config_error_through_load_model_and_main_finetune(tmp_path, capsys):
    hf = write_hf_dir(tmp_path / "hf", num_attention_heads="four")
    expected = f"{hf / 'config.json'}: num_attention_heads: expected an integer >= 1, got 'four' (str)"
    with pytest.raises(ValueError) as e:
        load_model(hf)
    assert str(e.value) == expected
    data = write_rows(tmp_path / "train.json", task_rows("add", 2))
    out = tmp_path / "out"
    assert main_finetune.main(["--llama_path", str(hf), "--data_path", str(data), "--output_dir", str(out),
                               "--data_root", str(tmp_path), "--num_workers", "0"]) == 2
    assert one_line(capsys.readouterr().err) == f"error: {expected}"
    assert not out.exists()


def test_a_valid_hf_folder_loads_as_before(tmp_path):
    hf = write_hf_dir(tmp_path / "hf")
    args = read_model_args(hf)
    assert (args.dim, args.n_heads, args.n_kv_heads, args.ffn_hidden_dim) == \
        (64, 4, 2, ModelArgs(**TINY_PARAMS).ffn_hidden_dim)
    model, _ = load_model(hf)
    assert model.args.dim == 64


# ---- 2. stored dtypes ---------------------------------------------------------------------------------

def test_meta_shard_with_an_integer_tensor_names_the_shard_tensor_and_dtype(tmp_path):
    base = tmp_path / "base"
    sd = write_meta_model_dir(base)
    torch.save({**sd, "norm.weight": sd["norm.weight"].to(torch.int32)}, base / "consolidated.00.pth")
    with pytest.raises(ValueError) as e:
        load_model(base)
    assert str(e.value) == (f"{base / 'consolidated.00.pth'}: tensor 'norm.weight' is stored as int32; "
                            "expected a floating-point dtype")


def test_model_parallel_shards_name_the_shard_that_holds_the_integer_tensor(tmp_path):
    base = tmp_path / "base"
    write_meta_model_dir(base, n_shards=2)
    shard = torch.load(base / "consolidated.01.pth", weights_only=True)
    shard["layers.1.ffn_norm.weight"] = shard["layers.1.ffn_norm.weight"].to(torch.int64)
    torch.save(shard, base / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth: tensor 'layers\.1\.ffn_norm\.weight' is stored "
                                         r"as int64; expected a floating-point dtype"):
        load_model(base)


def test_safetensors_shard_with_an_integer_tensor_names_the_file(tmp_path):
    sd = random_state_dict(TINY_PARAMS)
    sd["layers.0.attention_norm.weight"] = sd["layers.0.attention_norm.weight"].to(torch.int32)
    hf = write_hf_dir(tmp_path / "hf", sd=sd)
    assert read_model_args(hf).dim == 64  # config.json alone is fine
    with pytest.raises(ValueError) as e:
        load_model(hf)
    assert str(e.value) == (f"{hf / 'model.safetensors'}: tensor 'model.layers.0.input_layernorm.weight' is "
                            "stored as int32; expected a floating-point dtype")


def test_integer_weight_through_example_py_is_one_line(tmp_path, capsys):
    base = tmp_path / "base"
    sd = write_meta_model_dir(base)
    torch.save({**sd, "norm.weight": sd["norm.weight"].to(torch.int32)}, base / "consolidated.00.pth")
    data = write_rows(tmp_path / "test.json", task_rows("add", 1))
    with pytest.raises(SystemExit) as e:
        example_main(["--ckpt_dir", str(base), "--data_path", str(data), "--save_path", str(tmp_path / "p.jsonl"),
                      "--max_gen_len", "2", "--dtype", "float32", "--progress", "False"])
    assert "consolidated.00.pth: tensor 'norm.weight' is stored as int32" in str(e.value)
    assert "\n" not in str(e.value).strip()
    assert not list(tmp_path.glob("p.jsonl*"))


# ---- 3. PiSSA rank against the targets' sizes ---------------------------------------------------------

def test_pissa_rank_above_a_target_size_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, capsys,
                                                                         monkeypatch):
    import moa.train.trainer as trainer

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(trainer, "load_model", no_load)
    data = write_rows(tmp_path / "train.json", task_rows("add", 2))
    out = tmp_path / "out"
    assert main_finetune.main(["--llama_path", str(tiny_model_dir), "--data_path", str(data), "--output_dir",
                               str(out), "--data_root", str(tmp_path), "--num_workers", "0", "--lora_layers", "0-2",
                               "--lora_targets", "Q,K,V", "--lora_rank", "48", "--lora_init", "pissa"]) == 2
    err = one_line(capsys.readouterr().err)
    assert err == ("error: --lora_rank 48 with --lora_init pissa: PiSSA takes the top-r singular vectors of each "
                   "target (out x in), so r can be at most 32 for --lora_targets Q,K,V on this base; too large "
                   "for wk: 32x64, wv: 32x64")
    assert not out.exists()


def test_pissa_rank_limits_follow_the_base_sizes():
    args = ModelArgs(**TINY_PARAMS)  # dim 64, 4 heads of 16, 2 KV heads: wk (32, 64); FFN (hidden, 64)
    check_pissa_rank(MoAConfig(lora_layers="0-2", lora_rank=32, lora_targets="Q,K,V,O", lora_init="pissa"), args)
    check_pissa_rank(MoAConfig(lora_layers="0-2", lora_rank=64, lora_targets="Q,O,FFN_DOWN"), args)  # no PiSSA
    check_pissa_rank(MoAConfig(lora_layers="0-0", lora_rank=64, lora_targets="K", lora_init="pissa"), args)  # no LoRA
    with pytest.raises(ValueError, match=r"--lora_init pissa_niter_2: .* too large for w2: 64x"):
        check_pissa_rank(MoAConfig(lora_layers="0-1", lora_rank=65, lora_targets="FFN_DOWN",
                                   lora_init="pissa_niter_2"), args)


# ---- 4. PEFT folders --------------------------------------------------------------------------------

@pytest.fixture
def peft_dir(tiny_model_dir, tmp_path) -> Path:
    make_lora_adapter(tiny_model_dir, tmp_path / "ad" / "adapter.pth", lora_layers="0-2", targets="Q,V")
    return export_peft(tmp_path / "ad", tmp_path / "peft", dict(json.loads((tiny_model_dir / "params.json").read_text())))


def import_peft_cli(peft: Path, base: Path, out: Path, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        lora_tools_main(["import-peft", "--peft", str(peft), "--base", str(base), "--out", str(out)])
    assert e.value.code == 1
    assert not out.exists()
    return one_line(capsys.readouterr().err)


def test_import_peft_broken_config_names_the_file(peft_dir, tiny_model_dir, tmp_path, capsys):
    (peft_dir / "adapter_config.json").write_text('{\n  "peft_type": "LORA",\n  "r": ,\n}')
    err = import_peft_cli(peft_dir, tiny_model_dir, tmp_path / "out", capsys)
    assert err.startswith(f"lora_tools import-peft: error: {peft_dir / 'adapter_config.json'}: not valid JSON "
                          "(Expecting value: line 3"), err


@pytest.mark.parametrize("field,value,expected", [
    ("r", "eight", "r: expected an integer >= 1, got 'eight' (str)"),
    ("r", None, "missing field 'r'"),
    ("lora_alpha", [8], "lora_alpha: expected a number > 0, got [8] (list)"),
    ("use_rslora", "true", "use_rslora: expected true or false, got 'true' (str)"),
    ("target_modules", 3, "target_modules: expected a list of module names or a pattern, got 3 (int)"),
    ("rank_pattern", {"q_proj": "2"}, "rank_pattern: expected an object of module pattern -> integer >= 1"),
])
def test_import_peft_config_field_of_the_wrong_type(peft_dir, tiny_model_dir, tmp_path, capsys, field, value,
                                                     expected):
    path = peft_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    err = import_peft_cli(peft_dir, tiny_model_dir, tmp_path / "out", capsys)
    assert err.startswith(f"lora_tools import-peft: error: {path}: {expected}"), err


def test_import_peft_weights_missing_or_damaged_name_the_file(peft_dir, tiny_model_dir, tmp_path, capsys):
    weights = peft_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    err = import_peft_cli(peft_dir, tiny_model_dir, tmp_path / "out", capsys)
    assert err.startswith(f"lora_tools import-peft: error: {weights}: not a readable safetensors file"), err
    weights.unlink()
    err = import_peft_cli(peft_dir, tiny_model_dir, tmp_path / "out", capsys)
    assert err.startswith(f"lora_tools import-peft: error: {weights} does not exist, nor adapter_model.bin"), err
    (peft_dir / "adapter_model.bin").write_text("not a torch file")
    err = import_peft_cli(peft_dir, tiny_model_dir, tmp_path / "out", capsys)
    assert err.startswith(f"lora_tools import-peft: error: {peft_dir / 'adapter_model.bin'}"), err


def test_import_peft_reads_adapter_model_bin(peft_dir, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from moa.lora.peft import import_peft

    weights = peft_dir / "adapter_model.safetensors"
    state = load_file(str(weights))
    ref = import_peft(peft_dir, tmp_path / "ref", json.loads((tiny_model_dir / "params.json").read_text()))
    weights.unlink()
    torch.save(state, peft_dir / "adapter_model.bin")
    got = import_peft(peft_dir, tmp_path / "bin", json.loads((tiny_model_dir / "params.json").read_text()))
    a, b = torch.load(ref, weights_only=True), torch.load(got, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- 5. a task selector of another base --------------------------------------------------------------

@pytest.fixture
def registry(tiny_model_dir, tmp_path) -> Path:
    reg = tmp_path / "tasks.json"
    for i, task in enumerate(("add", "pick")):
        adapter = tmp_path / task / "adapter.pth"
        make_lora_adapter(tiny_model_dir, adapter, seed=i)
        add_task(reg, "synthetic", task, adapter, write_rows(tmp_path / task / "train.json", task_rows(task, 4)))
    return reg


def write_selector(path: Path, dim: int, encoder: str = "hidden") -> Path:
    cfg = SelectorConfig(kind="nearest", tasks=["add", "pick"], dim=dim, encoder=encoder)
    sel = Selector(cfg, torch.zeros(dim), torch.ones(dim), keys=torch.randn(2, dim), key_task=torch.tensor([0, 1]))
    return save_selector(sel, path)


@pytest.mark.parametrize("dim,encoder,expected", [
    (576, "hidden", "trained on a base with dim 576, --ckpt_dir {base} has dim 64"),
    (64, "hidden:5", "its encoder hidden:5 reads block 5, --ckpt_dir {base} has 2 blocks (0-1)"),
])
def test_example_selector_of_another_base_is_refused_before_the_model_loads(tiny_model_dir, registry, tmp_path,
                                                                             monkeypatch, dim, encoder, expected):
    import moa.infer.generate as generate

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(generate, "load_model", no_load)
    sel = write_selector(tmp_path / "sel.pt", dim, encoder)
    data = write_rows(tmp_path / "test.json", task_rows("add", 1))
    with pytest.raises(SystemExit) as e:
        example_main(["--ckpt_dir", str(tiny_model_dir), "--data_path", str(data), "--save_path",
                      str(tmp_path / "p.jsonl"), "--adapter_registry", str(registry), "--selector", str(sel),
                      "--max_gen_len", "2", "--dtype", "float32", "--progress", "False"])
    assert str(e.value) == f"example.py: error: --selector {sel}: " + expected.format(base=tiny_model_dir)
    assert not list(tmp_path.glob("p.jsonl*"))


def test_task_routed_model_checks_the_selector_base_before_loading(tiny_model_dir, registry, tmp_path, monkeypatch):
    import moa.tasks.serving as serving

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(serving, "load_model", no_load)
    sel = write_selector(tmp_path / "sel.pt", 576)
    with pytest.raises(ValueError, match=r"--selector .*sel\.pt: trained on a base with dim 576, base_dir .* has dim 64"):
        serving.TaskRoutedModel.load(tiny_model_dir, registry, sel)
