"""Names of the temporaries that all-or-none writes leave while they run, and who may remove them.

A temporary file (`moa.atomic`) or folder (`new_temp_dir`) carries its writer's host and pid in its
name. A later write of the same output removes those whose writer is gone: on this host when the pid
is no longer running; from another host, or with an older name without a pid, once untouched for
`STALE_AFTER_S`. Pure Python (no torch), shared by llama/ and moa/.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Optional

HOST = re.sub(r"\W", "_", socket.gethostname()) or "host"
STALE_AFTER_S = 3600.0


def pid_running(pid: int) -> bool:
    """Whether process `pid` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def writer_gone(host: Optional[str], pid: Optional[str], path: str | os.PathLike) -> bool:
    """Whether the writer of the temporary `path` (named with `host` and `pid`, None for older names)
    has stopped: its pid no longer runs on this host, or (another host, no pid) it is stale."""
    if host == HOST and pid is not None:
        return not pid_running(int(pid))
    return time.time() - os.stat(path).st_mtime > STALE_AFTER_S


def _temp_dir_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.tmp-(?:(\w+)-(\d+)-)?[0-9a-f]{{8}}$")


def remove_stale_temp_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders of `out_dir` (`new_temp_dir`'s names only) that writers which are
    no longer running left beside it; returns the folders removed."""
    out_dir = Path(os.path.abspath(out_dir))
    pattern, removed = _temp_dir_pattern(out_dir.name), []
    try:
        entries = os.listdir(out_dir.parent)
    except OSError:
        return removed
    for entry in entries:
        match, tmp = pattern.match(entry), out_dir.parent / entry
        try:
            if match and tmp.is_dir() and not tmp.is_symlink() and writer_gone(match.group(1), match.group(2), tmp):
                shutil.rmtree(tmp)
                removed.append(tmp)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


def new_temp_dir(out_dir: str | os.PathLike) -> Path:
    """A new empty folder `.NAME.tmp-HOST-PID-<8 random characters>` beside `out_dir`, to fill and rename to `out_dir`,
    after removing the ones that dead writers of `out_dir` left. Made with a plain mkdir, so it gets
    0777 less the umask like any folder (mkdtemp's would stay 0700)."""
    out_dir = Path(out_dir)
    remove_stale_temp_dirs(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{HOST}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp
