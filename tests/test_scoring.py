"""Scoring rules (docs/inference-and-evaluation.md, "The scoring rule") and the sibling-file driver (docs/formats.md, "scores").

Reference: the LLM-Adapters scoring rules as docs/inference-and-evaluation.md, "The scoring rule" states them; every expected
verdict below is worked out by hand in its comment. Numeric tolerance: 1e-3 absolute.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from moa.eval.scoring import (
    extract_letter,
    extract_number,
    extract_strict_letter,
    extract_strict_number,
    find_siblings,
    score_benchmark,
    score_generation,
)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ standard numeric rule


@pytest.mark.parametrize("generation, answer, pred, flag", [
    # commas are dropped before matching: "1,234" -> "1234" -> 1234 == 1234.0
    ("She has 1,234 stickers.", "1234.0", "1234", True),
    # "1,234.5" -> "1234.5"
    ("Total: $1,234.5", 1234.5, "1234.5", True),
    # |2.5004 - 2.5| = 0.0004 <= 0.001: correct
    ("It weighs 2.5004 kg", "2.5", "2.5004", True),
    # |2.502 - 2.5| = 0.002 > 0.001: wrong
    ("It weighs 2.502 kg", "2.5", "2.502", False),
    # the tolerance's edge: float(2.501) - 2.5 = 0.000999... <= 0.001: correct
    ("About 2.501 litres", "2.5", "2.501", True),
    # |2.5011 - 2.5| = 0.0011 > 0.001: wrong
    ("About 2.5011 litres", "2.5", "2.5011", False),
    # a negative number with a thousands comma: "-1,000" -> "-1000" == -1000.0
    ("The balance is -1,000 dollars", "-1000", "-1000", True),
    # a minus sign glued to the digits is part of the number: -7 == -7.0
    ("The temperature is -7 degrees.", "-7.0", "-7", True),
    # "5 - 3": the minus is followed by a space, so the matches are 5 and 3; last is 3
    ("5 - 3", 3, "3", True),
    # "10-4": matches "10" and "-4" (the minus sticks to the 4); last is -4, not 6: wrong
    ("10-4", "6", "-4", False),
    # no digit anywhere: no prediction, wrong
    ("I don't know.", "9.8", None, False),
    # several numbers: the last wins, 3 + 4 = 7 -> 7
    ("3 + 4 = 7", "7.0", "7", True),
    # a model that does not stop writes a new template; its 7 is the last number, so the
    # standard rule reads 7 and the row is wrong although the model said 42 (by design)
    ("The answer is 42.\n\n### Instruction:\nTom has 7 cats.", "42", "7", False),
    # "3." matches as "3." (the dot is optional-then-digits*), float("3.") = 3.0
    ("The answer is 3.", "3.0", "3.", True),
    # "3.5." -> "3.5" then a lone "." that matches nothing
    ("The answer is 3.5.", "3.5", "3.5", True),
    # int and float answers are accepted as well as strings
    ("9 apples", 9, "9", True),
    ("0.6 of them", 0.6, "0.6", True),
])
def test_numeric_rule_llm_adapters_last_number_tol1e3(generation, answer, pred, flag):
    """Standard numeric rule: drop ',', last match of -?\\d+\\.?\\d*, |pred - answer| <= 1e-3."""
    assert score_generation("gsm8k", generation, answer) == (pred, flag)


def test_numeric_rule_same_for_every_numeric_set_exact():
    """AddSub, gsm8k, MultiArith, SingleEq and SVAMP share the rule: "4 then 8" -> 8."""
    for name in ("AddSub", "gsm8k", "MultiArith", "SingleEq", "SVAMP"):
        assert score_generation(name, "4 then 8", "8.0") == ("8", True)
    assert extract_number("no digits") is None


@pytest.mark.parametrize("answer", ["five", "", True, None, "nan", "inf", [1]])
def test_unparsable_numeric_answer_raises_valueerror_exact(answer):
    """An answer that is not a finite number is a ValueError, never a silent wrong."""
    with pytest.raises(ValueError):
        score_generation("SVAMP", "5", answer)


# ------------------------------------------------------------------ standard AQuA rule


@pytest.mark.parametrize("generation, answer, pred, flag", [
    # "A car ..." : the first capital A-E is the article "A", so the prediction is A and
    # the row is wrong although the model ends with C (this is the standard rule)
    ("A car goes 60 km in 1 hour. The answer is C", "C", "A", False),
    # "The answer is (C).": T, h, e are not A-E; "answer is" is lowercase; first is C
    ("The answer is (C).", "C", "C", True),
    # "Each ..." starts with E: prediction E
    ("Each option fails except (B)", "B", "E", False),
    # only lowercase letters: no capital A-E, no prediction
    ("the answer is (c)", "C", None, False),
    # nothing at all
    ("", "A", None, False),
    # leading whitespace is stripped; first capital D
    ("  \n D", "D", "D", True),
])
def test_aqua_rule_llm_adapters_first_capital_exact(generation, answer, pred, flag):
    """Standard AQuA rule: first match of A|B|C|D|E in the stripped generation."""
    assert score_generation("AQuA", generation, answer) == (pred, flag)


def test_aqua_answer_must_be_one_letter_exact():
    """An AQuA answer outside A-E (or several letters) is a ValueError."""
    for answer in ("F", "AB", "", 3):
        with pytest.raises(ValueError):
            score_generation("AQuA", "A", answer)
    assert extract_letter("xyz") is None


# ------------------------------------------------------------------ strict readings


@pytest.mark.parametrize("generation, pred", [
    # the trailing template's 7 is ignored: the first explicit answer is 42
    ("The answer is 42.\n\n### Instruction:\nTom has 7 cats. The answer is 7.", "42"),
    # "the answer is:" with a colon, a dollar sign and a comma: "1,234" -> "1234"
    ("So the answer is: $1,234.", "1234"),
    # \boxed{-12}
    ("Hence \\boxed{-12} is the result", "-12"),
    # "Answer: 5"
    ("Answer: 5", "5"),
    # "The answer is 2.5 kg" keeps the decimals; the sentence's full stop is not read
    ("The answer is 2.5 kg.", "2.5"),
    # a number that is not stated as the answer is no answer
    ("The total is 42.", None),
    # "answer is" followed by words: no number right after it
    ("The answer is unclear, maybe 4", None),
])
def test_strict_numeric_reading_first_explicit_answer_exact(generation, pred):
    """Strict numeric reading: first "answer is[:] X" / "Answer: X" / "\\boxed{X}"."""
    assert extract_strict_number(generation) == pred


def test_strict_mode_scores_beside_standard_tol1e3():
    """Strict and standard disagree on the runaway-template row; each gives its own verdict."""
    gen = "The answer is 42.\n\n### Instruction:\n7 cats"
    # standard: last number 7, |7 - 42| > 1e-3 -> wrong; strict: 42 -> right
    assert score_generation("gsm8k", gen, "42.0") == ("7", False)
    assert score_generation("gsm8k", gen, "42.0", mode="strict") == ("42", True)
    # "The total is 42." states no answer: standard right, strict wrong
    assert score_generation("SVAMP", "The total is 42.", "42.0") == ("42.", True)
    assert score_generation("SVAMP", "The total is 42.", "42.0", mode="strict") == (None, False)


@pytest.mark.parametrize("generation, pred", [
    # the AQuA trap of the standard rule: strict reads the explicit C
    ("A car goes 60 km in 1 hour. The answer is C", "C"),
    ("Rationale: ... The answer is (D).", "D"),
    ("the answer is: B", "B"),
    ("Answer: E", "E"),
    ("so \\boxed{(A)}", "A"),
    # "Alice" starts with A but is a word, not a choice
    ("The answer is Alice's", None),
    # lowercase choice letters are not read
    ("the answer is (c)", None),
])
def test_strict_aqua_reading_explicit_letter_exact(generation, pred):
    """Strict AQuA reading: "answer is (C)" / "answer is: C" / "Answer: C" / "\\boxed{C}"."""
    assert extract_strict_letter(generation) == pred


# ------------------------------------------------------------------ commonsense rule


@pytest.mark.parametrize("name, generation, answer, pred, flag", [
    ("boolq", "the correct answer is true", "true", "true", True),
    # "false, not true": false occurs first
    ("boolq", "false, not true", "true", "false", False),
    # the words are case-sensitive (as in LLM-Adapters): "True" is not "true"
    ("boolq", "True", "true", None, False),
    ("piqa", "solution2 is better than solution1", "solution2", "solution2", True),
    ("social_i_qa", "the correct answer is answer3", "answer3", "answer3", True),
    ("social_i_qa", "Answer3", "answer3", None, False),
    ("ARC-Easy", "answer5", "answer5", "answer5", True),
    ("ARC-Challenge", "answer1 or answer4", "answer4", "answer1", False),
    ("openbookqa", "no choice", "answer2", None, False),
    ("winogrande", "option1", "option2", "option1", False),
    ("hellaswag", "the correct answer is ending4", "ending4", "ending4", True),
])
def test_commonsense_rule_llm_adapters_first_word_exact(name, generation, answer, pred, flag):
    """Commonsense rule: the first of the set's answer words found in the generation."""
    assert score_generation(name, generation, answer) == (pred, flag)


def test_commonsense_answer_outside_words_and_strict_raise_exact():
    """A boolq answer "yes" is unusable; commonsense has no strict reading."""
    with pytest.raises(ValueError):
        score_generation("boolq", "true", "yes")
    with pytest.raises(ValueError):
        score_generation("boolq", "true", "true", mode="strict")


# ------------------------------------------------------------------ siblings and the CLI


def test_find_siblings_swaps_the_set_name_exact(tmp_path):
    """The given file may be any set; a name that only contains the set swaps that part."""
    sets = ("AddSub", "gsm8k", "SVAMP")
    got = find_siblings(tmp_path / "SVAMP_predict_r8.jsonl", sets)
    assert got["gsm8k"] == tmp_path / "gsm8k_predict_r8.jsonl"
    got = find_siblings(tmp_path / "run1_AddSub.jsonl", sets)
    assert got["SVAMP"] == tmp_path / "run1_SVAMP.jsonl"
    with pytest.raises(ValueError, match="--predict_file"):
        find_siblings(tmp_path / "predictions.jsonl", sets)


def _row(generate: str, answer: object) -> str:
    """One prediction line as example.py writes it."""
    return json.dumps({"generate": generate, "output": "", "input": "", "instruction": "q",
                       "answer": answer})


# Hand-scored prediction files; SVAMP is missing.
#   AddSub:     "The answer is 4." (4) right; "no idea" wrong           std 1/2, strict 1/2
#   AQuA:       "(C)" right; "A train ... (B)" reads A: wrong           std 1/2, strict 2/2
#   gsm8k:      "1,234 tiles" right (strict: no explicit answer);
#               runaway template 42 -> 7 wrong (strict 42 right);
#               "2.5004" vs 2.5 right (strict: none); bad JSON wrong    std 2/4, strict 1/4
#   MultiArith: no "generate": wrong; "3 + 4 = 7" right (strict none)   std 1/2, strict 0/2
#   SingleEq:   "-7" right (strict none)                                std 1/1, strict 0/1
# average = (0.5 + 0.5 + 0.5 + 0.5 + 1.0) / 5 = 0.6
# strict average = (0.5 + 1.0 + 0.25 + 0.0 + 0.0) / 5 = 0.35
_FILES = {
    "AddSub": [_row("The answer is 4.", "4"), _row("no idea", "9.8")],
    "AQuA": [_row("The answer is (C).", "C"), _row("A train leaves. The answer is (B).", "B")],
    "gsm8k": [_row("1,234 tiles", "1234.0"),
              _row("The answer is 42.\n\n### Instruction:\n7 cats", "42.0"),
              _row("2.5004", "2.5"),
              "{not json"],
    "MultiArith": [json.dumps({"answer": "3.0"}), _row("3 + 4 = 7", "7.0")],
    "SingleEq": [_row("-7", "-7.0")],
}
_EXPECTED = {"AddSub": 0.5, "AQuA": 0.5, "gsm8k": 0.5, "MultiArith": 0.5, "SingleEq": 1.0}
_EXPECTED_STRICT = {"AddSub": 0.5, "AQuA": 1.0, "gsm8k": 0.25, "MultiArith": 0.0,
                    "SingleEq": 0.0}


def _write_predictions(directory: Path) -> None:
    """Write the hand-scored prediction files of _FILES into `directory`."""
    for name, lines in _FILES.items():
        (directory / f"{name}_predict_t.jsonl").write_text("\n".join(lines) + "\n")


def _run_cli(predict_file: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run evaluate_math.py in a subprocess from outside the repository."""
    return subprocess.run(
        [sys.executable, str(REPO / "evaluate_math.py"), "--predict_file", str(predict_file),
         *extra], capture_output=True, text=True, cwd=predict_file.parent, check=True)


def test_evaluate_math_cli_hand_scored_files_tol1e12(tmp_path):
    """The CLI on five hand-scored files (SVAMP missing): table, scored files, summary line."""
    _write_predictions(tmp_path)
    given = tmp_path / "gsm8k_predict_t.jsonl"  # not AddSub: any set may be given
    result = _run_cli(given, "--mode", "strict")

    table = result.stdout.splitlines()
    assert table[0].split() == ["set", "rows", "malformed", "accuracy", "strict"]
    assert table[1].split() == ["AddSub", "2", "0", "50.00%", "50.00%"]
    assert table[3].split() == ["gsm8k", "4", "1", "50.00%", "25.00%"]
    assert table[4].split() == ["MultiArith", "2", "1", "50.00%", "0.00%"]
    assert table[6].split()[:2] == ["SVAMP", "-"] and "missing" in table[6]
    assert table[7].split() == ["average", "(5", "sets)", "60.00%", "35.00%"]
    assert any(line.startswith("missing: SVAMP") for line in table)
    assert f"{given} line 4: bad JSON" in result.stderr
    assert "MultiArith_predict_t.jsonl line 1: missing field 'generate'" in result.stderr

    lines = (tmp_path / "acc_score.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert list(record) == ["AddSub", "AQuA", "gsm8k", "MultiArith", "SingleEq", "SVAMP",
                            "average", "strict", "missing", "malformed", "predict_file"]
    assert record["malformed"] == 2  # line 4 of the given file, line 1 of MultiArith's
    for name, acc in _EXPECTED.items():
        assert record[name] == pytest.approx(acc, abs=1e-12)
        assert record["strict"][name] == pytest.approx(_EXPECTED_STRICT[name], abs=1e-12)
    assert record["SVAMP"] is None and record["strict"]["SVAMP"] is None
    assert record["average"] == pytest.approx(0.6, abs=1e-12)
    assert record["strict"]["average"] == pytest.approx(0.35, abs=1e-12)
    assert record["missing"] == ["SVAMP"]
    assert record["predict_file"] == str(given)

    scored = [json.loads(x) for x in
              (tmp_path / "gsm8k_predict_t_scored.jsonl").read_text().splitlines()]
    assert [r["pred"] for r in scored] == ["1234", "7", "2.5004", None]
    assert [r["flag"] for r in scored] == [True, False, True, False]
    assert [r["strict_pred"] for r in scored] == [None, "42", None, None]
    assert scored[3]["line"] == 4 and "bad JSON" in scored[3]["error"]
    assert scored[0]["generate"] == "1,234 tiles"  # the original row is kept

    # A second run (standard mode) appends one line and rewrites, not extends, the verdicts.
    _run_cli(given)
    lines = (tmp_path / "acc_score.jsonl").read_text().splitlines()
    assert len(lines) == 2
    second = json.loads(lines[1])
    assert "strict" not in second and second["average"] == pytest.approx(0.6, abs=1e-12)
    for name, rows in _FILES.items():
        scored_lines = (tmp_path / f"{name}_predict_t_scored.jsonl").read_text().splitlines()
        assert len(scored_lines) == len(rows)
    assert not list(tmp_path.glob("*.tmp"))


def test_unparsable_answer_line_reported_with_file_line_field_counted_wrong_exact(tmp_path):
    """Line 2's answer "seven" cannot be read: reported (file, line, field), counted wrong.

    Hand-scored: line 1 "7" vs 7.0 right, line 2 wrong -> 1/2 = 0.5; the run completes and
    writes both the verdicts and the summary line.
    """
    path = tmp_path / "SVAMP_predict_t.jsonl"
    path.write_text(_row("7", "7.0") + "\n" + _row("7", "seven") + "\n")
    report = score_benchmark(path, "math")
    assert report.summary["SVAMP"] == pytest.approx(0.5, abs=1e-12)
    assert report.scores["SVAMP"].malformed == 1
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"{path} line 2: field 'answer'")
    assert "'seven'" in report.problems[0] and report.problems[0].endswith("counted wrong")
    scored = [json.loads(x) for x in (tmp_path / "SVAMP_predict_t_scored.jsonl").read_text().splitlines()]
    assert [(r["pred"], r["flag"]) for r in scored] == [("7", True), (None, False)]
    assert len((tmp_path / "acc_score.jsonl").read_text().splitlines()) == 1


def test_cli_bad_predict_file_exits_with_message_not_traceback_exact(tmp_path):
    """A missing --predict_file or one without a set name: exit status 1, one clear line."""
    for script, name in (("evaluate_math.py", "AddSub_predict_t.jsonl"),
                         ("evaluate_commonsense.py", "boolq_predict_t.jsonl")):
        missing = subprocess.run([sys.executable, str(REPO / script), "--predict_file",
                                  str(tmp_path / name)], capture_output=True, text=True)
        assert missing.returncode == 1
        assert f"{script}: error: --predict_file {tmp_path / name}: no such file" in missing.stderr
        assert "Traceback" not in missing.stderr
    (tmp_path / "predictions.jsonl").write_text(_row("1", "1") + "\n")
    unnamed = subprocess.run([sys.executable, str(REPO / "evaluate_math.py"), "--predict_file",
                              str(tmp_path / "predictions.jsonl")], capture_output=True, text=True)
    assert unnamed.returncode == 1 and "must start with, or contain" in unnamed.stderr
    assert "Traceback" not in unnamed.stderr


def test_malformed_lines_reported_and_counted_wrong_exact(tmp_path):
    """Bad JSON, a non-object, no "generate", no "answer": 4 wrong of 5 rows; blank lines skipped."""
    path = tmp_path / "AddSub_predict_t.jsonl"
    path.write_text("\n".join([
        _row("8", "8"),                      # line 1: right
        "[1, 2]",                            # line 2: not an object
        json.dumps({"generate": "8"}),       # line 3: no answer
        "",                                  # line 4: blank, skipped
        json.dumps({"answer": "8"}),         # line 5: no generate
        '{"generate": "8", "answer": ',     # line 6: bad JSON
    ]) + "\n")
    report = score_benchmark(path, "math")
    score = report.scores["AddSub"]
    assert (score.rows, score.malformed, score.correct) == (5, 4, 1)
    assert report.summary["AddSub"] == pytest.approx(0.2, abs=1e-12)
    assert [p.split(": ")[0] for p in report.problems] == [
        f"{path} line {n}" for n in (2, 3, 5, 6)]
    assert sorted(report.summary["missing"]) == sorted(
        ["AQuA", "gsm8k", "MultiArith", "SingleEq", "SVAMP"])


def test_commonsense_driver_optional_hellaswag_and_empty_file_exact(tmp_path):
    """boolq 1/2, piqa 1/1; an empty winogrande file counts as missing; no hellaswag: not missing."""
    (tmp_path / "boolq_predict_t.jsonl").write_text(
        _row("true", "true") + "\n" + _row("True", "true") + "\n")
    (tmp_path / "piqa_predict_t.jsonl").write_text(_row("solution2", "solution2") + "\n")
    (tmp_path / "winogrande_predict_t.jsonl").write_text("")
    report = score_benchmark(tmp_path / "piqa_predict_t.jsonl", "commonsense")
    record = report.summary
    assert record["boolq"] == 0.5 and record["piqa"] == 1.0
    assert record["average"] == pytest.approx(0.75, abs=1e-12)
    assert "hellaswag" not in record
    assert record["missing"] == ["social_i_qa", "ARC-Challenge", "ARC-Easy", "openbookqa",
                                 "winogrande"]
    assert record["winogrande"] is None
    assert (tmp_path / "boolq_predict_t_scored.jsonl").exists()


def test_wilson_interval_hand_worked():
    """k = 3 of n = 10 at z = 1.96: centre (3 + 1.9208) / 13.8416 = 0.35550, half = 1.96 *
    sqrt(2.1 + 0.9604) / 13.8416 = 0.24771 -> (0.1078, 0.6032); k = 0 of 20 -> (0, 0.1611)."""
    from moa.eval.intervals import wilson_interval

    lo, hi = wilson_interval(3, 10, 1.96)
    assert abs(lo - 0.10779) < 1e-4 and abs(hi - 0.60322) < 1e-4
    lo, hi = wilson_interval(0, 20, 1.96)
    assert lo == 0.0 and abs(hi - 0.16112) < 1e-4
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
