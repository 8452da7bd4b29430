"""Files on disk, for llama/ and moa/ alike. `load_torch_file` is `torch.load(weights_only=True)` on the
CPU with one-line errors, never passing on torch's own multi-line messages (which suggest
`weights_only=False`: loading arbitrary pickles runs arbitrary code); base-model shards here, adapter,
checkpoint and selector files through `moa.checks.load_tensors`. `new_temp_dir` is the folder that a
model or PEFT directory is written into before it is renamed into place.
"""
from __future__ import annotations

import os
import pickle
import re
import secrets
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _first_line(e: BaseException) -> str:
    """The first line of `e`'s message (at most 120 characters), or its type's name."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:120]


def _unpickling_reason(e: pickle.UnpicklingError) -> str:
    """Why the weights-only unpickler refused a file, without torch's advice."""
    name = _GLOBAL_RE.search(str(e))
    return "it holds objects other than tensors and plain containers" + (f" ({name.group(1)})" if name else "")


def load_torch_file(path: str | os.PathLike, what: str = "tensor file", mmap: bool = False) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)` (memory-mapped when `mmap` and the file
    is in torch's zip format). A file that cannot be read (missing, truncated, not a torch file, a pickle
    of anything but tensors and plain containers) is a one-line ValueError (FileNotFoundError when
    missing) naming the file and what is wrong with it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such {what}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": noise beside our one line
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: cannot read this {what}: {_unpickling_reason(e)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, IndexError,
            TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read this {what}: damaged or not a torch file ({_first_line(e)})") from None


def new_temp_dir(out_dir: str | os.PathLike) -> Path:
    """A new empty folder `.NAME.tmp-XXXXXXXX` beside `out_dir`, to fill and rename to `out_dir`. Made
    with a plain mkdir, so it gets 0777 less the umask like any folder (mkdtemp's would stay 0700)."""
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp
