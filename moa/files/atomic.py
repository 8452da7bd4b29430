"""Files that must never be seen half-written (checkpoints, adapters, prediction and score files,
tables): each is written to a temporary name in its own folder and renamed into place.

Pure Python (no torch), so that scoring and table tools can use it anywhere.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable


def atomic_write_files(writers: dict[str, Callable[[str], None]]) -> None:
    """Write several files all-or-none: `writers` maps each final path to a function that writes a
    given temporary path (in the same folder); every file is written to its temporary name first, and
    only when all are complete are they renamed into place. On any error the temporaries are removed
    and no final path is touched."""
    temps: dict[str, str] = {}
    try:
        for path, write in writers.items():
            folder = os.path.dirname(os.path.abspath(path))
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
            os.close(fd)
            temps[path] = tmp
            write(tmp)
        for path in writers:
            os.replace(temps.pop(path), path)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_json(obj: Any, path: str) -> None:
    """`obj` as indented JSON (plus a newline) to `path`; use through `atomic_write_files`."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file and a rename."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    atomic_write_files({os.fspath(path): write})


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` through a temporary file and a rename."""
    atomic_write_files({os.fspath(path): lambda tmp: write_json(obj, tmp)})
