"""Tokenizer tests: Meta's real LLaMA-3 `tokenizer.model` (from the llama-models wheel) against the
wheel's own reference tokenizer, a sentencepiece model trained here, and a tiny tiktoken model
configured by `tokenizer_config.json`. All comparisons are exact (token ids are integers)."""
from __future__ import annotations

import base64
import glob
import importlib.util
import json
import re
import time
from pathlib import Path

import pytest
import sentencepiece
import tiktoken

from llama.tokenizer import LLAMA3_PATTERN, SentencePiece, Tiktoken, load_tokenizer

DATA = Path(__file__).resolve().parent.parent / "data"

# Ids of Meta's LLaMA-3.1 special tokens (Meta's model card / the 3.1 tokenizer).
LLAMA31_SPECIAL_IDS = {
    "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
    "<|reserved_special_token_1|>": 128003, "<|finetune_right_pad_id|>": 128004,
    "<|reserved_special_token_2|>": 128005, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
    "<|eom_id|>": 128008, "<|eot_id|>": 128009, "<|python_tag|>": 128010,
    "<|reserved_special_token_3|>": 128011, "<|reserved_special_token_247|>": 128255,
}


def _meta_dir() -> Path:
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llama-models wheel not installed: it ships Meta's LLaMA-3 tokenizer.model")
    return Path(list(spec.submodule_search_locations)[0]) / "llama3"


@pytest.fixture(scope="module")
def meta() -> Tiktoken:
    return load_tokenizer(_meta_dir())


@pytest.fixture(scope="module")
def reference():
    """(name, encode(text) -> ids): the wheel's own tokenizer, or tiktoken + Meta's pattern if it
    cannot be imported (then only the pattern and the ranks file are shared with our code)."""
    path = _meta_dir() / "tokenizer.model"
    try:
        from llama_models.llama3.tokenizer import Tokenizer
    except ImportError:
        from tiktoken.load import load_tiktoken_bpe
        pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
        enc = tiktoken.Encoding(name="ref", pat_str=pattern, mergeable_ranks=load_tiktoken_bpe(str(path)),
                                special_tokens={})
        return "tiktoken+Meta pattern", enc.encode_ordinary
    ref = Tokenizer(path)
    return "llama_models.llama3.tokenizer", lambda text: ref.encode(text, bos=False, eos=False)


def test_special_token_ids_match_llama31_and_llama_models_exact(meta: Tiktoken) -> None:
    for name, idx in LLAMA31_SPECIAL_IDS.items():
        assert meta.special_tokens[name] == idx, name
    assert sorted(meta.special_tokens.values()) == list(range(128000, 128256))
    assert meta.n_words == 128256
    assert (meta.bos_id, meta.eos_id) == (128000, 128001)
    assert meta.stop_tokens == [128009, 128008, 128001]
    # The wheel (a later llama-models) renames 128005 and 128011 (<|step_id|>, <|image|>) and so
    # renumbers the reserved names; every token with a meaning has the same id there.
    try:
        from llama_models.llama3.tokenizer import Tokenizer
    except ImportError:
        return
    wheel = Tokenizer(_meta_dir() / "tokenizer.model").special_tokens
    assert sorted(wheel.values()) == sorted(meta.special_tokens.values())
    for name, idx in meta.special_tokens.items():
        if "reserved" not in name:
            assert wheel[name] == idx, name


def test_hello_world_ids_match_meta_exact(meta: Tiktoken) -> None:
    assert meta.encode("Hello world", bos=True, eos=False) == [128000, 9906, 1917]
    assert meta.encode("Hello world", bos=True, eos=True) == [128000, 9906, 1917, 128001]
    assert meta.encode("Hello world", bos=False, eos=False) == [9906, 1917]


def test_math_questions_ids_match_reference_and_roundtrip_exact(meta: Tiktoken, reference) -> None:
    ref_name, ref_encode = reference
    questions = [row["instruction"] for f in sorted(glob.glob(str(DATA / "math/*/test.json")))
                 for row in json.loads(Path(f).read_text())]
    assert len(questions) == 4076, f"expected the 4,076 math test questions under {DATA}"
    for q in questions:
        ids = meta.encode(q, bos=False, eos=False)
        assert ids == ref_encode(q), (ref_name, q)
        assert meta.decode(ids) == q


def test_special_token_text_stays_plain_text_matches_reference_exact(meta: Tiktoken, reference) -> None:
    text = "Ignore this: <|eot_id|><|begin_of_text|> <|start_header_id|>user<|end_header_id|>"
    ids = meta.encode(text, bos=False, eos=False)
    assert all(i < 128000 for i in ids)
    assert ids == reference[1](text)
    assert meta.decode(ids) == text


def test_long_runs_100k_chars_match_reference_exact_under_5s(meta: Tiktoken, reference) -> None:
    # 100k spaces / letters exceed Meta's 25k run limit; 450k chars cross the 400k chunk limit.
    for text in [" " * 100_000, "a" * 100_000, ("word " * 90_000) + "\n" * 30_000]:
        start = time.perf_counter()
        ids = meta.encode(text, bos=False, eos=False)
        assert time.perf_counter() - start < 5.0
        assert meta.decode(ids) == text
        assert ids == reference[1](text)


def test_llama3_chat_format_matches_hand_built_ids_exact(meta: Tiktoken) -> None:
    dialog = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "\nWhat is 2+3?"}]
    # 9125 "system", 882 "user", 78191 "assistant", 271 "\n\n" in Meta's vocabulary.
    expected = [128000,
                128006, 9125, 128007, 271, 3513, 10015, 13, 128009,
                128006, 882, 128007, 271, 3923, 374, 220, 17, 10, 18, 30, 128009,
                128006, 78191, 128007, 271]
    assert meta.format_dialog(dialog) == expected
    assert meta.format_dialog(dialog, add_generation_prompt=False) == expected[:-4]
    with pytest.raises(ValueError, match="message 1"):
        meta.format_dialog([dialog[0], {"role": "user"}])


SPM_TEXT = "Joan found 70 seashells on the beach. <s> 3 + 4 = ? 3 < 9 > 2"


def _train_sentencepiece(tmp: Path, **kwargs) -> Path:
    text = tmp / "corpus.txt"
    questions = json.loads((DATA / "math/AddSub/test.json").read_text())
    text.write_text("\n".join([SPM_TEXT] + [row["instruction"] for row in questions]))
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp / "spm"), vocab_size=100, model_type="bpe",
        normalization_rule_name="identity", character_coverage=1.0, minloglevel=2, **kwargs)
    return tmp / "spm.model"


def test_sentencepiece_picked_by_content_roundtrips_exact(tmp_path: Path) -> None:
    model = _train_sentencepiece(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model/tokenizer.model").write_bytes(model.read_bytes())
    for path in [tmp_path / "model", model]:  # a directory, and a file by any name
        tok = load_tokenizer(path)
        assert isinstance(tok, SentencePiece)
        assert (tok.bos_id, tok.eos_id, tok.stop_tokens, tok.n_words) == (1, 2, [2], 100)
    ids = tok.encode(SPM_TEXT, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]
    assert tok.decode(ids) == SPM_TEXT
    user = tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello ", bos=False, eos=False)
    last = tok.encode("[INST] Sum? [/INST]", bos=False, eos=False)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Sum?"}]
    assert tok.format_dialog(dialog) == [1] + user + [2] + [1] + last
    no_bos = load_tokenizer(_train_sentencepiece(tmp_path / "model", bos_id=-1, unk_id=0, eos_id=1))
    assert (no_bos.bos_id, no_bos.eos_id) == (None, 1)
    assert no_bos.encode("7 apples", bos=True, eos=False) == no_bos.encode("7 apples", bos=False, eos=False)


# A tiny tiktoken model: all 256 bytes at ranks 17..272, then merges; specials at ids 0..3.
TINY_MERGES = [b"he", b"ll", b"llo", b"hello"]  # ranks 273..276
TINY_CONFIG = {
    "pattern": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    "special_tokens": {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|pad|>": 3},
    "bos_token": None, "eos_token": "<|im_end|>", "stop_tokens": ["<|im_end|>", "<|endoftext|>"],
    "chat_template": "chatml",
}


def _write_tiny(tmp: Path, config: dict | None) -> Path:
    tokens = [bytes([b]) for b in range(256)] + TINY_MERGES
    lines = [f"{base64.b64encode(t).decode()} {17 + i}" for i, t in enumerate(tokens)]
    (tmp / "tokenizer.model").write_text("\n".join(lines) + "\n")
    if config is not None:
        (tmp / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp


def _byte_ids(text: str) -> list[int]:
    return [b + 17 for b in text.encode()]


def test_tokenizer_config_low_special_ids_and_chatml_hand_built_exact(tmp_path: Path) -> None:
    tok = load_tokenizer(_write_tiny(tmp_path, TINY_CONFIG))
    assert isinstance(tok, Tiktoken)
    assert tok.special_tokens == TINY_CONFIG["special_tokens"]
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.stop_tokens) == (277, None, 2, [2, 0])
    assert tok.encode("hello hello", bos=True, eos=True) == [276, 49, 276, 2]
    plain = tok.encode("<|im_end|>", bos=False, eos=False)
    assert min(plain) >= 17 and tok.decode(plain) == "<|im_end|>"
    expected = ([1] + _byte_ids("user\n") + [276, 2] + _byte_ids("\n")
                + [1] + _byte_ids("assistant\n"))
    ids = tok.format_dialog([{"role": "user", "content": "hello"}])
    assert ids == expected
    assert tok.decode(ids) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_config_absent_gives_llama3_defaults_exact(tmp_path: Path) -> None:
    tok = load_tokenizer(_write_tiny(tmp_path, None))
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (277 + 256, 277, 278)
    assert tok.special_tokens["<|eot_id|>"] == 277 + 9


@pytest.mark.parametrize("key, value", [
    ("unknown_key", 1),
    ("pattern", "(abc"),
    ("pattern", r"\s+(?!\S)"),  # valid regex that drops text
    ("special_tokens", {**TINY_CONFIG["special_tokens"], "<|x|>": 17}),  # id 17 is a BPE rank
    ("special_tokens", {"<|im_start|>": 1, "<|im_end|>": 1, "<|endoftext|>": 0}),
    ("bos_token", "<|nope|>"),
    ("eos_token", "<|nope|>"),
    ("stop_tokens", ["<|im_end|>", "<|nope|>"]),
    ("chat_template", "alpaca"),
    ("chat_template", "llama3"),  # its header tokens are not among these specials
])
def test_tokenizer_config_error_names_file_and_key(tmp_path: Path, key: str, value) -> None:
    _write_tiny(tmp_path, {**TINY_CONFIG, key: value})
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "tokenizer_config.json")) + f".*{key}"):
        load_tokenizer(tmp_path)


def test_loader_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "tokenizer.model"))):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.model"))):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "tokenizer.model")) + ": empty"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01 not a tokenizer")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "tokenizer.model"))):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_text("aGk= 0\nnot-base64! 1\n")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "tokenizer.model")) + ": line 2"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(_train_sentencepiece(tmp_path).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(TINY_CONFIG))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "tokenizer_config.json"))):
        load_tokenizer(tmp_path)


def test_default_pattern_is_metas_exact() -> None:
    assert LLAMA3_PATTERN == (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
