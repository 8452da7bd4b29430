"""Files that must never be seen half-written (checkpoints, adapters, prediction and score files,
tables): each is written to a temporary name in its own folder and renamed into place.

Pure Python (no torch), so that scoring and table tools can use it anywhere.
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from typing import Any, Callable

from llama.tempnames import HOST, STALE_AFTER_S, pid_running, writer_gone  # noqa: F401

# Our temporaries: `.NAME.HOST-PID-XXXXXXXX.tmp` (mkstemp's 8 random characters); earlier code wrote
# `.NAME.XXXXXXXX.tmp`. A temporary left by a killed writer is removed by the next write to NAME: on
# this host when its pid is no longer running, otherwise (another host, or the older names) once it has
# not been touched for STALE_AFTER_S (llama/tempnames.py, shared with the temporary folders).
_HOST = HOST


def _temp_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.(?:(\w+)-(\d+)-)?[a-z0-9_]{{8}}\.tmp$")


def _is_stale(match: re.Match[str], path: str) -> bool:
    """Whether the temporary `path` (its name matched by `_temp_pattern`) belongs to a dead writer."""
    return writer_gone(match.group(1), match.group(2), path)


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Remove the temporaries that interrupted atomic writes of `path` left in its folder (our names
    only, dead writers only, see `_temp_pattern`); returns the paths removed."""
    folder, name = os.path.split(os.path.abspath(path))
    pattern, removed = _temp_pattern(name), []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry)
        tmp = os.path.join(folder, entry)
        try:
            if match and _is_stale(match, tmp):
                os.unlink(tmp)
                removed.append(tmp)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if not directory or e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise  # some file systems (network, FUSE) cannot fsync a folder: the rename still happened
    finally:
        os.close(fd)


def _new_temporary(path: str) -> str:
    """A new empty temporary for `path` in its folder, named as `_temp_pattern` expects."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.{_HOST}-{os.getpid()}-", suffix=".tmp")
    os.close(fd)
    return tmp


def _finish_temporary(tmp: str, mode: int) -> None:
    """Give a written temporary the mode a plain `open` would have (mkstemp makes it 0600) and flush it
    to disk, so that the rename publishes complete content."""
    os.chmod(tmp, mode)
    _fsync(tmp)


def atomic_write_files(writers: dict[str, Callable[[str], None]]) -> None:
    """Write several files all-or-none: `writers` maps each final path to a function that writes a
    given temporary path (in the same folder); every file is written to its temporary name first
    (mode 0666 less the umask, fsynced), and only when all are complete are they renamed into place
    (in order; the folders are fsynced after). On any error the temporaries are removed and no final
    path is touched. Stale temporaries of earlier, killed writes of these paths are removed first."""
    temps: dict[str, str] = {}
    mode = 0o666 & ~_umask()
    try:
        for path, write in writers.items():
            remove_stale_temporaries(path)
            temps[path] = _new_temporary(path)
            write(temps[path])
            _finish_temporary(temps[path], mode)
        for path in writers:
            os.replace(temps.pop(path), path)
        for folder in {os.path.dirname(os.path.abspath(p)) for p in writers}:
            _fsync(folder, directory=True)
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
