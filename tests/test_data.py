"""moa.train.data: the Alpaca template (docs/formats.md), row validation, test-set overlap, tokenisation with
label masking and truncation, dynamic padding. Exact comparisons (integers and strings)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama.tokenizer import load_tokenizer
from moa.train.data import (
    IGNORE_INDEX,
    InstructionDataset,
    build_prompt,
    collate,
    load_rows,
    question_key,
    split_test_overlap,
    tokenize_rows,
)
from tests.helpers import write_byte_tokenizer


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    """Byte-level tiktoken: id = byte value, Meta's specials from 256 (BOS 256, EOS 257)."""
    d = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(d)
    return load_tokenizer(d)


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_build_prompt_is_the_alpaca_template_exact():
    assert build_prompt("Add 2 and 3.", None) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:")
    assert build_prompt("Add 2 and 3.", "") == build_prompt("Add 2 and 3.", None)
    assert build_prompt("Translate.", "Bonjour") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n"
        "### Input:\nBonjour\n\n### Response:")


def test_load_rows_accepts_optional_input_and_extra_fields(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": None, "output": "d", "answer": "1"},
            {"instruction": "e", "input": "f", "output": "g"}]
    assert load_rows(_write(tmp_path / "ok.json", rows)) == rows


@pytest.mark.parametrize("content, expected", [
    ("[{\"instruction\": \"a\", ", "not valid JSON"),
    ({"instruction": "a", "output": "b"}, "expected a JSON list"),
    ([{"instruction": "a", "output": "b"}, ["x"]], "row 1: expected an object"),
    ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], "row 1: missing field 'output'"),
    ([{"output": "b"}], "row 0: missing field 'instruction'"),
    ([{"instruction": 3, "output": "b"}], "row 0: field 'instruction' must be a string"),
    ([{"instruction": "a", "input": 5, "output": "b"}], "row 0: field 'input' must be a string or null"),
])
def test_load_rows_malformed_names_file_row_and_field(tmp_path, content, expected):
    path = _write(tmp_path / "bad.json", content)
    with pytest.raises(ValueError) as e:
        load_rows(path)
    assert str(path) in str(e.value) and expected in str(e.value)


def test_load_rows_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_rows(tmp_path / "nope.json")


def test_tokenize_masks_prompt_and_appends_eos_exact(byte_tok):
    rows = [{"instruction": "Hi", "output": "ok"}]
    (ex,), skipped = tokenize_rows(rows, byte_tok, 400)
    prompt = [byte_tok.bos_id] + list(build_prompt("Hi").encode())
    assert skipped == [] and ex.n_prompt == len(prompt)
    assert ex.tokens == prompt + [ord("o"), ord("k"), byte_tok.eos_id]
    item = InstructionDataset([ex])[0]
    assert item["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + [ord("o"), ord("k"), byte_tok.eos_id]


def test_truncation_keeps_whole_prompt_cuts_response_tail_and_skips_long_prompts(byte_tok):
    n_prompt = 1 + len(build_prompt("Q").encode())
    rows = [{"instruction": "Q", "output": "abcdef"}, {"instruction": "Q" * 50, "output": "x"},
            {"instruction": "Q", "output": "abcdef"}]
    examples, skipped = tokenize_rows(rows, byte_tok, n_prompt + 3)
    assert skipped == [1]  # its prompt alone is longer than max_seq_len
    assert [ex.tokens[ex.n_prompt:] for ex in examples] == [[ord(c) for c in "abc"]] * 2
    assert all(ex.n_prompt == n_prompt for ex in examples)
    # A prompt that exactly fills max_seq_len leaves no response token: skipped too.
    assert tokenize_rows(rows[:1], byte_tok, n_prompt)[1] == [0]


def test_collate_pads_right_with_mask_and_ignored_labels_exact():
    items = [{"tokens": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
             {"tokens": torch.tensor([8]), "labels": torch.tensor([0])}]
    batch = collate(items)
    assert batch["tokens"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [0, -100, -100]]
    assert batch["token_mask"].tolist() == [[True, True, True], [True, False, False]]


def test_question_key_normalises_case_and_whitespace():
    assert question_key({"instruction": "How  many\napples?\t"}) == question_key({"instruction": "how many apples?"})
    assert question_key({"instruction": "a", "input": "b"}) != question_key({"instruction": "a"})


def test_test_overlap_found_across_math_and_commonsense(tmp_path):
    _write(tmp_path / "math" / "SetA" / "test.json", [{"instruction": "What is 2 + 2?", "output": "", "answer": "4"}])
    _write(tmp_path / "commonsense" / "boolq" / "test.json",
           [{"instruction": "Is the sky blue?", "input": "", "output": "true"}])
    rows = [{"instruction": "what is 2 +  2?", "output": "4"}, {"instruction": "What is 3 + 3?", "output": "6"},
            {"instruction": "IS THE SKY BLUE?", "output": "true"}]
    kept, overlap, files = split_test_overlap(rows, tmp_path)
    assert overlap == [0, 2] and kept == [rows[1]] and len(files) == 2
    with pytest.raises(FileNotFoundError, match="--data_root"):
        split_test_overlap(rows, tmp_path / "missing")
