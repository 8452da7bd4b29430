"""Extract the adapters of a training checkpoint:

    python extract_adapter_from_checkpoint.py --checkpoint OUT/checkpoint-1.pth

writes, beside the checkpoint, `adapter.pth` (adapter tensors keyed by module path, as
`moa.adapter_state_dict`) and `adapter_params.json` (every adapter flag, plus `max_seq_len`); with
`--w_bias True` training also `base_trained.pth` (the trained norms/biases). Each file is written to
a temporary name and renamed only once all of them are complete.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from moa.atomic import atomic_write_files, write_json
from moa.checkpointing import load_training_checkpoint
from moa.state import ADAPTER_PARAMS, BASE_TRAINED

ADAPTER_FILE = "adapter.pth"


def extract(checkpoint: str) -> dict[str, str]:
    """Write the adapter files of `checkpoint` beside it (all of them or none); returns {kind: path}.

    FileNotFoundError / ValueError (naming the file) when it is missing or not a checkpoint
    written by main_finetune.py.
    """
    ckpt = load_training_checkpoint(checkpoint)
    folder = os.path.dirname(os.path.abspath(checkpoint))
    params = dict(ckpt["adapter_params"])
    params["max_seq_len"] = int(ckpt["args"]["max_seq_len"])
    written = {"adapter": os.path.join(folder, ADAPTER_FILE),
               "adapter_params": os.path.join(folder, ADAPTER_PARAMS)}
    writers = {written["adapter"]: lambda tmp: torch.save(dict(ckpt["model"]), tmp),
               written["adapter_params"]: lambda tmp: write_json(params, tmp)}
    if ckpt["base_trained"]:
        written["base_trained"] = os.path.join(folder, BASE_TRAINED)
        writers[written["base_trained"]] = lambda tmp: torch.save(dict(ckpt["base_trained"]), tmp)
    atomic_write_files(writers)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write adapter.pth + adapter_params.json from a checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint-{epoch}.pth written by main_finetune.py")
    args = parser.parse_args(argv)
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
