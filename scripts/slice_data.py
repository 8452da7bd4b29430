"""Write a slice of one or more Alpaca-format JSON lists (the small runs of scripts/run_*.sh).

    python scripts/slice_data.py --rows 256 --out OUT/train.json data/math/train/gsm8k_train.json
    python scripts/slice_data.py --rows 512 --seed 0 --out OUT/train.json A/train.json B/train.json

One source: its first N rows, in order (`--rows 0`: all). Several sources (a mixture, as the
commonsense training set is): the rows of all of them shuffled with `--seed`, then the first N.
The output is written atomically; an existing identical slice is left untouched.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path


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


def slice_rows(sources: list[Path], rows: int, seed: int) -> list[dict]:
    """The first `rows` rows of one source, or of all sources shuffled together (rows 0: all)."""
    data = [r for src in sources for r in read_rows(src)]
    if len(sources) > 1:
        random.Random(seed).shuffle(data)
    return data[:rows] if rows > 0 else data


def write_json_atomic(path: Path, obj: object) -> None:
    """Write `obj` as JSON to `path` through a temporary file and a rename (unchanged files are kept)."""
    text = json.dumps(obj, ensure_ascii=False, indent=1)
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sources", nargs="+", type=Path, help="JSON list files")
    p.add_argument("--out", required=True, type=Path, help="the slice to write")
    p.add_argument("--rows", type=int, default=0, help="rows to keep (0: all)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed when mixing several sources")
    a = p.parse_args(argv)
    if a.rows < 0:
        p.error(f"--rows: expected >= 0, got {a.rows}")
    try:
        write_json_atomic(a.out, slice_rows(a.sources, a.rows, a.seed))
    except (FileNotFoundError, ValueError) as e:
        print(f"slice_data.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
