"""The scoring rules (docs/inference-and-evaluation.md, "The scoring rule"): what a generation predicts for a set, and whether that
prediction is right. The standard rules are the LLM-Adapters rules that the MoA paper's numbers
use; the strict rules (math only) read an explicit final answer and are reported beside them.

Pure Python (no torch). The files and the reports built on these rules: moa/eval/scoring.py.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

MATH_SETS: tuple[str, ...] = ("AddSub", "AQuA", "gsm8k", "MultiArith", "SingleEq", "SVAMP")
COMMONSENSE_SETS: tuple[str, ...] = (
    "boolq", "piqa", "social_i_qa", "ARC-Challenge", "ARC-Easy", "openbookqa", "winogrande",
)
# Scored when its prediction file exists; never reported as missing.
OPTIONAL_COMMONSENSE_SETS: tuple[str, ...] = ("hellaswag",)

TOLERANCE = 1e-3  # |prediction - answer| <= TOLERANCE counts as correct (LLM-Adapters)

Mode = Literal["standard", "strict"]
Benchmark = Literal["math", "commonsense"]

# The standard math rules, exactly as LLM-Adapters wrote them: any number, the last wins;
# AQuA: any capital A-E, the first wins (so "A car ..." reads as "A"; that is the standard).
_NUMBER_RE = re.compile(r"-?\d+\.?\d*")
_LETTER_RE = re.compile(r"A|B|C|D|E")

# Strict readings: only an explicit final answer. The FIRST such statement wins: a model
# that does not stop goes on to write a new "### Instruction:" with answers of its own,
# so the first explicit answer is the one it gave to this question.
_STRICT_NUMBER_RE = re.compile(
    r"(?i:\banswer is)\s*:?\s*\$?\s*(?P<is>-?\d+(?:\.\d+)?)"
    r"|(?i:\banswer)\s*:\s*\$?\s*(?P<colon>-?\d+(?:\.\d+)?)"
    r"|\\boxed\{\s*\$?\s*(?P<boxed>-?\d+(?:\.\d+)?)"
)
_STRICT_LETTER_RE = re.compile(
    r"(?i:\banswer is)\s*:?\s*\(?(?P<is>[A-E])(?![A-Za-z])"
    r"|(?i:\banswer)\s*:\s*\(?(?P<colon>[A-E])(?![A-Za-z])"
    r"|\\boxed\{\s*\(?(?P<boxed>[A-E])\)?\s*\}"
)

# The answer words of each commonsense set (checked against data/commonsense/*/test.json:
# ARC-Easy has one row with answer5, so every answer-numbered set takes answer1..answer5).
_ANSWER_NUMBERS = ("answer1", "answer2", "answer3", "answer4", "answer5")
COMMONSENSE_WORDS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": _ANSWER_NUMBERS,
    "ARC-Challenge": _ANSWER_NUMBERS,
    "ARC-Easy": _ANSWER_NUMBERS,
    "openbookqa": _ANSWER_NUMBERS,
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
}


def extract_number(generation: str) -> str | None:
    """Standard numeric reading: the last match of `-?\\d+\\.?\\d*` after dropping every `,`.

    Returns the matched text (e.g. "1234", "3.") or None when there is no number.
    """
    matches = _NUMBER_RE.findall(generation.replace(",", ""))
    return matches[-1] if matches else None


def extract_letter(generation: str) -> str | None:
    """Standard AQuA reading: the first capital A-E in the stripped generation, or None."""
    match = _LETTER_RE.search(generation.strip())
    return match.group(0) if match else None


def extract_strict_number(generation: str) -> str | None:
    """Strict numeric reading: the first "answer is[:] X", "Answer: X" or "\\boxed{X}".

    Commas are dropped first and a leading `$` is allowed; returns the number's text
    (a trailing full stop is not part of it) or None when no explicit answer is stated.
    """
    match = _STRICT_NUMBER_RE.search(generation.replace(",", ""))
    return _first_group(match)


def extract_strict_letter(generation: str) -> str | None:
    """Strict AQuA reading: the first "answer is (C)" / "answer is: C" / "Answer: C" / "\\boxed{C}".

    The letter must be a capital A-E standing alone ("answer is Alice" is no answer).
    """
    return _first_group(_STRICT_LETTER_RE.search(generation))


def extract_word(generation: str, words: Sequence[str]) -> str | None:
    """Commonsense reading: the first occurrence of any of `words` (case-sensitive), or None."""
    match = re.search("|".join(re.escape(w) for w in words), generation)
    return match.group(0) if match else None


def _first_group(match: re.Match[str] | None) -> str | None:
    """The text of whichever named group of an alternation matched."""
    if match is None:
        return None
    return next(v for v in match.groupdict().values() if v is not None)


def parse_number_answer(raw: object) -> float:
    """A numeric set's `answer` field (str, int or float, e.g. "5.0", 9, 0.6) as a finite float.

    Raises ValueError when it is anything else.
    """
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ValueError(f"expected a number or a numeric string, got {raw!r}")
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except ValueError:
        raise ValueError(f"expected a number or a numeric string, got {raw!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {raw!r}")
    return value


def number_is_correct(pred: str | None, answer: float) -> bool:
    """True when the predicted number is within TOLERANCE of the answer (None: wrong)."""
    if pred is None:
        return False
    return abs(float(pred) - answer) <= TOLERANCE


@dataclass(frozen=True)
class Rule:
    """How one set is scored.

    extract: generation -> prediction text or None (standard reading).
    strict_extract: the strict reading, or None for sets that have none.
    parse_answer: the row's `answer` field -> the value compared (ValueError if unusable).
    is_correct: (prediction, parsed answer) -> verdict.
    """

    extract: Callable[[str], str | None]
    strict_extract: Callable[[str], str | None] | None
    parse_answer: Callable[[object], object]
    is_correct: Callable[[str | None, object], bool]


def _choice_answer_parser(choices: Sequence[str]) -> Callable[[object], str]:
    """A parser that accepts exactly one of `choices` as the answer field."""

    def parse(raw: object) -> str:
        if not isinstance(raw, str) or raw.strip() not in choices:
            raise ValueError(f"expected one of {'/'.join(choices)}, got {raw!r}")
        return raw.strip()

    return parse


def _equal(pred: str | None, answer: object) -> bool:
    """Exact match of the prediction with the answer (None: wrong)."""
    return pred is not None and pred == answer


_NUMBER_RULE = Rule(extract_number, extract_strict_number, parse_number_answer, number_is_correct)
_LETTER_RULE = Rule(extract_letter, extract_strict_letter, _choice_answer_parser(("A", "B", "C", "D", "E")), _equal)


def rule_for(set_name: str) -> Rule:
    """The scoring rule of a math or commonsense set, by its name (e.g. "gsm8k", "piqa")."""
    if set_name == "AQuA":
        return _LETTER_RULE
    if set_name in MATH_SETS:
        return _NUMBER_RULE
    if set_name in COMMONSENSE_WORDS:
        words = COMMONSENSE_WORDS[set_name]
        return Rule(lambda g: extract_word(g, words), None, _choice_answer_parser(words), _equal)
    raise ValueError(f"unknown set {set_name!r}: expected one of "
                     f"{', '.join(MATH_SETS + tuple(COMMONSENSE_WORDS))}")


def score_generation(set_name: str, generation: str, answer: object,
                     mode: Mode = "standard") -> tuple[str | None, bool]:
    """Score one generation against one answer field: returns (prediction text or None, correct).

    mode "strict" uses the strict reading (math sets only). Raises ValueError for an
    unusable answer or a set without a strict reading.
    """
    rule = rule_for(set_name)
    extract = rule.extract if mode == "standard" else rule.strict_extract
    if extract is None:
        raise ValueError(f"set {set_name!r} has no strict reading")
    pred = extract(generation)
    return pred, rule.is_correct(pred, rule.parse_answer(answer))
