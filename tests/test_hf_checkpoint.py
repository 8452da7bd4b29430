"""Hugging Face model folders in and out (llama/hf.py, scripts/export_hf.py), against transformers itself:
a tiny random LlamaForCausalLM saved by `save_pretrained` (sharded) loads with transformers' logits
(fp32, rel <= 1e-5); export -> `from_pretrained` gives ours; SmolLM2 goes through export and back with
equal logits and tokenization; the Multi-LoRAs extraction works on two Hugging Face folders."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from llama.checkpoint import load_model, load_params, load_state_dict  # noqa: E402
from llama.generation import generate  # noqa: E402
from llama.tokenizer import load_tokenizer  # noqa: E402
from moa import MoAConfig, attach_adapters, load_adapter, save_adapter  # noqa: E402
from moa.lora.algebra import extract_lora_svd, lora_delta  # noqa: E402
from scripts.export_hf import export_hf  # noqa: E402
from tests.helpers import make_lora_adapter, rel, write_meta_model_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

VOCAB = 320
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["Hello, world! It's 2024-06-01.", "  tabs\tand\nnewlines  ", "caf\u00e9 \u4f60\u597d 12345",
         "a user typing <|im_end|> stays text"]


def hf_tokenizer(bos: bool) -> "transformers.PreTrainedTokenizerFast":
    """A byte-level BPE trained by `tokenizers` on a few lines, with ChatML specials (+ a LLaMA-3 BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (["<|begin_of_text|>"] if bos else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 4 + ["the quick brown fox jumps over the lazy dog"] * 8, trainer)
    if bos:
        bos_id = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                           special_tokens=[("<|begin_of_text|>", bos_id)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                bos_token="<|begin_of_text|>" if bos else None,
                                                chat_template=CHATML)


def write_hf_llama(path: Path, *, n_kv_heads: int = 2, tie: bool = False, rope_scaling: dict | None = None,
                   seed: int = 0, bos: bool = False, state: dict | None = None) -> "transformers.LlamaForCausalLM":
    """A random fp32 LlamaForCausalLM (norms random too) saved by transformers, sharded at 200KB, with its
    tokenizer and a generation_config.json naming two stop tokens. Returns the model (eval mode)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, max_position_embeddings=8192 if rope_scaling else 256, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=rope_scaling, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
        if state is not None:
            model.load_state_dict(state, strict=False)
    tok = hf_tokenizer(bos)
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")])
    model.save_pretrained(path, max_shard_size="200KB")
    tok.save_pretrained(path)
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def our_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


def tokens(vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("n_kv_heads,tie,rope_scaling", [
    (2, False, None),
    (4, True, None),
    (1, True, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}),
], ids=["gqa-untied", "mha-tied", "mqa-tied-llama32-rope"])
def test_sharded_hf_llama_loads_with_transformers_logits(tmp_path, n_kv_heads, tie, rope_scaling):
    ref = write_hf_llama(tmp_path / "hf", n_kv_heads=n_kv_heads, tie=tie, rope_scaling=rope_scaling)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1
    model, tok = load_model(tmp_path / "hf")
    assert model.args.n_kv_heads == n_kv_heads and model.args.max_seq_len == ref.config.max_position_embeddings
    if tie:
        assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()  # shared, no copy
    x = tokens()
    assert rel(our_logits(model, x), hf_logits(ref, x)) <= 1e-5


def test_hf_folder_loads_in_bf16_straight(tmp_path):
    write_hf_llama(tmp_path / "hf")
    model, _ = load_model(tmp_path / "hf", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_batched_greedy_generation_matches_transformers(tmp_path):
    ref = write_hf_llama(tmp_path / "hf", tie=True)
    model, _ = load_model(tmp_path / "hf")
    prompts = [[5, 9, 33, 70, 2], [101, 7]]
    ours = generate(model, prompts, max_gen_len=6, temperature=0.0, stop_tokens=[])
    for prompt, new in zip(prompts, ours):
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
        assert new == out[0, len(prompt):].tolist()


def test_tokenizer_chat_format_and_stop_tokens_come_from_the_folder(tmp_path):
    write_hf_llama(tmp_path / "hf")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tok = load_tokenizer(tmp_path / "hf")
    im_end, eot = ref.convert_tokens_to_ids("<|im_end|>"), ref.convert_tokens_to_ids("<|endoftext|>")
    assert tok.bos_id is None and tok.eos_id == im_end and tok.stop_tokens == [im_end, eot]
    assert tok.chat_template == "chatml"
    for text in TEXTS:
        ids = tok.encode(text, bos=False, eos=True)
        assert ids[:-1] == ref(text, add_special_tokens=False)["input_ids"] or "<|im_end|>" in text
        assert ids[-1] == im_end and tok.decode(ids[:-1]) == text
    assert im_end not in tok.encode(TEXTS[3], bos=False, eos=False)  # typed special text stays text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert tok.format_dialog(chat) == ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                              return_dict=False)


def test_bos_from_the_post_processor(tmp_path):
    write_hf_llama(tmp_path / "hf", bos=True)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tok = load_tokenizer(tmp_path / "hf")
    assert tok.bos_id == ref.convert_tokens_to_ids("<|begin_of_text|>")
    assert tok.encode("the fox", bos=True, eos=False) == ref("the fox")["input_ids"]


def test_export_of_an_hf_folder_loads_in_transformers(tmp_path):
    ref = write_hf_llama(tmp_path / "hf", tie=True)
    out = export_hf(tmp_path / "hf", tmp_path / "out", max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["model_type"] == "llama"
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = tokens()
    assert rel(hf_logits(back, x), hf_logits(ref, x)) <= 1e-5
    assert transformers.AutoTokenizer.from_pretrained(out)("the fox")["input_ids"] == \
        transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")("the fox")["input_ids"]


def test_export_merges_a_plain_lora_and_transformers_computes_it(tmp_path):
    write_meta_model_dir(tmp_path / "base", seed=1)
    with_lora = make_lora_adapter(tmp_path / "base", tmp_path / "lora" / "adapter.pth",
                                  targets="Q,K,V,O,FFN_GATE,FFN_UP,FFN_DOWN").eval()
    out = export_hf(tmp_path / "base", tmp_path / "merged", adapter_path=str(tmp_path / "lora" / "adapter.pth"))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = tokens(512)
    assert rel(hf_logits(back, x), our_logits(with_lora, x)) <= 1e-5
    reloaded, _ = load_model(out)
    assert rel(our_logits(reloaded, x), our_logits(with_lora, x)) <= 1e-5


def test_export_refuses_an_adapter_that_is_not_a_plain_lora(tmp_path):
    write_meta_model_dir(tmp_path / "base", seed=1)
    model, _ = load_model(tmp_path / "base")
    attach_adapters(model, MoAConfig(lora_layers="0-2", lora_rank=4, lora_targets="Q,V", prompt_layers="0-2",
                                     prompt_len=3, type_router="soft", swi_x=0))
    save_adapter(model, tmp_path / "moa" / "adapter.pth")
    with pytest.raises(ValueError, match=r"not a plain LoRA.*--type_router soft.*--prompt_layers"):
        export_hf(tmp_path / "base", tmp_path / "out", adapter_path=str(tmp_path / "moa" / "adapter.pth"))
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_names_config_json_and_the_field(tmp_path):
    write_hf_llama(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(ValueError, match=r"config\.json: field 'model_type' is 'mistral'; supported"):
        load_model(tmp_path / "hf")


def test_unsupported_rope_scaling_names_the_field(tmp_path):
    write_hf_llama(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: field 'rope_scaling' has rope_type 'yarn'"):
        load_model(tmp_path / "hf")


def test_lora_extract_works_on_an_hf_fine_tune_against_its_hf_base(tmp_path):
    base = write_hf_llama(tmp_path / "base")
    g = torch.Generator().manual_seed(5)
    tuned_state = {k: v.clone() for k, v in base.state_dict().items()}
    deltas = {}
    for i in range(2):
        for proj in ("q_proj", "k_proj", "o_proj"):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            out_dim, in_dim = tuned_state[key].shape
            deltas[key] = 0.05 * torch.randn(out_dim, 2, generator=g) @ torch.randn(2, in_dim, generator=g)
            tuned_state[key] += deltas[key]
    write_hf_llama(tmp_path / "tuned", state=tuned_state)
    assert load_params(tmp_path / "base") == load_params(tmp_path / "tuned")
    cfg, state, report = extract_lora_svd(tmp_path / "base", tmp_path / "tuned", rank=2, targets="Q,K,O")
    base_meta, tuned_meta = load_state_dict(tmp_path / "base"), load_state_dict(tmp_path / "tuned")
    for site, energy in report.kept_energy.items():
        assert energy > 1 - 1e-6, site
        expected = tuned_meta[f"{site}.weight"] - base_meta[f"{site}.weight"]
        assert rel(lora_delta(cfg, state, site), expected) <= 1e-4
    assert report.other_changed == []
    # Applied to the HF base, the extracted LoRA computes the HF fine-tune.
    model, _ = load_model(tmp_path / "base")
    from moa.files.adapters import write_adapter_files

    write_adapter_files(tmp_path / "x" / "adapter.pth", cfg, state)
    load_adapter(model, tmp_path / "x" / "adapter.pth")
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tuned", dtype=torch.float32).eval()
    x = tokens()
    assert rel(our_logits(model.eval(), x), hf_logits(tuned, x)) <= 1e-5


def test_smollm2_through_export_and_back(smollm2_dir, tmp_path):
    out = export_hf(smollm2_dir, tmp_path / "hf", max_shard_size="200MB")
    assert (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    ours, tok = load_model(smollm2_dir, max_seq_len=64)
    x = torch.tensor([tok.encode("The capital of France is", bos=True, eos=False)])
    expected = our_logits(ours, x)
    del ours
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert rel(hf_logits(ref, x), expected) <= 1e-5
    del ref
    back, back_tok = load_model(out, max_seq_len=64)
    assert rel(our_logits(back, x), expected) <= 1e-5
    ref_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS + ["def f(x):\n    return x ** 2  # \u00fcber"]:
        ids = tok.encode(text, bos=False, eos=False)
        assert back_tok.encode(text, bos=False, eos=False) == ids, text
        if "<|im_end|>" not in text:  # transformers matches typed special-token text; ours keeps it text
            assert ref_tok(text, add_special_tokens=False)["input_ids"] == ids, text
    assert (back_tok.bos_id, back_tok.eos_id, back_tok.stop_tokens) == (tok.bos_id, tok.eos_id, tok.stop_tokens)
    assert back_tok.chat_template == tok.chat_template == "chatml"
    chat = [{"role": "user", "content": "Hi"}]
    assert back_tok.format_dialog(chat) == tok.format_dialog(chat) == \
        ref_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_command_lines_export_and_extract_on_hf_folders(tmp_path, capsys):
    from scripts import export_hf as export_cli
    from scripts import lora_tools

    base = write_hf_llama(tmp_path / "base")
    tuned_state = {k: v.clone() for k, v in base.state_dict().items()}
    tuned_state["model.layers.1.self_attn.v_proj.weight"] += 0.1
    write_hf_llama(tmp_path / "tuned", state=tuned_state)
    lora_tools.main(["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "--rank", "1",
                     "--targets", "V", "--out", str(tmp_path / "lora" / "adapter.pth")])
    assert "kept energy" in capsys.readouterr().out
    export_cli.main(["--ckpt_dir", str(tmp_path / "base"), "--adapter_path", str(tmp_path / "lora" / "adapter.pth"),
                     "--out", str(tmp_path / "merged"), "--max_shard_size", "1MB"])
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tuned", dtype=torch.float32).eval()
    x = tokens()
    assert rel(hf_logits(merged, x), hf_logits(tuned, x)) <= 1e-5
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main(["--ckpt_dir", str(tmp_path / "base"), "--out", str(tmp_path / "merged")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress bars
    assert err.startswith("export_hf: error:") and "already exists" in err


def test_llama3_tiktoken_converts_to_an_equal_tokenizer_json(tmp_path):
    """Meta's LLaMA-3 ranks (llama-models wheel) -> tokenizer.json: the same ids as tiktoken through our
    HFTokenizer and transformers' AutoTokenizer (BOS from the post-processor, chat template, stop tokens)."""
    import importlib.util

    from llama.hf import converted_tokenizer_files

    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llama-models wheel not installed: it ships Meta's LLaMA-3 tokenizer.model")
    meta = load_tokenizer(Path(list(spec.submodule_search_locations)[0]) / "llama3")
    for name, content in converted_tokenizer_files(meta, 128256, 131072).items():
        (tmp_path / name).write_text(content)
    ours, ref = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = TEXTS + ["I'M here, they'RE there!!\r\n\r\n   1234567 tokens", "\u00c9t\u00e9 \U0001f600 x  \n\t y"]
    for text in texts:
        ids = meta.encode(text, bos=True, eos=False)
        assert ours.encode(text, bos=True, eos=False) == ids, text
        assert ref(text)["input_ids"] == ids, text
        assert ours.decode(ids[1:]) == text
    assert (ours.bos_id, ours.eos_id, set(ours.stop_tokens)) == (128000, meta.eos_id, set(meta.stop_tokens))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "}]
    assert ours.format_dialog(chat) == meta.format_dialog(chat) == \
        ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_lora_merge_into_an_hf_base_points_to_export_hf(tmp_path):
    from moa.lora.algebra import merge_into_base

    write_hf_llama(tmp_path / "base")
    model, _ = load_model(tmp_path / "base")
    attach_adapters(model, MoAConfig(lora_layers="0-2", lora_rank=2, lora_targets="Q", type_router="none"))
    save_adapter(model, tmp_path / "lora" / "adapter.pth")
    with pytest.raises(ValueError, match=r"Hugging Face folder: merge into it with scripts/export_hf\.py"):
        merge_into_base(tmp_path / "base", tmp_path / "lora" / "adapter.pth", tmp_path / "out")


def test_export_into_an_out_under_a_file_is_one_line_before_loading(tmp_path, capsys, monkeypatch):
    """--out under a regular file (root writes through permission bits, a file stops everyone)."""
    from scripts import export_hf as export_cli

    write_hf_llama(tmp_path / "base")
    afile = tmp_path / "afile"
    afile.write_text("not a folder")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(export_cli, "base_and_state", no_load)
    capsys.readouterr()  # transformers' progress bars
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main(["--ckpt_dir", str(tmp_path / "base"), "--out", str(afile / "out")])
    assert exit_info.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("export_hf: error: --out") and str(afile) in err[0], err
    assert "is a file, not a folder" in err[0] and afile.read_text() == "not a folder"


def test_export_an_os_error_while_writing_is_one_line(tmp_path, capsys, monkeypatch):
    from scripts import export_hf as export_cli

    write_hf_llama(tmp_path / "base")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out"))

    monkeypatch.setattr(export_cli.hf, "save_hf_dir", disk_full)
    capsys.readouterr()  # transformers' progress bars
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main(["--ckpt_dir", str(tmp_path / "base"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"export_hf: error: {tmp_path / 'out'}: No space left on device"]


def test_export_removes_the_temporary_folders_of_dead_writers_only(tmp_path):
    from llama.tempnames import HOST

    write_hf_llama(tmp_path / "base")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    left = {"dead": tmp_path / f".out.tmp-{HOST}-{dead_pid}-0123abcd",
            "live": tmp_path / f".out.tmp-{HOST}-{os.getpid()}-4567abcd",
            "other": tmp_path / f".other.tmp-{HOST}-{dead_pid}-89abcdef"}  # another output's: not ours
    for folder in left.values():
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half a model")
    out = export_hf(tmp_path / "base", tmp_path / "out")
    assert (out / "config.json").is_file()
    assert not left["dead"].exists() and left["live"].is_dir() and left["other"].is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")) == [left["live"].name]
