"""Scoring of prediction files for the math and commonsense benchmarks (docs/formats.md "scores", docs/inference-and-evaluation.md "the scoring rule").

Pure Python (no torch), so scoring runs anywhere the prediction files are.

Two halves:
- the rules (moa/eval/rules.py, whose names are importable from here too): what a generation
  predicts for a set, and whether that prediction is right.
- the driver (here): from one prediction file, find its siblings for the other sets of the
  benchmark, score each, write per-row verdicts beside each file, append one summary line
  to `acc_score.jsonl` in the same directory, and return a printable report.

Accuracies are fractions in [0, 1]. A set with no prediction file, or an empty one, is
"missing": its key in the summary line is `null` and it is named in `"missing"`; the
average is the unweighted mean over the sets that were scored.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from moa.atomic import atomic_write_text
from moa.checks import check_writable
from moa.eval.rules import (  # noqa: F401
    COMMONSENSE_SETS,
    COMMONSENSE_WORDS,
    MATH_SETS,
    OPTIONAL_COMMONSENSE_SETS,
    TOLERANCE,
    Benchmark,
    Mode,
    Rule,
    extract_letter,
    extract_number,
    extract_strict_letter,
    extract_strict_number,
    extract_word,
    number_is_correct,
    parse_number_answer,
    rule_for,
    score_generation,
)

SUMMARY_FILE = "acc_score.jsonl"
SCORED_SUFFIX = "_scored"


@dataclass
class SetScore:
    """The result of scoring one prediction file.

    rows: non-blank lines read; malformed: how many of them could not be scored (counted
    wrong); correct / strict_correct: rows right under the standard / strict reading
    (strict_correct is None when the strict reading was not asked for).
    """

    name: str
    path: Path
    rows: int = 0
    malformed: int = 0
    correct: int = 0
    strict_correct: int | None = None
    scored_rows: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """Fraction of rows correct under the standard reading."""
        return self.correct / self.rows

    @property
    def strict_accuracy(self) -> float | None:
        """Fraction of rows correct under the strict reading, or None if not scored."""
        return None if self.strict_correct is None else self.strict_correct / self.rows


@dataclass
class Report:
    """Everything one scoring run produced: per-set scores, missing sets, the summary line."""

    predict_file: Path
    sets: tuple[str, ...]
    scores: dict[str, SetScore]
    missing: dict[str, str]  # set name -> why (no file / empty file)
    strict: bool
    summary: dict

    @property
    def problems(self) -> list[str]:
        """Every malformed-line message, in set order."""
        return [p for s in self.scores.values() for p in s.problems]


def find_siblings(predict_file: Path, sets: Sequence[str]) -> dict[str, Path]:
    """The prediction file of every set in `sets`, by swapping the set name in the file name.

    The file name must start with a set name (`AddSub_predict_X.jsonl`) or contain exactly
    one; only that occurrence is swapped. Returns every candidate path, existing or not.
    """
    name = predict_file.name
    found = [s for s in sets if name.startswith(s)]
    start = 0
    if not found:
        found = [s for s in sets if s in name]
        if len(found) != 1:
            raise ValueError(
                f"--predict_file {predict_file}: its file name must start with, or contain "
                f"exactly one of, the set names {', '.join(sets)} (found {found or 'none'})")
        start = name.index(found[0])
    current = found[0]
    head, tail = name[:start], name[start + len(current):]
    return {s: predict_file.with_name(head + s + tail) for s in sets}


def scored_path(predict_file: Path) -> Path:
    """Where the per-row verdicts of a prediction file go: `X.jsonl` -> `X_scored.jsonl`."""
    return predict_file.with_name(predict_file.stem + SCORED_SUFFIX + predict_file.suffix)


def read_jsonl(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """Yield (1-based line number, row, error) for each non-blank line of a JSONL file.

    row is None and error says why when the line is not a JSON object.
    """
    # Undecodable bytes become U+FFFD: the line is still scored rather than stopping the run.
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield number, None, f"bad JSON ({e.msg} at column {e.colno})"
                continue
            if not isinstance(row, dict):
                yield number, None, f"expected a JSON object, got {type(row).__name__}"
                continue
            yield number, row, None


def _row_problem(row: dict) -> str | None:
    """Why a parsed row cannot be scored (missing or non-string fields), or None."""
    if not isinstance(row.get("generate"), str):
        return "missing field 'generate' (or not a string)"
    if row.get("answer") is None:
        return "missing field 'answer'"
    return None


def score_file(name: str, path: Path, strict: bool) -> SetScore:
    """Score every line of one prediction file with its set's rule.

    Malformed lines (not a JSON object, no string `generate`, no `answer`, or an `answer`
    the set's rule cannot read, e.g. "seven" for a numeric set) are recorded with file,
    line and field in `problems` and counted wrong; scoring goes on.
    """
    rule = rule_for(name)
    score = SetScore(name, path, strict_correct=0 if strict else None)
    for number, row, error in read_jsonl(path):
        score.rows += 1
        error = error or _row_problem(row)
        answer = None
        if error is None:
            try:
                answer = rule.parse_answer(row["answer"])
            except ValueError as e:
                error = f"field 'answer': {e}"
        if error is not None:
            score.malformed += 1
            score.problems.append(f"{path} line {number}: {error}; counted wrong")
            verdict = {"pred": None, "flag": False, "error": error, "line": number}
            if strict:
                verdict.update(strict_pred=None, strict_flag=False)
            score.scored_rows.append({**(row or {}), **verdict})
            continue
        pred = rule.extract(row["generate"])
        flag = rule.is_correct(pred, answer)
        score.correct += flag
        verdict = {"pred": pred, "flag": flag}
        if strict and rule.strict_extract is not None:
            strict_pred = rule.strict_extract(row["generate"])
            strict_flag = rule.is_correct(strict_pred, answer)
            score.strict_correct += strict_flag
            verdict.update(strict_pred=strict_pred, strict_flag=strict_flag)
        score.scored_rows.append({**row, **verdict})
    return score


def write_jsonl_atomic(path: Path, rows: Sequence[dict]) -> None:
    """Write `rows` as JSONL to `path` through a temporary file in the same directory + rename."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def append_summary(path: Path, record: dict) -> None:
    """Append one JSON line to `path` in a single write."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _accuracies(sets: Sequence[str], scores: dict[str, SetScore],
                accuracy: Callable[[SetScore], float | None]) -> dict[str, float | None]:
    """{set: accuracy or None (missing), ..., "average": mean over scored sets or None}."""
    values: dict[str, float | None] = {
        s: (accuracy(scores[s]) if s in scores else None) for s in sets}
    present = [v for v in values.values() if v is not None]
    values["average"] = sum(present) / len(present) if present else None
    return values


def summary_record(predict_file: Path, sets: Sequence[str], scores: dict[str, SetScore],
                   missing: Sequence[str], strict: bool) -> dict:
    """The `acc_score.jsonl` line: per-set accuracies, average, ["strict"], missing, malformed (lines
    counted wrong, all sets), predict_file."""
    record: dict = _accuracies(sets, scores, lambda s: s.accuracy)
    if strict:
        record["strict"] = _accuracies(sets, scores, lambda s: s.strict_accuracy)
    record["missing"] = list(missing)
    record["malformed"] = sum(s.malformed for s in scores.values())
    record["predict_file"] = str(predict_file)
    return record


def score_benchmark(predict_file: str | os.PathLike, benchmark: Benchmark,
                    mode: Mode = "standard") -> Report:
    """Score a prediction file and its siblings, write the verdicts and append the summary.

    Writes `<file>_scored.jsonl` beside every scored file (overwritten) and appends one
    line to `acc_score.jsonl` in the file's directory. A bad `--predict_file` (no such
    file, a scored file, a name without a set name, a file without prediction lines, a folder this
    user cannot write) is a FileNotFoundError / ValueError; then nothing is written.
    """
    path = Path(predict_file)
    if not path.is_file():
        raise FileNotFoundError(f"--predict_file {path}: no such file")
    if path.stem.endswith(SCORED_SUFFIX):
        raise ValueError(f"--predict_file {path}: this is a scored file; "
                         "give the prediction file it was made from")
    if mode not in ("standard", "strict"):
        raise ValueError(f"--mode {mode!r}: expected 'standard' or 'strict'")
    if benchmark == "math":
        required, optional = MATH_SETS, ()
    elif benchmark == "commonsense":
        required, optional = COMMONSENSE_SETS, OPTIONAL_COMMONSENSE_SETS
    else:
        raise ValueError(f"benchmark {benchmark!r}: expected 'math' or 'commonsense'")
    strict = mode == "strict"
    if strict and benchmark != "math":
        raise ValueError("--mode strict: only the math benchmark has a strict reading")
    siblings = find_siblings(path, required + optional)
    check_writable("predict_file", scored_path(path), given=path)  # the scored files and acc_score.jsonl go beside it
    scores: dict[str, SetScore] = {}
    missing: dict[str, str] = {}
    for name, sibling in siblings.items():
        if not sibling.is_file():
            if name in required:
                missing[name] = f"no file {sibling}"
            continue
        score = score_file(name, sibling, strict)
        if score.rows == 0:
            missing[name] = f"empty file {sibling}"
            continue
        scores[name] = score
    if any(siblings[name] == path for name in missing):
        raise ValueError(f"--predict_file {path}: no prediction lines (an empty file); nothing scored")
    sets = required + tuple(s for s in optional if s in scores)
    for score in scores.values():
        write_jsonl_atomic(scored_path(score.path), score.scored_rows)
    record = summary_record(path, sets, scores, list(missing), strict)
    append_summary(path.parent / SUMMARY_FILE, record)
    return Report(path, sets, scores, missing, strict, record)


def _percent(value: float | None) -> str:
    """A fraction as a percentage with two decimals, or "-" for None."""
    return "-" if value is None else f"{100 * value:.2f}%"


def format_report(report: Report) -> str:
    """The printed table: one line per set (rows, malformed, accuracy [, strict]), the average,
    and the missing sets with the reason."""
    header = f"{'set':<14}{'rows':>7}{'malformed':>11}{'accuracy':>10}"
    if report.strict:
        header += f"{'strict':>10}"
    lines = [header]
    for name in report.sets:
        score = report.scores.get(name)
        if score is None:
            line = f"{name:<14}{'-':>7}{'-':>11}{'missing':>10}"
            line += f"{'-':>10}" if report.strict else ""
        else:
            line = (f"{name:<14}{score.rows:>7}{score.malformed:>11}"
                    f"{_percent(score.accuracy):>10}")
            line += f"{_percent(score.strict_accuracy):>10}" if report.strict else ""
        lines.append(line)
    n_present = len(report.scores)
    line = f"{f'average ({n_present} sets)':<32}{_percent(report.summary['average']):>10}"
    if report.strict:
        line += f"{_percent(report.summary['strict']['average']):>10}"
    lines.append(line)
    lines += [f"missing: {name} ({why})" for name, why in report.missing.items()]
    lines.append(f"appended to {report.predict_file.parent / SUMMARY_FILE}")
    return "\n".join(lines)


def run_scoring_cli(prog: str, predict_file: str, benchmark: Benchmark, mode: Mode = "standard") -> None:
    """What evaluate_math.py / evaluate_commonsense.py do once their flags are parsed: score, print
    the malformed lines (stderr) and the table (stdout); a user mistake exits with one line."""
    try:
        report = score_benchmark(predict_file, benchmark, mode)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"{prog}: error: {e}")
    for problem in report.problems:
        print(problem, file=sys.stderr)
    print(format_report(report))
    malformed = report.summary["malformed"]
    if malformed:
        print(f"{prog}: warning: {malformed} malformed prediction line(s) counted wrong (listed above; "
              f"\"malformed\" in {report.predict_file.parent / SUMMARY_FILE})", file=sys.stderr)
