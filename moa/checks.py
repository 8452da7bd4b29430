"""The checks every part repeats, each in one place: an integer flag in range, a JSON file that must
parse, a torch file that must load (`weights_only=True`, never anything else). Each error is one line
that names the flag or the file; the command lines print it as it is.

No torch at import time (`moa.eval` and the CLIs' argument checks use this module).
"""
from __future__ import annotations

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
    column C: ...)`) naming the file and what it should have been (`llama.files.read_json`)."""
    from llama.files import read_json  # here, not at the top: the `llama` package imports torch

    return read_json(path, f"such {what}")


def require_rows(rows: list, path: str | os.PathLike) -> list:
    """`rows` when it holds at least one row; else a ValueError naming the data file (an empty test set
    would give an empty output that looks like a finished run)."""
    if not rows:
        raise ValueError(f"{path}: no rows (an empty list): nothing to do")
    return rows


def check_writable(flag: str, path: str | os.PathLike, folder: bool = False,
                   given: str | os.PathLike | None = None) -> None:
    """A ValueError naming `--flag` and the path unless `path` (a file, or a folder when `folder`) can be
    created or replaced: not a folder where a file is meant (or the reverse), its nearest existing
    ancestor a folder (not a file) that this user may write, on a file system mounted read-write. For
    checks before any model is loaded. `given`: the flag's value when `path` is a file derived from it
    (a scored file beside `--predict_file`), shown in the message instead of `path`."""
    path = os.path.abspath(path)
    shown = f"--{flag} {given if given is not None else path}"
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise ValueError(f"{shown}: is a {'file' if folder else 'folder'}; expected a "
                         f"{'folder' if folder else 'file name'}")
    existing = path if folder else os.path.dirname(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{shown}: {existing} is a file, not a folder")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise ValueError(f"{shown}: cannot write in folder {existing} (a read-only file system)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{shown}: cannot write in folder {existing} (permission denied)")


def load_tensors(path: str | os.PathLike, what: str = "tensor file", mmap: bool = False) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)` with one-line errors naming the file
    (llama.torchfile.load_torch_file: truncated, not a torch file, a pickle of anything but tensors and
    plain containers). torch's own message, which suggests `weights_only=False`, is never passed on."""
    from llama.torchfile import load_torch_file

    return load_torch_file(path, what, mmap)
