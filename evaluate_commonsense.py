"""Score commonsense predictions: a prediction file and its siblings for the commonsense sets.

    python evaluate_commonsense.py --predict_file DIR/boolq_predict_X.jsonl

Sets: boolq, piqa, social_i_qa, ARC-Challenge, ARC-Easy, openbookqa, winogrande (and
hellaswag when its file exists). Prints a table, writes `<file>_scored.jsonl` beside each
prediction file and appends one line to `DIR/acc_score.jsonl` (rules in moa/scoring.py).
"""
import argparse
import sys

from moa.scoring import COMMONSENSE_SETS, format_report, score_benchmark


def main() -> None:
    """Parse the flags, score, print the malformed lines (stderr) and the table (stdout)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predict_file", required=True,
                        help=f"a prediction file of any of {', '.join(COMMONSENSE_SETS)} "
                             "or hellaswag; its siblings are found by swapping the set name "
                             "in the file name")
    args = parser.parse_args()
    try:
        report = score_benchmark(args.predict_file, "commonsense")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"evaluate_commonsense.py: error: {e}")
    for problem in report.problems:
        print(problem, file=sys.stderr)
    print(format_report(report))


if __name__ == "__main__":
    main()
