"""The task-adapter registry: which separately trained task LoRA belongs to which task, and which
training rows describe that task (for the selector).

Two forms, loaded into the same `Registry`:
- a JSON file `{domain: {task: {"adapter": PATH, "data": PATH[, "n_train": N]}}}`; relative paths
  are relative to the JSON file's folder. `n_train` (optional) is how many rows of `data` the
  selector trains on (written by `balance`; absent = every row).
- a directory tree `ROOT/domain/task/` holding `adapter.pth` (+ `adapter_params.json`) and
  `train.json` (the task's training rows).

The Adapters Selector data-config format, a data config (JSON `{domain: {task: data_path}}` or a tree
`ROOT/domain/task/train.json`) with a separate adapter-pool JSON `{domain: {task: adapter_path}}`, loads
into the same `Registry` (`load_pool_registry`; command lines: `--data_config D --adapter_pool P`,
`registry_from_flags`).

Task names are unique over the whole registry (a task name is a selector class and names its
adapter): the same task under two domains, or twice in one domain of the JSON, is a `ValueError`
naming both places. A missing adapter or data file is a `FileNotFoundError` naming the task.
Editing (`add`, `delete`, `balance`, used by `scripts/registry.py`) works on the JSON form and
writes the file atomically.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from moa.atomic import atomic_write_json
from moa.files.adapters import ADAPTER_FILE, adapter_file
from moa.files.lock import OutputLock
from moa.tasks.swap import adapter_kind
from moa.train.data import load_rows

TREE_DATA_FILE = "train.json"


@dataclass(frozen=True)
class TaskEntry:
    """One task: its domain, name, adapter file (adapter.pth, absolute), training rows (absolute)
    and how many of them the selector uses (None = all). `kind`: what its adapter_params.json describes,
    `lora` (a plain LoRA: the bank serves it, fusion weighs it) or `moa` (any other adapter
    main_finetune.py writes: routed top-1 with its modules attached, never fused; `moa.tasks.swap`);
    recorded by `Registry.validate` (None before), never written to the file."""

    domain: str
    task: str
    adapter: Path
    data: Path
    n_train: Optional[int] = None
    kind: Optional[str] = None


@dataclass
class Registry:
    """Tasks in file order (that order is the selector's class order). `source`: the JSON file or
    directory it was read from (None for one built in memory); for a data config and an adapter pool, the pool,
    with `data_config` the data config it was read with (None otherwise)."""

    entries: list[TaskEntry]
    source: Optional[Path] = None
    data_config: Optional[Path] = None

    @property
    def tasks(self) -> list[str]:
        return [e.task for e in self.entries]

    @property
    def flags(self) -> str:
        """The command-line flags that name this registry's files, for messages."""
        if self.data_config is not None:
            return f"--data_config {self.data_config} with --adapter_pool {self.source}"
        return f"--adapter_registry {self.source}" if self.source is not None else "the registry"

    def entry(self, task: str) -> TaskEntry:
        """The entry of `task`; `ValueError` listing the known tasks when it is not registered."""
        for e in self.entries:
            if e.task == task:
                return e
        raise ValueError(f"{self.source or 'registry'}: no task {task!r}; registered tasks: {self.tasks}")

    def validate(self) -> None:
        """Check task names (non-empty, unique) and that every adapter and data file exists; record each
        entry's `kind` from its adapter_params.json (unreadable: an error naming the task)."""
        where = self.source or "registry"
        seen: dict[str, str] = {}
        for i, e in enumerate(self.entries):
            if not e.domain or not e.task:
                raise ValueError(f"{where}: empty domain or task name ({e.domain!r}/{e.task!r})")
            if e.task in seen:
                raise ValueError(f"{where}: duplicate task name {e.task!r} (in domain {seen[e.task]!r} and "
                                 f"{e.domain!r}); task names must be unique across the registry")
            seen[e.task] = e.domain
            try:
                adapter_file(e.adapter)
                self.entries[i] = e = replace(e, kind=adapter_kind(e.adapter))
            except FileNotFoundError as err:
                raise FileNotFoundError(f"{where}: task {e.domain}/{e.task}: adapter: {err}") from None
            except ValueError as err:
                raise ValueError(f"{where}: task {e.domain}/{e.task}: adapter: {err}") from None
            if not e.data.is_file():
                raise FileNotFoundError(f"{where}: task {e.domain}/{e.task}: data file {e.data} does not exist")
            if e.n_train is not None and (isinstance(e.n_train, bool) or not isinstance(e.n_train, int)
                                          or e.n_train < 1):
                raise ValueError(f"{where}: task {e.domain}/{e.task}: n_train must be an integer >= 1, "
                                 f"got {e.n_train!r}")


def _no_duplicate_keys(path: Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"{path}: duplicate key {key!r} (a task or domain listed twice)")
            out[key] = value
        return out
    return hook


def _domain_tasks(path: Path, where: str, expected: str) -> list[tuple[str, str, Any]]:
    """(domain, task, value) of a JSON file `{domain: {task: value}}`, in file order (a key twice in
    one object is an error); `where` starts each message, `expected` describes a value."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected {{domain: {{task: {expected}}}}}")
    out = []
    for domain, tasks in raw.items():
        if not isinstance(tasks, dict):
            raise ValueError(f"{where}: domain {domain!r}: expected an object {{task: {expected}}}")
        out += [(domain, task, value) for task, value in tasks.items()]
    return out


def _read_json(path: Path) -> Registry:
    entries = []
    for domain, task, spec in _domain_tasks(path, str(path), '{"adapter": path, "data": path}'):
        if not isinstance(spec, dict) or not {"adapter", "data"} <= set(spec):
            raise ValueError(f"{path}: task {domain}/{task}: expected an object with \"adapter\" and \"data\"")
        unknown = sorted(set(spec) - {"adapter", "data", "n_train"})
        if unknown:
            raise ValueError(f"{path}: task {domain}/{task}: unknown field(s) {unknown} "
                             "(expected adapter, data, n_train)")
        for field in ("adapter", "data"):
            if not isinstance(spec[field], str):
                raise ValueError(f"{path}: task {domain}/{task}: field {field!r} must be a path string")
        entries.append(TaskEntry(domain, task, path.parent / spec["adapter"], path.parent / spec["data"],
                                 spec.get("n_train")))
    return Registry(entries, path)


def _read_tree(root: Path) -> Registry:
    entries = []
    for domain in sorted(p for p in root.iterdir() if p.is_dir()):
        for task in sorted(p for p in domain.iterdir() if p.is_dir()):
            entries.append(TaskEntry(domain.name, task.name, task / ADAPTER_FILE, task / TREE_DATA_FILE))
    if not entries:
        raise ValueError(f"{root}: no ROOT/domain/task/ folders (each with {ADAPTER_FILE} and {TREE_DATA_FILE})")
    return Registry(entries, root)


def load_registry(path: str | os.PathLike) -> Registry:
    """Read and validate a registry (a JSON file or a `domain/task/` directory tree)."""
    path = Path(path)
    if path.is_dir():
        reg = _read_tree(path)
    elif path.is_file():
        reg = _read_json(path)
    else:
        raise FileNotFoundError(f"--adapter_registry {path}: no such file or directory")
    reg.validate()
    return reg


def _relative(p: Path, folder: Path) -> str:
    try:
        return os.path.relpath(p, folder)
    except ValueError:  # another drive (Windows)
        return str(p)


def to_json_dict(reg: Registry, folder: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """The JSON form of `reg`, paths relative to `folder`."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for e in reg.entries:
        spec: dict[str, Any] = {"adapter": _relative(e.adapter, folder), "data": _relative(e.data, folder)}
        if e.n_train is not None:
            spec["n_train"] = e.n_train
        out.setdefault(e.domain, {})[e.task] = spec
    return out


def _editable(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory tree registry: add, delete and balance edit a JSON registry "
                         "(for a tree, add or remove the domain/task/ folders themselves)")
    return path


def save_registry(reg: Registry, path: str | os.PathLike) -> Path:
    """Validate `reg` and write it as JSON to `path` (temporary name, then rename)."""
    path = _editable(path)
    reg = Registry(reg.entries, path)
    reg.validate()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, to_json_dict(reg, path.parent.resolve()))
    return path


def _load_or_empty(path: Path) -> Registry:
    return load_registry(path) if path.exists() else Registry([], path)


Edit = TypeVar("Edit", bound=Callable[..., "Registry"])


def _one_writer(edit: Edit) -> Edit:
    """Run a read-modify-write of the registry file (its first argument) under the file's lock, so
    that two edits at once never lose one another's change (the second stops at once)."""

    def locked(path: str | os.PathLike, *args: Any) -> Registry:
        with OutputLock(_editable(path)):
            return edit(path, *args)

    locked.__doc__, locked.__name__ = edit.__doc__, edit.__name__
    return locked  # type: ignore[return-value]


@_one_writer
def add_task(path: str | os.PathLike, domain: str, task: str, adapter: str | os.PathLike,
             data: str | os.PathLike) -> Registry:
    """Add `domain/task` to the JSON registry `path` (created when missing) and save it.

    `adapter`, `data`: paths as given on the command line (relative to the current directory);
    stored relative to the registry's folder. A task name already present is a `ValueError`.
    """
    path = _editable(path)
    reg = _load_or_empty(path)
    if task in reg.tasks:
        raise ValueError(f"{path}: duplicate task name {task!r} (already in domain "
                         f"{reg.entry(task).domain!r}); delete it first or pick another name")
    reg.entries.append(TaskEntry(domain, task, Path(adapter).resolve(), Path(data).resolve()))
    save_registry(reg, path)
    return load_registry(path)


@_one_writer
def delete_task(path: str | os.PathLike, task: str) -> Registry:
    """Remove `task` from the JSON registry `path` and save it (`ValueError` when it is not there)."""
    path = _editable(path)
    reg = load_registry(path)
    reg.entry(task)
    reg.entries = [e for e in reg.entries if e.task != task]
    save_registry(reg, path)
    return load_registry(path)


def task_row_counts(reg: Registry) -> dict[str, int]:
    """Number of rows in each task's data file."""
    return {e.task: len(load_rows(e.data)) for e in reg.entries}


@_one_writer
def balance_tasks(path: str | os.PathLike, n_train: Optional[int] = None) -> Registry:
    """Set every task's `n_train` to `n_train` (default: the smallest task's row count) and save, so
    that the selector trains on the same number of rows per task. A task with fewer rows than
    `n_train` is a `ValueError` naming it."""
    path = _editable(path)
    reg = load_registry(path)
    counts = task_row_counts(reg)
    target = min(counts.values()) if n_train is None else n_train
    short = {t: n for t, n in counts.items() if n < target}
    if short:
        raise ValueError(f"--n_train {target}: task(s) {short} have fewer rows than that")
    reg.entries = [replace(e, n_train=target) for e in reg.entries]
    save_registry(reg, path)
    return load_registry(path)


# ---- the Adapters Selector data-config format: a data config and an adapter pool ----------------------

def _read_task_paths(path: Path, flag: str, what: str) -> dict[str, tuple[str, Path]]:
    """{task: (domain, path)} of a JSON `{domain: {task: PATH}}` whose paths name `what` files
    (relative paths: relative to the JSON file's folder), in file order."""
    if not path.is_file():
        raise FileNotFoundError(f"--{flag} {path}: no such file")
    out: dict[str, tuple[str, Path]] = {}
    for domain, task, value in _domain_tasks(path, f"--{flag} {path}", f'"{what} file path"'):
        if not isinstance(value, str):
            raise ValueError(f"--{flag} {path}: task {domain}/{task}: expected the {what} file's path (a string), "
                             f"got {type(value).__name__}")
        if task in out:
            raise ValueError(f"--{flag} {path}: duplicate task name {task!r} (in domain {out[task][0]!r} and "
                             f"{domain!r}); task names must be unique across the registry")
        out[task] = (domain, path.parent / value)
    return out


def _read_data_tree(root: Path) -> dict[str, tuple[str, Path]]:
    """{task: (domain, ROOT/domain/task/train.json)} of a tree of data files, sorted by domain, task."""
    out: dict[str, tuple[str, Path]] = {}
    for domain in sorted(p for p in root.iterdir() if p.is_dir()):
        for task in sorted(p for p in domain.iterdir() if p.is_dir()):
            if task.name in out:
                raise ValueError(f"--data_config {root}: duplicate task name {task.name!r} (in domain "
                                 f"{out[task.name][0]!r} and {domain.name!r}); task names must be unique")
            out[task.name] = (domain.name, task / TREE_DATA_FILE)
    if not out:
        raise ValueError(f"--data_config {root}: no ROOT/domain/task/ folders (each with {TREE_DATA_FILE})")
    return out


def load_pool_registry(data_config: str | os.PathLike, adapter_pool: str | os.PathLike) -> Registry:
    """A data config and an adapter pool (the Adapters Selector data-config format) as one validated
    `Registry`: `data_config`, a JSON `{domain: {task: data_path}}` or a tree `ROOT/domain/task/train.json`,
    and `adapter_pool`, a JSON `{domain: {task: adapter_path}}` (relative paths: relative to the JSON
    file's folder). Both must list the same tasks under the same domains: a task in one only, or under
    another domain, is a `ValueError` naming the task and both files. Tasks in the data config's order;
    `source`: the pool, `data_config`: the data config."""
    data_config, adapter_pool = Path(data_config), Path(adapter_pool)
    data = _read_data_tree(data_config) if data_config.is_dir() else _read_task_paths(data_config, "data_config", "data")
    pool = _read_task_paths(adapter_pool, "adapter_pool", "adapter")
    for task, (domain, path) in data.items():
        if task not in pool:
            raise ValueError(f"task {domain}/{task} is in --data_config {data_config} but not in --adapter_pool "
                             f"{adapter_pool}")
        if pool[task][0] != domain:
            raise ValueError(f"task {task} is in domain {domain!r} in --data_config {data_config} but in domain "
                             f"{pool[task][0]!r} in --adapter_pool {adapter_pool}")
        if not path.is_file():
            raise FileNotFoundError(f"--data_config {data_config}: task {domain}/{task}: data file {path} does not exist")
    for task, (domain, _) in pool.items():
        if task not in data:
            raise ValueError(f"task {domain}/{task} is in --adapter_pool {adapter_pool} but not in --data_config "
                             f"{data_config}")
    reg = Registry([TaskEntry(domain, task, pool[task][1], path) for task, (domain, path) in data.items()],
                   adapter_pool, data_config)
    reg.validate()
    return reg


def registry_named(adapter_registry: Optional[str | os.PathLike] = None,
                   data_config: Optional[str | os.PathLike] = None,
                   adapter_pool: Optional[str | os.PathLike] = None,
                   registry_flag: str = "adapter_registry") -> bool:
    """Whether a command line names a registry, `--{registry_flag}` or `--data_config` with
    `--adapter_pool`; both forms at once, or one of the two files alone, is a `ValueError` naming the
    flags. Reads no file (checked before anything is loaded)."""
    if adapter_registry and (data_config or adapter_pool):
        raise ValueError(f"--{registry_flag} excludes --data_config / --adapter_pool (those two files are one "
                         "registry in the Adapters Selector data-config format)")
    if bool(data_config) != bool(adapter_pool):
        raise ValueError("--data_config and --adapter_pool go together (the tasks' training rows, and their adapters)")
    return bool(adapter_registry or data_config)


def registry_from_flags(adapter_registry: Optional[str | os.PathLike] = None,
                        data_config: Optional[str | os.PathLike] = None,
                        adapter_pool: Optional[str | os.PathLike] = None,
                        registry_flag: str = "adapter_registry") -> Registry:
    """The registry a command line names: `--{registry_flag}` (a registry JSON or domain/task/ tree,
    `load_registry`), or `--data_config` with `--adapter_pool` (`load_pool_registry`); the flags are
    checked by `registry_named`, and naming none is a `ValueError` too."""
    if not registry_named(adapter_registry, data_config, adapter_pool, registry_flag):
        raise ValueError(f"give --{registry_flag}, or --data_config with --adapter_pool")
    if adapter_registry:
        return load_registry(adapter_registry)
    return load_pool_registry(data_config, adapter_pool)


def as_registry(registry: "Registry | str | os.PathLike") -> Registry:
    """`registry` itself, or the validated registry read from that path (a registry JSON or domain/task/
    tree, `load_registry`); a data config and an adapter pool come as a `Registry` (`load_pool_registry`)."""
    return registry if isinstance(registry, Registry) else registry_from_flags(registry)
