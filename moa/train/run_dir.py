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
  --resume (whose checkpoint's flags are compared, `check_resume_args`) or --overwrite True.
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
from moa.files.settings import data_identity, jsonable, model_identity, settings_diff

SETTINGS_FILE = "train_settings.json"
LOG_FILE = "log.txt"
CHECKPOINT_NAME = re.compile(r"checkpoint-\d+\.pth")
# Flags that decide the trained adapters (besides the adapter flags), compared on --resume too.
RESULT_FLAGS = ("keep_test_overlap", "max_seq_len", "batch_size", "accum_iter", "epochs", "warmup_epochs", "blr",
                "lr", "min_lr", "weight_decay", "w_bias", "bf16", "seed")


def train_settings(flags: dict[str, Any], adapter_params: dict[str, Any], world_size: int) -> dict[str, Any]:
    """What decides a training run's results: RESULT_FLAGS from `flags` (the training flags as a dict),
    the base model and data (paths and content identity), the test-overlap root, the adapter flags
    and the number of processes."""
    settings = {k: flags.get(k) for k in RESULT_FLAGS}
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
            raise ValueError(f"--output_dir {output_dir} holds a run with other settings ({'; '.join(diff)}); "
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


def check_resume_args(path: str, saved: dict[str, Any], args: dict[str, Any]) -> None:
    """ValueError naming the checkpoint and each RESULT_FLAGS value that differs between the flags
    stored in it (`saved`) and this command's (`args`)."""
    diff = settings_diff({k: saved.get(k) for k in RESULT_FLAGS}, {k: args.get(k) for k in RESULT_FLAGS})
    if diff:
        raise ValueError(f"--resume {path}: it was trained with other settings ({'; '.join(diff)}); resume with "
                         "the same flags, or start over with --overwrite True")


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
