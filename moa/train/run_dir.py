"""The training output folder (--output_dir): one run at a time, and never another run's files.

- `OUT.lock` beside it: an exclusive lock (moa/files/lock.py) taken by rank 0 before the model loads
  and held for the whole run; a second training into the same folder stops at once ("another run
  (pid N) is writing OUT").
- `train_settings.json`: the settings that decide the results (the flags below with absolute paths,
  the content identity of the training data and the base model, the adapter flags, the world size),
  written when the folder is created (after every input has been checked). A run into a folder that holds `checkpoint-*.pth` or
  `log.txt` proceeds only when the folder's settings equal its own and, when checkpoints exist, it
  resumes (--resume); `--overwrite True` deletes the old run's files and starts over. A folder with
  such files but no settings file (another program's run, or an older version's) is refused unless
  --resume (whose checkpoint's flags are compared, `check_resume`) or --overwrite True.
- `--resume`: the checkpoint's adapter flags, RESULT_FLAGS and data (file SHA-256 and rows trained on,
  `data_record`) must equal this command's; every difference is named in one message, the adapter
  flags first, then the training flags, then the data.
- `log.txt` is rewritten at start to the records up to the step training starts from, so that a
  resumed run never repeats steps.

Pure Python (no torch).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

from moa.atomic import atomic_write_json, atomic_write_text
from moa.files.lock import OutputLock
from moa.files.settings import data_identity, jsonable, model_identity, settings_diff, sha256_file
from moa.method.config import MoAConfig

SETTINGS_FILE = "train_settings.json"
LOG_FILE = "log.txt"
CHECKPOINT_NAME = re.compile(r"checkpoint-\d+\.pth")
# Flags that decide the trained adapters (besides the adapter flags), compared on --resume too.
RESULT_FLAGS = ("keep_test_overlap", "max_seq_len", "batch_size", "accum_iter", "epochs", "warmup_epochs", "blr",
                "lr", "min_lr", "weight_decay", "w_bias", "bf16", "seed")
ADAPTER_FLAGS = tuple(MoAConfig().to_dict())  # named first when settings differ: they change the adapter's shape


def train_settings(flags: dict[str, Any], adapter_params: dict[str, Any], world_size: int) -> dict[str, Any]:
    """What decides a training run's results: RESULT_FLAGS from `flags` (the training flags as a dict),
    the base model and data (paths and content identity), the test-overlap root, the adapter flags
    and the number of processes."""
    settings = {k: flags.get(k) for k in RESULT_FLAGS}
    if flags.get("bf16_requested") is not None:  # --bf16 auto: recorded as asked, with what it resolved to
        settings["bf16"] = flags["bf16_requested"]
    settings["bf16_resolved"] = flags.get("bf16")  # not compared (settings_diff); a rerun reuses it
    settings.update(llama_path=os.path.abspath(flags["llama_path"]), **data_identity(flags["data_path"]),
                    model_files=model_identity(flags["llama_path"])["model_files"],
                    data_root=os.path.abspath(flags["data_root"]), adapter_params=adapter_params,
                    world_size=world_size)
    return jsonable(settings)


def run_files(output_dir: str) -> list[str]:
    """The names of a training run's files in `output_dir`: checkpoints (by epoch), then log.txt."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    checkpoints = sorted((n for n in names if CHECKPOINT_NAME.fullmatch(n)), key=lambda n: int(n[11:-4]))
    return checkpoints + ([LOG_FILE] if LOG_FILE in names else [])


def _recorded_settings(output_dir: str) -> Optional[dict[str, Any]]:
    """The settings in output_dir/train_settings.json, None when there is none; ValueError naming
    the file when it is not a JSON object."""
    path = os.path.join(output_dir, SETTINGS_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON settings file ({e}); --overwrite True replaces it") from None
    if not isinstance(recorded, dict):
        raise ValueError(f"{path}: not a JSON object of settings; --overwrite True replaces it")
    return recorded


def _remove_run(output_dir: str) -> None:
    """Delete an earlier run's checkpoints, log.txt and settings file (--overwrite True)."""
    for name in run_files(output_dir) + [SETTINGS_FILE]:
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            os.unlink(path)


def check_folder(output_dir: str, settings: dict[str, Any], resume: str) -> None:
    """ValueError naming the folder (and each differing setting) when a run with `settings` may not
    write into `output_dir` (see the module's docstring)."""
    files = run_files(output_dir)
    recorded = _recorded_settings(output_dir)
    checkpoints = [n for n in files if n != LOG_FILE]
    if recorded is not None:
        diff = settings_diff(recorded, settings)
        if diff:
            raise ValueError(f"--output_dir {output_dir} holds a run with other settings ({joined_diff(diff)}); "
                             "give another --output_dir, or --overwrite True to replace it")
        if checkpoints and not resume:
            raise ValueError(f"--output_dir {output_dir} holds this run's {', '.join(checkpoints)}: continue it "
                             f"with --resume {os.path.join(output_dir, checkpoints[-1])}, or start over with "
                             "--overwrite True")
    elif files and not resume:
        raise ValueError(f"--output_dir {output_dir} holds another run's files ({', '.join(files)}) and no "
                         f"{SETTINGS_FILE} saying with which settings; give another --output_dir, --resume one of "
                         "its checkpoints, or --overwrite True to replace them")


def claim_output_dir(lock: OutputLock, output_dir: str, settings: dict[str, Any], resume: str,
                     overwrite: bool) -> None:
    """Take the lock of `output_dir` (kept until `lock.release()`) and, unless `overwrite`, check that
    this run may write there. Creates nothing but the lock file."""
    lock.acquire()
    if not overwrite:
        check_folder(output_dir, settings, resume)


def record_run(output_dir: str, settings: dict[str, Any], overwrite: bool, step: int) -> None:
    """Once every input has been checked: delete an old run's files (`overwrite`), create the folder,
    record this run's settings and cut log.txt to the records up to `step` (where training starts)."""
    if overwrite and os.path.isdir(output_dir):
        _remove_run(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_json(os.path.join(output_dir, SETTINGS_FILE), settings)
    trim_log(output_dir, step)


def ordered_diff(diff: list[str]) -> list[str]:
    """`settings_diff` phrases in the order a user fixes them: the adapter flags (they change the adapter's
    shape), then the training flags, then the data, then the rest (base model, world size); each group
    keeps its sorted order."""
    def group(phrase: str) -> int:
        key = phrase.split(" ", 1)[0]
        if key.startswith("adapter_params.") or key in ADAPTER_FLAGS:
            return 0
        if key in RESULT_FLAGS:
            return 1
        return 2 if key.startswith("data") else 3

    return sorted(diff, key=group)


def joined_diff(diff: list[str], keep: int = 8) -> str:
    """The phrases of `diff` in `ordered_diff`'s order, "; "-joined; past `keep`, a count of the rest."""
    diff = ordered_diff(diff)
    more = f"; and {len(diff) - keep} more" if len(diff) > keep else ""
    return "; ".join(diff[:keep]) + more


def data_record(data_path: str, rows: int) -> dict[str, Any]:
    """What a checkpoint's args record of its training data: the file (absolute path), its SHA-256 and
    the number of rows trained on (after the test-overlap filter); compared on --resume."""
    return {"data_path": os.path.abspath(data_path), "data_sha256": sha256_file(data_path), "data_rows": rows}


def _data_diff(saved: dict[str, Any], data: Optional[dict[str, Any]]) -> list[str]:
    """The data phrases of a --resume: another file's content (naming both files), other rows; a
    checkpoint written before its args held the data's SHA-256 is compared on its path."""
    if data is None:
        return []
    old_path, new_path = saved.get("data_path"), data["data_path"]
    if saved.get("data_sha256") is None:  # an older checkpoint: what it has is the path
        same = old_path is None or os.path.abspath(str(old_path)) == new_path
        return [] if same else [f"data_path {old_path} -> {new_path}"]
    if saved["data_sha256"] != data["data_sha256"]:
        return [f"data_path {old_path} -> {new_path} (sha256 {str(saved['data_sha256'])[:12]} -> "
                f"{data['data_sha256'][:12]})"]
    if saved.get("data_rows") is not None and saved["data_rows"] != data["data_rows"]:
        return [f"data_rows {saved['data_rows']} -> {data['data_rows']} (of {new_path})"]
    return []


def check_resume(path: str, saved: dict[str, Any], saved_adapter: dict[str, Any], args: dict[str, Any],
                 adapter: dict[str, Any], data: Optional[dict[str, Any]] = None) -> None:
    """ValueError naming the checkpoint and, in one message, every setting that differs between it and
    this command: the adapter flags (`saved_adapter` vs `adapter`), the RESULT_FLAGS (the flags stored in
    it, `saved`, vs `args`), then the data (`data_record`, when given) -- in that order."""
    diff = settings_diff(saved_adapter, adapter)
    diff += settings_diff({k: saved.get(k) for k in RESULT_FLAGS}, {k: args.get(k) for k in RESULT_FLAGS})
    diff += _data_diff(saved, data)
    if diff:
        raise ValueError(f"--resume {path}: it was trained with other settings ({joined_diff(diff)}); resume "
                         "with the same flags and data, or start over without --resume")


def trim_log(output_dir: str, step: int) -> None:
    """Rewrite output_dir/log.txt to its records up to optimizer step `step` (where training starts);
    a line that is not a JSON record with a "step" (half a line a kill left) is dropped."""
    path = os.path.join(output_dir, LOG_FILE)
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(path, "".join(kept))
