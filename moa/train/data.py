"""Instruction data: the Alpaca prompt template, row validation, test-set overlap, tokenisation with
label masking, and dynamic padding.

A training example is the prompt's tokens followed by the response's:

    tokens  = [BOS] prompt ...........  output ... EOS        (at most max_seq_len)
    labels  =  -100  -100 ... -100      output ... EOS        (-100 = not trained on)

The prompt and the response are tokenised separately, so the prompt's tokens are exactly the ones
that inference (`build_prompt` + `encode(bos=True)`) feeds the model. Batches are padded on the
right per batch (`collate`) with a `token_mask` that keeps pads out of attention, routers and the
loss; the pad id itself is never read.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset

from moa.checks import read_json

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:"
)
IGNORE_INDEX = -100  # PyTorch's cross-entropy default; never a vocabulary id
_WS = re.compile(r"\s+")


def build_prompt(instruction: str, input: Optional[str] = None) -> str:
    """The Alpaca prompt (docs/formats.md) of one row, used by training and inference alike.

    An empty or missing `input` selects the template without input.
    """
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def load_rows(path: str | os.PathLike) -> list[dict]:
    """Read an Alpaca-format JSON file: a list of objects with string `instruction` and `output`, an
    optional string (or null) `input`, and any other fields (kept as they are).

    Raises FileNotFoundError naming the file, or ValueError naming the file, the row index and the
    field.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: data file not found")
    rows = read_json(path, "data file")
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows {{instruction, input, output}}, "
                         f"got a JSON {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i}: expected an object with instruction/input/output, "
                             f"got {type(row).__name__}")
        for field in ("instruction", "output"):
            if field not in row:
                raise ValueError(f"{path}: row {i}: missing field '{field}' (a string)")
            if not isinstance(row[field], str):
                raise ValueError(f"{path}: row {i}: field '{field}' must be a string, "
                                 f"got {type(row[field]).__name__}")
        if row.get("input") is not None and not isinstance(row["input"], str):
            raise ValueError(f"{path}: row {i}: field 'input' must be a string or null, "
                             f"got {type(row['input']).__name__}")
    return rows


def question_key(row: dict) -> str:
    """A row's question for overlap checks: instruction (+ input), lower-cased, whitespace collapsed."""
    text = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
    return _WS.sub(" ", text.lower()).strip()


def known_test_files(data_root: str | os.PathLike) -> list[str]:
    """The test sets under `data_root`: `math/*/test.json` and `commonsense/*/test.json`, sorted."""
    root = os.fspath(data_root)
    files = glob.glob(os.path.join(root, "math", "*", "test.json"))
    files += glob.glob(os.path.join(root, "commonsense", "*", "test.json"))
    return sorted(files)


def split_test_overlap(rows: list[dict], data_root: str | os.PathLike) -> tuple[list[dict], list[int], list[str]]:
    """Find training rows whose question repeats a test-set question under `data_root`.

    Returns (rows without the overlapping ones, indices of the overlapping rows, test files read).
    FileNotFoundError when `data_root` is not a directory.
    """
    root = os.fspath(data_root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data_root {root}: not a directory (expected math/*/test.json, "
                                "commonsense/*/test.json)")
    files = known_test_files(root)
    seen: set[str] = set()
    for path in files:
        seen.update(question_key(r) for r in load_rows(path))
    overlap = [i for i, r in enumerate(rows) if question_key(r) in seen]
    dropped = set(overlap)
    return [r for i, r in enumerate(rows) if i not in dropped], overlap, files


@dataclass
class Example:
    """One tokenised row: `tokens` (prompt + response, at most max_seq_len ids) and the number of
    leading prompt tokens (`n_prompt`), which get label -100."""

    tokens: list[int]
    n_prompt: int


def tokenize_rows(rows: list[dict], tokenizer, max_seq_len: int) -> tuple[list[Example], list[int]]:
    """Tokenise rows into `Example`s; returns (examples, indices of skipped rows).

    prompt = BOS (when the tokenizer has one) + `build_prompt(...)`; response = `output` + EOS.
    A response that does not fit is cut at its tail (the prompt is kept whole); a row whose prompt
    leaves no room for even one response token (len(prompt) >= max_seq_len) is skipped.
    """
    if max_seq_len < 2:
        raise ValueError(f"--max_seq_len: expected at least 2 tokens, got {max_seq_len}")
    examples, skipped = [], []
    for i, row in enumerate(rows):
        prompt = tokenizer.encode(build_prompt(row["instruction"], row.get("input")), bos=True, eos=False)
        if len(prompt) >= max_seq_len:
            skipped.append(i)
            continue
        response = tokenizer.encode(row["output"], bos=False, eos=True)
        examples.append(Example(tokens=(prompt + response)[:max_seq_len], n_prompt=len(prompt)))
    return examples, skipped


class InstructionDataset(Dataset):
    """Tokenised examples; item i is {"tokens": LongTensor (L,), "labels": LongTensor (L,)}, labels
    -100 on the prompt (unshifted: labels[t] is the id at position t, predicted from position t-1)."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ex = self.examples[i]
        tokens = torch.tensor(ex.tokens, dtype=torch.long)
        labels = tokens.clone()
        labels[: ex.n_prompt] = IGNORE_INDEX
        return {"tokens": tokens, "labels": labels}


def pad_right(seqs: Sequence[Sequence[int] | torch.Tensor], fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to the longest: (B, T) int64 filled with `fill` after each row's end
    (a pad is never read: attention, routers and losses take the mask), and the (B, T) bool mask of
    real tokens."""
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), fill, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for b, s in enumerate(seqs):
        tokens[b, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[b, :len(s)] = True
    return tokens, mask


def collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad a list of items on the right to the batch's longest one.

    Returns tokens (B, T) int64 (pad id 0, never read), labels (B, T) int64 (-100 at pads) and
    token_mask (B, T) bool (True at real tokens).
    """
    tokens, mask = pad_right([item["tokens"] for item in batch])
    labels, _ = pad_right([item["labels"] for item in batch], fill=IGNORE_INDEX)
    return {"tokens": tokens, "labels": labels, "token_mask": mask}
