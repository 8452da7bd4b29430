"""The main job's report: held-out loss and accuracy, bare base model against the trained adapters.

    python scripts/summarize_run.py --out runs/math_soft_moa [--sets AddSub,AQuA,...]

Reads, for the adapters (OUT) and the bare model (OUT/base): the loss files of evaluate_loss.py
(`loss/SET_loss.jsonl`, one line per row with `nll` and `tokens`) and the verdicts of
evaluate_math.py (`SET_predict_scored.jsonl`, `flag` per row). Prints two tables (loss per set in
nats per reference token, lower is better; accuracy per set with Wilson's 95% interval, and the
average over all rows of all sets) and one line that says what the run shows and what it does not.
Writes the same as `OUT/summary.json` and `OUT/summary.md`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moa.atomic import atomic_write_json, atomic_write_text
from moa.cli import error_line
from moa.eval.intervals import wilson_interval

MATH_SETS = ("AddSub", "AQuA", "gsm8k", "MultiArith", "SingleEq", "SVAMP")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (run the pipeline's step that writes it first)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not valid JSON ({e})") from None
    return rows


def loss_of(folder: Path, name: str) -> dict:
    """{nll: total nats / total tokens, tokens, rows} of one set's loss file."""
    rows = read_jsonl(folder / "loss" / f"{name}_loss.jsonl")
    tokens = sum(int(r["tokens"]) for r in rows)
    return {"nll": sum(float(r["nll"]) * int(r["tokens"]) for r in rows) / max(tokens, 1), "tokens": tokens,
            "rows": len(rows)}


def accuracy_of(folder: Path, name: str) -> dict:
    """{correct, rows, acc, low, high} of one set's scored prediction file."""
    rows = read_jsonl(folder / f"{name}_predict_scored.jsonl")
    k = sum(bool(r.get("flag")) for r in rows)
    lo, hi = wilson_interval(k, len(rows))
    return {"correct": k, "rows": len(rows), "acc": k / max(len(rows), 1), "low": lo, "high": hi}


def summarize(out: Path, sets: list[str]) -> dict:
    models = {"bare": out / "base", "adapters": out}
    loss = {m: {s: loss_of(d, s) for s in sets} for m, d in models.items()}
    acc = {m: {s: accuracy_of(d, s) for s in sets} for m, d in models.items()}
    for m in models:
        k, n = sum(a["correct"] for a in acc[m].values()), sum(a["rows"] for a in acc[m].values())
        lo, hi = wilson_interval(k, n)
        acc[m]["average"] = {"correct": k, "rows": n, "acc": k / max(n, 1), "low": lo, "high": hi}
    lower = [s for s in sets if loss["adapters"][s]["nll"] < loss["bare"][s]["nll"]]
    return {"sets": sets, "loss": loss, "accuracy": acc, "loss_lower_on": lower, "conclusion": conclusion(sets, loss, acc, lower)}


def conclusion(sets: list[str], loss: dict, acc: dict, lower: list[str]) -> str:
    mean_drop = sum(loss["bare"][s]["nll"] - loss["adapters"][s]["nll"] for s in sets) / len(sets)
    a, b = acc["adapters"]["average"], acc["bare"]["average"]
    overlap = a["low"] <= b["high"] and b["low"] <= a["high"]
    shows = (f"training lowered the held-out loss on {len(lower)} of {len(sets)} sets (by {mean_drop:.3f} "
             "nats/token on average)" if lower else "training did NOT lower the held-out loss")
    if overlap:
        accuracy = (f"accuracy {100 * a['acc']:.1f}% vs {100 * b['acc']:.1f}% bare on {a['rows']} rows: the 95% "
                    "intervals overlap, so this run does not show an accuracy difference")
    else:
        direction = "higher" if a["acc"] > b["acc"] else "lower"
        accuracy = (f"accuracy {100 * a['acc']:.1f}% vs {100 * b['acc']:.1f}% bare on {a['rows']} rows: {direction}, "
                    "with 95% intervals that do not overlap")
    return f"This run shows that {shows}; {accuracy}. It says nothing about the 8B model or the paper's full schedule."


def render(s: dict) -> str:
    sets = s["sets"]
    lines = ["held-out loss (nats per reference token, teacher-forced; lower is better)", "",
             "| model | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for m in ("bare", "adapters"):
        lines.append(f"| {m} | " + " | ".join(f"{s['loss'][m][x]['nll']:.4f}" for x in sets) + " |")
    lines += ["", "accuracy, % (95% Wilson interval)", "",
              "| model | " + " | ".join(sets) + " | average |", "|---|" + "---|" * (len(sets) + 1)]
    for m in ("bare", "adapters"):
        cells = [s["accuracy"][m][x] for x in sets + ["average"]]
        lines.append(f"| {m} | " + " | ".join(f"{100 * c['acc']:.1f} [{100 * c['low']:.1f}, {100 * c['high']:.1f}]"
                                              for c in cells) + " |")
    rows = s["accuracy"]["adapters"]["average"]["rows"]
    lines += ["", f"rows: loss {s['loss']['adapters'][sets[0]]['rows']} per set; accuracy {rows} in all", "",
              s["conclusion"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the run folder (the bare model's files under OUT/base)")
    p.add_argument("--sets", default=",".join(MATH_SETS), help="comma-separated set names")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    out = Path(a.out)
    try:
        s = summarize(out, [x for x in a.sets.split(",") if x])
    except (OSError, ValueError, KeyError) as e:
        print(f"summarize_run.py: error: {error_line(e)}", file=sys.stderr)
        return 2
    text = render(s)
    print(text)
    atomic_write_json(out / "summary.json", s)
    atomic_write_text(out / "summary.md", text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
