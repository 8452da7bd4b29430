"""The settings that decided an output, recorded beside it and compared on the next run.

- `file_identity(path)`: what a file's content is, for the settings record: its size and SHA-256
  (files up to `HASH_LIMIT` bytes), or its size and modification time (larger ones, such as the
  shards of a base model, which would take too long to hash on every run).
- `settings_diff(old, new)`: the keys whose values differ, as "key old -> new" phrases, for
  one-line errors that name the differing setting. Keys ending in `_resolved` (what an automatic
  flag such as `--dtype auto` resolved to) are not compared: the requested flags decide whether a
  rerun matches, and a rerun reuses the recorded resolution (docs/formats.md, "Determinism").
- a settings sidecar `<output>.settings.json` records the settings of a complete output file and
  the SHA-256 of its content, so that a file which the sidecar does not describe (another program's
  file, or an older run's) is never taken for this run's result.

Pure Python (no torch).
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from typing import Any, Optional

RESOLVED_SUFFIX = "_resolved"  # `<flag>_resolved`: what an automatic flag resolved to; not compared
HASH_LIMIT = 1 << 30  # files up to 1 GiB are hashed; larger ones are identified by size and mtime
SIDECAR_SUFFIX = ".settings.json"


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_identity(path: str | os.PathLike, hash_limit: int = HASH_LIMIT) -> Optional[str]:
    """"size N sha256 H" for a file up to `hash_limit` bytes, "size N mtime_ns T" for a larger one,
    None when there is no such file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    if st.st_size <= hash_limit:
        return f"size {st.st_size} sha256 {sha256_file(path)}"
    return f"size {st.st_size} mtime_ns {st.st_mtime_ns}"


def model_identity(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """A base-model folder: its path, params.json's content and each consolidated shard's size and
    mtime (shards are too large to hash on every run)."""
    folder = os.path.abspath(ckpt_dir)
    shards = sorted(n for n in os.listdir(folder) if n.startswith("consolidated.") and n.endswith(".pth"))
    files = {"params.json": file_identity(os.path.join(folder, "params.json"))}
    files.update({n: file_identity(os.path.join(folder, n), hash_limit=0) for n in shards})
    return {"ckpt_dir": folder, "model_files": files}


def data_identity(data_path: str | os.PathLike) -> dict[str, Any]:
    """A data file: its path and content."""
    return {"data_path": os.path.abspath(data_path), "data_file": file_identity(data_path)}


def jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` as they read back from a JSON file (tuples become lists, ...)."""
    return json.loads(json.dumps(settings))


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys ({"a": {"b": 1}} -> {"a.b": 1})."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """"key old -> new" for every (dotted, for nested dicts) key whose value differs between two
    settings dicts, sorted; keys ending in `RESOLVED_SUFFIX` are left out (requested flags only)."""
    old, new = requested(flatten(old)), requested(flatten(new))
    keys = sorted(set(old) | set(new))
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def requested(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` without the keys ending in `RESOLVED_SUFFIX` (the flags as requested)."""
    return {k: v for k, v in settings.items() if not k.endswith(RESOLVED_SUFFIX)}


def sidecar_path(output: str | os.PathLike) -> str:
    """The settings record of an output file: `<output>.settings.json`."""
    return f"{os.fspath(output)}{SIDECAR_SUFFIX}"


def sidecar_record(settings: dict[str, Any], content: bytes) -> dict[str, Any]:
    """What the sidecar of an output holds: its settings and the SHA-256 of its bytes."""
    return {"settings": jsonable(settings), "sha256": hashlib.sha256(content).hexdigest()}


def read_sidecar(output: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The settings recorded for `output` when its sidecar exists and describes the file's current
    content (same SHA-256); None otherwise (no sidecar, an unreadable one, or another content)."""
    path = sidecar_path(output)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        return None
    if record.get("sha256") != sha256_file(output):
        return None
    return record["settings"]
