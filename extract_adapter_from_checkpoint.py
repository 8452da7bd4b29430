"""Extract the adapters of a training checkpoint:

    python extract_adapter_from_checkpoint.py --checkpoint OUT/checkpoint-1.pth

writes, beside the checkpoint, `adapter.pth` (adapter tensors keyed by module path, as
`moa.adapter_state_dict`) and `adapter_params.json` (every adapter flag, plus `max_seq_len`); with
`--w_bias True` training also `base_trained.pth` (the trained norms/biases). Each file is written to
a temporary name and renamed only once all of them are complete.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Callable

import torch

from moa.checkpointing import load_training_checkpoint

ADAPTER_FILE = "adapter.pth"
ADAPTER_PARAMS_FILE = "adapter_params.json"
BASE_TRAINED_FILE = "base_trained.pth"


def extract(checkpoint: str) -> dict[str, str]:
    """Write the adapter files of `checkpoint` beside it; returns {kind: path written}.

    FileNotFoundError / ValueError (naming the file) when it is missing or not a checkpoint
    written by main_finetune.py.
    """
    ckpt = load_training_checkpoint(checkpoint)
    folder = os.path.dirname(os.path.abspath(checkpoint))
    params = dict(ckpt["adapter_params"])
    params["max_seq_len"] = int(ckpt["args"]["max_seq_len"])
    outputs: dict[str, tuple[str, Callable[[str], None]]] = {
        "adapter": (ADAPTER_FILE, lambda path: torch.save(dict(ckpt["model"]), path)),
        "adapter_params": (ADAPTER_PARAMS_FILE, lambda path: _write_json(params, path)),
    }
    if ckpt["base_trained"]:
        outputs["base_trained"] = (BASE_TRAINED_FILE, lambda path: torch.save(dict(ckpt["base_trained"]), path))
    temps: dict[str, str] = {}
    try:
        for kind, (name, write) in outputs.items():
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
            temps[kind] = tmp
            write(tmp)
        written = {}
        for kind, (name, _) in outputs.items():
            written[kind] = os.path.join(folder, name)
            os.replace(temps.pop(kind), written[kind])
        return written
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def _write_json(obj: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write adapter.pth + adapter_params.json from a checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint-{epoch}.pth written by main_finetune.py")
    args = parser.parse_args(argv)
    try:
        written = extract(args.checkpoint)
    except (ValueError, FileNotFoundError) as e:
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
