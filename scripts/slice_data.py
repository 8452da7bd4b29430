"""Write a slice of one or more Alpaca-format JSON lists (the small runs of scripts/run_*.sh).

    python scripts/slice_data.py --rows 256 --out OUT/train.json data/math/train/gsm8k_train.json
    python scripts/slice_data.py --rows 512 --seed 0 --out OUT/train.json A/train.json B/train.json

One source: its first N rows, in order (`--rows 0`: all). Several sources (a mixture, as the
commonsense training set is): the rows of all of them shuffled with `--seed`, then the first N.
`--with_output True` (the held-out loss slices) keeps only rows whose reference `output` is not empty
(gsm8k's test file has six without one). The output is written atomically; an existing identical slice is left untouched.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from moa.atomic import atomic_write_text
from moa.cli import error_line


def read_rows(path: Path) -> list[dict]:
    """The JSON list in `path` (ValueError naming the file when it is not a list of objects)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a JSON list of row objects")
    return rows


def slice_rows(sources: list[Path], rows: int, seed: int, with_output: bool = False) -> list[dict]:
    """The first `rows` rows of one source, or of all sources shuffled together (rows 0: all);
    `with_output`: only rows with a non-empty string `output`."""
    data = [r for src in sources for r in read_rows(src)]
    if with_output:
        data = [r for r in data if isinstance(r.get("output"), str) and r["output"].strip()]
    if len(sources) > 1:
        random.Random(seed).shuffle(data)
    return data[:rows] if rows > 0 else data


def write_json_kept(path: Path, obj: object) -> None:
    """Write `obj` as JSON to `path` atomically, leaving an identical existing file untouched."""
    text = json.dumps(obj, ensure_ascii=False, indent=1)
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sources", nargs="+", type=Path, help="JSON list files")
    p.add_argument("--out", required=True, type=Path, help="the slice to write")
    p.add_argument("--rows", type=int, default=0, help="rows to keep (0: all)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed when mixing several sources")
    p.add_argument("--with_output", choices=["True", "False"], default="False",
                   help="True: keep only rows with a non-empty reference output (held-out loss slices)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.rows < 0:
        p.error(f"--rows: expected >= 0, got {a.rows}")
    try:
        write_json_kept(a.out, slice_rows(a.sources, a.rows, a.seed, a.with_output == "True"))
    except (OSError, ValueError) as e:
        print(f"slice_data.py: error: {error_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
