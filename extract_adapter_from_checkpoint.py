"""Extract the adapters of a training checkpoint:

    python extract_adapter_from_checkpoint.py --checkpoint OUT/checkpoint-1.pth

writes, beside the checkpoint, `adapter.pth` (adapter tensors keyed by module path, as
`moa.adapter_state_dict`) and `adapter_params.json` (every adapter flag, plus `max_seq_len`); with
`--w_bias True` training also `base_trained.pth` (the trained norms/biases). Each file is written to
a temporary name and renamed only once all of them are complete.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from moa.checks import check_writable
from moa.cli import one_line_errors
from moa.files.adapters import ADAPTER_FILE, ADAPTER_PARAMS, BASE_TRAINED, write_adapter_files
from moa.method.config import MoAConfig
from moa.train.checkpointing import load_training_checkpoint


def extract(checkpoint: str) -> dict[str, str]:
    """Write the adapter files of `checkpoint` beside it (all of them or none); returns {kind: path}.

    FileNotFoundError / ValueError (naming the file) when it is missing or not a checkpoint
    written by main_finetune.py.
    """
    folder = Path(checkpoint).resolve().parent
    check_writable("checkpoint", folder, folder=True)  # the adapter files go beside it
    ckpt = load_training_checkpoint(checkpoint)
    cfg = MoAConfig.from_dict(dict(ckpt["adapter_params"]))
    path = write_adapter_files(folder / ADAPTER_FILE, cfg, dict(ckpt["model"]), int(ckpt["args"]["max_seq_len"]),
                               dict(ckpt["base_trained"]))
    written = {"adapter": str(path), "adapter_params": str(folder / ADAPTER_PARAMS)}
    if ckpt["base_trained"]:
        written["base_trained"] = str(folder / BASE_TRAINED)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write adapter.pth + adapter_params.json from a checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint-{epoch}.pth written by main_finetune.py")
    return parser


@one_line_errors("extract_adapter_from_checkpoint.py")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = extract(args.checkpoint)
    except (ValueError, OSError) as e:  # not our checkpoint, missing, unwritable folder, disk full
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = torch.load(written["adapter"], map_location="cpu", weights_only=True)
    print(f"{written['adapter']}: {len(state)} adapter tensors, {sum(t.numel() for t in state.values()):,} parameters")
    print(f"{written['adapter_params']}: adapter flags + max_seq_len")
    if "base_trained" in written:
        print(f"{written['base_trained']}: base norms/biases trained with --w_bias True (load them into the base "
              "before the adapters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
