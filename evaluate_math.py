"""Score math predictions: a prediction file and its siblings for the six math sets.

    python evaluate_math.py --predict_file DIR/AddSub_predict_X.jsonl [--mode strict]

Prints a table, writes `<file>_scored.jsonl` beside each prediction file and appends one
line to `DIR/acc_score.jsonl` (docs/formats.md "scores", docs/inference-and-evaluation.md "the scoring rule"; the rules live in moa/eval/scoring.py).
"""
import argparse

from moa.cli import one_line_errors
from moa.eval.scoring import MATH_SETS, run_scoring_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predict_file", required=True,
                        help=f"a prediction file of any of {', '.join(MATH_SETS)}; "
                             "its siblings are found by swapping the set name in the file name")
    parser.add_argument("--mode", choices=("standard", "strict"), default="standard",
                        help="strict also reads only an explicit final answer and reports it "
                             "beside the standard score (never instead of it)")
    return parser


@one_line_errors("evaluate_math.py", status=1)
def main() -> None:
    """Parse the flags, then score and print (moa.eval.scoring.run_scoring_cli)."""
    args = build_parser().parse_args()
    run_scoring_cli("evaluate_math.py", args.predict_file, "math", args.mode)


if __name__ == "__main__":
    main()
