"""Files on disk, for llama/ and moa/ alike. `load_torch_file` is `torch.load(weights_only=True)` on the
CPU with one-line errors, never passing on torch's own multi-line messages (which suggest
`weights_only=False`: loading arbitrary pickles runs arbitrary code); base-model shards here, adapter,
checkpoint and selector files through `moa.checks.load_tensors`. `new_temp_dir` (llama/tempnames.py) is the folder
that a model or PEFT directory is written into before it is renamed into place.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from typing import Any

import torch

from llama.tempnames import new_temp_dir  # noqa: F401  (its home before llama/tempnames.py)

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _first_line(e: BaseException, limit: int = 120) -> str:
    """The first line of `e`'s message, or its type's name; a longer line is cut after its first
    sentence, or else at the last word that fits `limit` characters, and marked with "...". """
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if len(line) <= limit:
        return line
    sentence = line.find(". ")
    if 0 < sentence < limit:
        return line[:sentence + 1]
    return line[:limit].rsplit(" ", 1)[0] + " ..."


def _pickle_globals(path: str | os.PathLike) -> list[str]:
    """The `module.name` globals a plain (non-zip) pickle file would import, read with pickletools
    (which decodes opcodes and runs nothing); [] for a zip file or one that cannot be decoded."""
    import pickletools

    if zipfile.is_zipfile(path):
        return []
    found, strings = [], []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # a damaged pickle: name what was decoded before the damage
        pass
    return list(dict.fromkeys(found))


def _unpickling_reason(e: pickle.UnpicklingError, path: str | os.PathLike) -> str:
    """Why the weights-only unpickler refused a file, without torch's advice: the classes or functions
    it would have imported, from torch's message or else from the pickle's own opcodes."""
    name = _GLOBAL_RE.search(str(e))
    names = [name.group(1)] if name else _pickle_globals(path)
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return "it holds objects other than tensors and plain containers" + (f" ({shown})" if names else "")


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
        raise ValueError(f"{path}: cannot read this {what}: {_unpickling_reason(e, path)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, IndexError,
            TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read this {what}: damaged or not a torch file ({_first_line(e)})") from None
