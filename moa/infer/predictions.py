"""The prediction file (docs/formats.md, "predictions") and the partial files that make it resumable.

One JSON object per test row, in the test file's order: `generate, output, input, instruction,
answer` first, then the row's other fields, then what inference adds (`prompt_tokens`,
`generate_tokens`, `finish`, `truncated`).

Resumable, atomic output: each rank appends finished rows (with their test-row index) to its own
partial file beside the prediction file (`<save_path>.partial`, or `.partial.rankK` under
torchrun), flushed after every batch; its first line records the settings that shape the
predictions. A rerun with the same settings skips the rows found in any partial file (a truncated
last line, left by a kill, is dropped). When every row is done, rank 0 writes the prediction file
in test order under a temporary name, renames it into place and deletes the partial files.

Beside a complete file, `<save_path>.settings.json` (moa/files/settings.py) records the settings that
decided it and the SHA-256 of its content (renamed into place just before the file itself). A rerun
with equal settings leaves the file alone (and drops partial files a kill after the final rename
left); one with other settings, or a file that no sidecar describes, stops with a one-line error
unless `overwrite`. A second line equal to a partial file's header (two runs that both started it)
is skipped.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

from moa.atomic import atomic_write_files
from moa.files.settings import RESOLVED_SUFFIX, read_sidecar, settings_diff, sidecar_path, sidecar_record

PARTIAL_SUFFIX = ".partial"
# Fields every prediction line starts with, then the row's other fields, then what inference adds.
PREDICTION_FIELDS = ("generate", "output", "input", "instruction", "answer")


def prediction_record(row: dict, text: str, prompt_tokens: int, n_new: int, finish: str,
                      truncated: Optional[str]) -> dict:
    """One line of the prediction file: the documented fields first, then the row's others, then ours.

    text: the decoded new tokens; prompt_tokens / n_new: token counts of the prompt (BOS included)
    and of the kept generation; finish: "stop", "max_gen_len" or "max_seq_len"; truncated: None,
    "input" or "prompt_left" (how the prompt was shortened).
    """
    record = {field: row.get(field) for field in PREDICTION_FIELDS}
    record["generate"] = text
    record.update({k: v for k, v in row.items() if k not in record})
    record.update(prompt_tokens=prompt_tokens, generate_tokens=n_new, finish=finish, truncated=truncated)
    return record


def partial_path(save_path: str | os.PathLike, rank: int, world_size: int) -> Path:
    """This rank's partial file: `<save_path>.partial` (one process) or `<save_path>.partial.rankK`."""
    suffix = PARTIAL_SUFFIX if world_size == 1 else f"{PARTIAL_SUFFIX}.rank{rank}"
    return Path(f"{os.fspath(save_path)}{suffix}")


def partial_files(save_path: str | os.PathLike) -> list[Path]:
    """Every partial file of `save_path` (any rank, any earlier world size), sorted by name."""
    save = Path(save_path)
    pattern = re.compile(re.escape(save.name + PARTIAL_SUFFIX) + r"(\.rank\d+)?")
    if not save.parent.is_dir():
        return []
    return sorted(p for p in save.parent.iterdir() if pattern.fullmatch(p.name) and p.is_file())


def partial_header(save_path: str | os.PathLike, settings: dict) -> dict:
    """The first line of a partial file: which prediction file it belongs to and the settings that
    shaped its rows (a rerun resumes only with equal settings)."""
    return {"partial_of": os.path.basename(os.fspath(save_path)), "settings": settings}


def _read_header(path: Path, line: str) -> dict:
    """The settings of a partial file's first line; ValueError naming the file when it has none."""
    try:
        header = json.loads(line)
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or not isinstance(header.get("settings"), dict):
        raise ValueError(f"{path}: not a partial prediction file (no settings line); remove it or rerun "
                         "with --overwrite True")
    return header["settings"]


def _check_header(path: Path, recorded: dict, settings: dict) -> None:
    """ValueError naming the differing settings when a partial file was written with other ones."""
    diff = settings_diff(recorded, settings) or [
        f"{k} {recorded[k]!r} -> {v!r}" for k, v in settings.items()
        if k.endswith(RESOLVED_SUFFIX) and k in recorded and recorded[k] != v]  # never rows of two dtypes
    if diff:
        raise ValueError(f"{path}: an interrupted run with other settings ({'; '.join(diff)}) left this "
                         "partial file; rerun with its settings to resume it, or with --overwrite True to "
                         "start over")


def read_partials(save_path: str | os.PathLike, settings: dict, rows: list[dict],
                  repair: bool = False) -> dict[int, dict]:
    """{test-row index: record} of the rows finished in the partial files of `save_path`.

    A last line without its newline (the write a kill interrupted) is ignored, and with `repair`
    cut off the file, so that appending continues on a clean line. A repeated header line is skipped.
    A file written with other `settings`, a malformed complete line, or a record whose instruction/input differs from its
    test row is a ValueError naming the file (and line).
    """
    done: dict[int, dict] = {}
    for path in partial_files(save_path):
        data = path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if repair and len(complete) < len(data):
            if complete:
                os.truncate(path, len(complete))
            else:
                path.unlink()
        lines = complete.decode("utf-8").splitlines()
        if not lines:
            continue
        _check_header(path, _read_header(path, lines[0]), settings)
        for number, line in enumerate(lines[1:], start=2):
            if line == lines[0]:
                continue
            try:
                record = json.loads(line)
                index = record.pop("index")
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
                raise ValueError(f"{path} line {number}: not a prediction record with an 'index'; remove the "
                                 "file or rerun with --overwrite True") from None
            if not isinstance(index, int) or not 0 <= index < len(rows):
                raise ValueError(f"{path} line {number}: index {index!r} is not a row of the test file "
                                 f"({len(rows)} rows); rerun with --overwrite True")
            row = rows[index]
            if record.get("instruction") != row["instruction"] or record.get("input") != row.get("input"):
                raise ValueError(f"{path} line {number}: its instruction/input differ from test row {index}: "
                                 "the test file changed since; rerun with --overwrite True")
            done.setdefault(index, record)
    return done


def merge_partials(save_path: str | os.PathLike, settings: dict, rows: list[dict]) -> dict[str, int]:
    """Write the prediction file from the partial files (test order, atomically), delete them, and
    return the counts of `finish` and `truncated` values over all rows. ValueError if a row is missing."""
    found = read_partials(save_path, settings, rows)
    missing = [i for i in range(len(rows)) if i not in found]
    if missing:
        raise ValueError(f"{save_path}: rows {missing[:20]} of {len(rows)} are in no partial file; rerun to "
                         "generate them")
    records = [found[i] for i in range(len(rows))]
    write_with_sidecar(save_path, settings, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    for path in partial_files(save_path):
        path.unlink()
    finish = [r.get("finish") for r in records]
    truncated = [r.get("truncated") for r in records]
    return {"hit_max_seq_len": finish.count("max_seq_len"), "hit_max_gen_len": finish.count("max_gen_len"),
            "truncated_input": truncated.count("input"), "truncated_prompt_left": truncated.count("prompt_left")}


def write_with_sidecar(save_path: str | os.PathLike, settings: dict, text: str) -> None:
    """Write `text` to `save_path` and its settings sidecar: both complete under temporary names, the
    sidecar renamed into place first (a kill between the renames leaves a sidecar that describes no
    file, so the old file, if any, is never taken for the new one)."""
    content = text.encode("utf-8")
    sidecar = sidecar_record(settings, content)

    def write_sidecar(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(sidecar, f, indent=2, ensure_ascii=False)
            f.write("\n")

    def write_content(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(content)

    atomic_write_files({sidecar_path(save_path): write_sidecar, os.fspath(save_path): write_content})


def remove_output(save_path: str | os.PathLike) -> None:
    """Delete an output file, its sidecar and its partial files (--overwrite True)."""
    for path in [Path(save_path), Path(sidecar_path(save_path)), *partial_files(save_path)]:
        if path.is_file():
            path.unlink()


def _drop_finished_partials(save_path: str | os.PathLike, settings: dict) -> None:
    """Delete the partial files of a complete output written with `settings` (a kill after the final
    rename left them); partial files of other settings stay."""
    for path in partial_files(save_path):
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
        try:
            _check_header(path, _read_header(path, first), settings)
        except ValueError:
            continue
        path.unlink()


def complete_already(save_path: str | os.PathLike, settings: dict, n_rows: int, overwrite: bool,
                     tool: str) -> bool:
    """Decide what to do with an existing output before a run starts: True when `save_path` holds a
    complete output written with `settings` (left alone), False when the run is to (re)write it.

    Creates its folder. `overwrite` deletes the file, its sidecar and partial files. ValueError naming
    the path when it is a directory, has no sidecar that describes it (not `tool`'s output, or an
    older version's), was written with other settings (naming each difference), or has another
    number of lines than `n_rows`.
    """
    save = Path(save_path)
    if save.is_dir():
        raise ValueError(f"--save_path {save} is a directory; expected a .jsonl file name")
    save.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        remove_output(save)
        return False
    if not save.exists():
        return False
    recorded = read_sidecar(save)
    if recorded is None:
        raise ValueError(f"--save_path {save} exists but no {Path(sidecar_path(save)).name} records that {tool} "
                         "wrote it with these settings (another program's file, or an older version's); "
                         "rerun with --overwrite True to replace it, or give another --save_path")
    diff = settings_diff(recorded, settings)
    if diff:
        raise ValueError(f"--save_path {save} was written with other settings ({'; '.join(diff)}); rerun "
                         "with --overwrite True to replace it, or give another --save_path")
    n = count_lines(save)
    if n != n_rows:
        raise ValueError(f"--save_path {save} has {n} lines for {n_rows} test rows; rerun with --overwrite True")
    _drop_finished_partials(save, settings)
    return True


def recorded_settings(save_path: str | os.PathLike, settings: dict) -> Optional[tuple[dict, str]]:
    """(settings, file) recorded by an earlier run with the same requested `settings` (`settings_diff`
    finds no difference): the complete output's sidecar when it describes the file, else the first
    partial file's header; None when there is none. A rerun adopts the automatic choices recorded
    there (`<flag>_resolved`) instead of choosing again."""
    candidates: list[tuple[Optional[dict], str]] = []
    if Path(save_path).is_file():
        candidates.append((read_sidecar(save_path), sidecar_path(save_path)))
    for path in partial_files(save_path):
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
        try:
            candidates.append((_read_header(path, first), os.fspath(path)))
        except ValueError:
            continue
    for recorded, where in candidates:
        if recorded is not None and not settings_diff(recorded, settings):
            return recorded, where
    return None


def count_lines(path: str | os.PathLike) -> int:
    """Number of non-blank lines of a text file."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())
