"""The checks every part repeats, each in one place: an integer flag in range, a JSON file that must
parse, a torch file that must load (`weights_only=True`, never anything else). Each error is one line
that names the flag or the file; the command lines print it as it is.

No torch at import time (`moa.eval` and the CLIs' argument checks use this module).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional


def check_int(flag: str, value: Any, low: int, high: Optional[int] = None) -> int:
    """`value` itself when it is an int (not a bool) in [low, high]; else a ValueError naming `--flag`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"--{flag}: expected an integer {bound}, got {value!r}")
    return value


def check_number(flag: str, value: Any, low: float = 0.0) -> float:
    """`value` when it is a real number (not a bool) >= low; else a ValueError naming `--flag`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
        raise ValueError(f"--{flag}: expected a number >= {low:g}, got {value!r}")
    return value


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The parsed content of `path`; FileNotFoundError or ValueError (`PATH: not valid JSON (line L
    column C: ...)`) naming the file and what it should have been."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such {what}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None


def load_tensors(path: str | os.PathLike, what: str = "tensor file", mmap: bool = False) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)`; a file torch cannot read (truncated,
    not a torch file, a pickle of anything but tensors and plain containers) is a one-line ValueError
    naming the file. torch's own message, which suggests `weights_only=False`, is never passed on:
    loading arbitrary pickles runs arbitrary code."""
    import pickle

    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        detail = str(e).strip().splitlines()
        unsafe = next((line for line in detail if "GLOBAL" in line or "Unsupported global" in line), None)
        reason = "it holds objects other than tensors and plain containers" + (
            f" ({unsafe.strip()[:160]})" if unsafe else "")
        raise ValueError(f"{path}: cannot read this {what}: {reason}") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{path}: cannot read this {what}: damaged or not a torch file ({first})") from None
