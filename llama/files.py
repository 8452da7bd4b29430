"""What llama/ and moa/ read back and check, with one-line errors that name the file: a JSON file
(`read_json`), a JSON object (`read_json_object`: params.json, config.json, tokenizer_config.json,
adapter_params.json, ...), and a state dict against the tensors a model expects (`state_dict_mismatch`,
`check_state_dict`; each stored tensor's dtype: `check_stored_dtype`).

No torch at import time: `moa.checks`, which `moa.eval` imports, delegates here.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional


def read_json(path: str | os.PathLike, what: str = "such file", hint: Optional[str] = None) -> Any:
    """The parsed content of `path`.

    No such file: FileNotFoundError `PATH: no WHAT (HINT)` (`what`: "such file", "params.json", ...). Not JSON: ValueError `PATH: not valid JSON
    (line L column C: ...)`; not UTF-8: ValueError `PATH: not a UTF-8 text file (...)`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no {what}" + (f" ({hint})" if hint else ""))
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None


def read_json_object(path: str | os.PathLike, what: str = "such file", hint: Optional[str] = None) -> dict:
    """`read_json(path, what, hint)` when it is a JSON object; else ValueError `PATH: expected a JSON
    object, got list`."""
    value = read_json(path, what, hint)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def first_keys(keys: list[str], shown: int = 6) -> str:
    """`keys` as a list, cut after `shown` with a count of the rest (a whole model's names flood a line)."""
    return str(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def state_dict_mismatch(expected: Mapping[str, Any], given: Mapping[str, Any],
                        ) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """How the tensors `given` differ from those `expected` (both keyed by name; only `.shape` is read):
    (missing keys, unexpected keys, both sorted; `(key, given shape, expected shape)` of every common key,
    in `expected`'s order, whose shapes differ)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [(k, tuple(given[k].shape), tuple(t.shape)) for k, t in expected.items()
             if k in given and tuple(given[k].shape) != tuple(t.shape)]
    return missing, unexpected, wrong


def check_state_dict(expected: Mapping[str, Any], given: Mapping[str, Any], where: str, source: str) -> None:
    """ValueError unless `given` has exactly the keys and shapes of `expected` (a model's `state_dict()`):
    `WHERE: tensors do not match SOURCE: missing keys [...], unexpected keys [...]`, or `WHERE: KEY has
    shape (..), SOURCE implies (..)`. `source`: what the expected shapes follow from (params.json, ...)."""
    missing, unexpected, wrong = state_dict_mismatch(expected, given)
    if missing or unexpected:
        raise ValueError(f"{where}: tensors do not match {source}: missing keys {first_keys(missing, 10)}, "
                         f"unexpected keys {first_keys(unexpected, 10)}")
    if wrong:
        key, got, want = wrong[0]
        more = f" ({len(wrong) - 1} more tensors differ)" if len(wrong) > 1 else ""
        raise ValueError(f"{where}: {key} has shape {got}, {source} implies {want}{more}")


def check_stored_dtype(tensor: Any, name: str, where: str) -> None:
    """ValueError `WHERE: tensor NAME is stored as int32; expected a floating-point dtype` unless `tensor`
    (a torch tensor as read from the weights file `where`, before any conversion) is floating-point: the
    loaders convert every weight to the run's dtype, which would turn integers into nonsense weights or
    leave them for `load_state_dict` to refuse with a traceback."""
    if not tensor.is_floating_point():
        dtype = str(tensor.dtype).removeprefix("torch.")
        raise ValueError(f"{where}: tensor {name!r} is stored as {dtype}; expected a floating-point dtype")
