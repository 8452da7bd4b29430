"""Score commonsense predictions: a prediction file and its siblings for the commonsense sets.

    python evaluate_commonsense.py --predict_file DIR/boolq_predict_X.jsonl

Sets: boolq, piqa, social_i_qa, ARC-Challenge, ARC-Easy, openbookqa, winogrande (and
hellaswag when its file exists). Prints a table, writes `<file>_scored.jsonl` beside each
prediction file and appends one line to `DIR/acc_score.jsonl` (rules in moa/eval/scoring.py).
"""
import argparse

from moa.cli import one_line_errors
from moa.eval.scoring import COMMONSENSE_SETS, run_scoring_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predict_file", required=True,
                        help=f"a prediction file of any of {', '.join(COMMONSENSE_SETS)} "
                             "or hellaswag; its siblings are found by swapping the set name "
                             "in the file name")
    return parser


@one_line_errors("evaluate_commonsense.py", status=1)
def main() -> None:
    """Parse the flags, then score and print (moa.eval.scoring.run_scoring_cli)."""
    args = build_parser().parse_args()
    run_scoring_cli("evaluate_commonsense.py", args.predict_file, "commonsense")


if __name__ == "__main__":
    main()
