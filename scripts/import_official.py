"""Turn a checkpoint of the official MoA code (GitHub DCDmllm/MoA, every LLaMA3_* folder) into our
adapter files: `adapter.pth` + `adapter_params.json` in `--out` (the work is `moa.files.official`).

    python scripts/import_official.py --checkpoint checkpoint-2.pth --out adapters/official
    python scripts/import_official.py --checkpoint adapter.pth --out DIR --flags "--lora_alpha 16"
    python scripts/import_official.py --checkpoint adapter.pth --out DIR --args_from checkpoint-2.pth

`--checkpoint`: the official `main_finetune.py`'s `checkpoint-N.pth` (whole model + the run's args) or its
extract script's `adapter.pth`. The flags come from the tensors, then the run's args (`--args_from` for a
bare adapter.pth), then `--flags` (our flag names). The result is loaded back strictly into a model of the
base's shape (`--llama_path`'s params.json, else the checkpoint's shapes). An --out that holds an adapter
already is refused unless --overwrite True.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from moa.checks import check_writable
from moa.cli import error_line, str2bool
from moa.files.official import import_official


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="official checkpoint-N.pth or adapter.pth")
    ap.add_argument("--out", required=True, help="folder for adapter.pth + adapter_params.json")
    ap.add_argument("--flags", default="", help='the run\'s adapter flags in our names, e.g. "--lora_alpha 16"')
    ap.add_argument("--args_from", default=None, help="an official checkpoint-N.pth whose args hold the run's flags")
    ap.add_argument("--llama_path", default=None, help="base-model folder (params.json) for the shape check")
    ap.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False,
                    help="replace the adapter files that --out already holds (default False: refused)")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    """The command line; 0 on success, 2 (with a one-line error) when the input cannot be converted."""
    a = build_parser().parse_args(argv)
    try:
        check_writable("out", a.out, folder=True)  # before the checkpoint loads
        import_official(a.checkpoint, a.out, a.flags, a.args_from, a.llama_path, overwrite=a.overwrite)
    except (ValueError, OSError) as e:  # OSError: a full disk, a folder that vanished, ...
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
