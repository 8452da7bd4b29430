"""Training checkpoints (`checkpoint-{epoch}.pth`) and RNG state.

A checkpoint is a plain dict, loadable with `torch.load(..., weights_only=True)`:

    format        "moa-train-checkpoint" (what `load_training_checkpoint` checks first)
    version       1
    model         {module path: tensor} of the adapters (moa's `adapter_state_dict` keys), fp32, CPU
    base_trained  {name: tensor} of the base tensors trained by --w_bias (norms, biases); {} otherwise
    optimizer     AdamW state_dict
    scheduler     `WarmupCosine.state_dict()`
    epoch, step   the last completed epoch and the number of optimizer steps taken so far
    world_size    processes that wrote it
    rng           one RNG state per rank (`capture_rng_state`)
    adapter_params  `MoAConfig.to_dict()`
    args          the command-line flags as a plain dict, with the training data's absolute `data_path`,
                  `data_sha256` and `data_rows` (rows trained on), compared on --resume
The frozen base is never in it.
"""
from __future__ import annotations

import os
import random
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from moa.atomic import atomic_write_files
from moa.checks import load_tensors
from moa.method.config import MoAConfig
from moa.method.state import adapter_state_dict, load_adapter_state_dict
from moa.train.run_dir import check_resume
from moa.train.schedule import WarmupCosine

CHECKPOINT_FORMAT = "moa-train-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("model", "base_trained", "optimizer", "scheduler", "epoch", "step", "world_size", "rng",
                 "adapter_params", "args")


def checkpoint_path(output_dir: str, epoch: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{epoch}.pth")


def atomic_torch_save(obj: Any, path: str) -> None:
    """`torch.save(obj, path)` through a temporary file in the same folder, renamed into place."""
    atomic_write_files({path: lambda tmp: torch.save(obj, tmp)})


def capture_rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / Python / NumPy RNG states, as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def plain_args(args: dict[str, Any]) -> dict[str, Any]:
    """The flags as a dict of str/int/float/bool/None only (what weights_only loading accepts)."""
    out = {}
    for key, value in args.items():
        out[key] = value if value is None or isinstance(value, (str, int, float, bool)) else str(value)
    return out


def load_training_checkpoint(path: str) -> dict[str, Any]:
    """Load and check a `checkpoint-{epoch}.pth` written by the trainer (CPU tensors).

    FileNotFoundError when missing; ValueError naming the file when it is not one of ours (not a
    torch file, not weights_only-loadable, or without our format marker and keys).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        ckpt = load_tensors(path, "torch file")
    except ValueError as e:  # "PATH: cannot read this torch file: why"
        raise ValueError(f"{path}: not a moa training checkpoint (torch.load with weights_only=True "
                         f"failed: {str(e)[len(f'{path}: '):]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a moa training checkpoint (no 'format': '{CHECKPOINT_FORMAT}' "
                         "entry; expected a checkpoint-N.pth written by main_finetune.py)")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')!r} is not supported "
                         f"(expected {CHECKPOINT_VERSION})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: damaged moa training checkpoint, missing entries {missing}")
    try:
        MoAConfig.from_dict(ckpt["adapter_params"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: invalid adapter_params in checkpoint: {e}") from None
    return ckpt


def save_training_checkpoint(path: str, model: nn.Module, base_trained: list[str], optimizer: torch.optim.Optimizer,
                             schedule: WarmupCosine, epoch: int, step: int, moa_cfg: MoAConfig,
                             args: dict[str, Any], rank: int = 0, world_size: int = 1) -> None:
    """Write the checkpoint of the unwrapped `model` after `epoch` to `path`, atomically, from rank 0.

    Collective under torch.distributed (every rank contributes its RNG state, then all wait).
    `base_trained`: names of the base tensors trained by --w_bias.
    """
    rng = [capture_rng_state()]
    if world_size > 1:
        rng = [None] * world_size
        dist.all_gather_object(rng, capture_rng_state())
    if rank == 0:
        params = dict(model.named_parameters())
        ckpt = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "model": {k: v.detach().cpu().clone() for k, v in adapter_state_dict(model).items()},
            "base_trained": {n: params[n].detach().cpu().clone() for n in base_trained},
            "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
            "epoch": epoch, "step": step, "world_size": world_size, "rng": rng,
            "adapter_params": moa_cfg.to_dict(), "args": plain_args(args),
        }
        atomic_torch_save(ckpt, path)
    if world_size > 1:
        dist.barrier()


def checked_resume_checkpoint(path: str, moa_cfg: MoAConfig, args: Optional[dict[str, Any]] = None,
                              data: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The --resume checkpoint, loaded and compared with this command (before the model loads): its adapter
    flags with `moa_cfg`, given `args` its RESULT_FLAGS, given `data` (`run_dir.data_record`) its data;
    one ValueError naming every difference (`run_dir.check_resume`)."""
    ckpt = load_training_checkpoint(path)
    if args is not None:
        saved_adapter = MoAConfig.from_dict(ckpt["adapter_params"]).to_dict()  # older files: defaults filled in
        check_resume(path, ckpt["args"], saved_adapter, args, moa_cfg.to_dict(), data)
    return ckpt


def resume_training(path: str, model: nn.Module, base_trained: list[str], optimizer: torch.optim.Optimizer,
                    schedule: WarmupCosine, moa_cfg: MoAConfig, rank: int, world_size: int,
                    say: Callable[[str], None] = print, args: Optional[dict[str, Any]] = None,
                    data: Optional[dict[str, Any]] = None, ckpt: Optional[dict[str, Any]] = None) -> tuple[int, int]:
    """Load a checkpoint into the model's adapters (and --w_bias tensors), the optimizer, the schedule
    and this rank's RNGs; returns (first epoch to run, optimizer steps taken).

    ValueError (naming --resume and, in one message, every difference: its adapter flags, then, given
    this command's `args`, the flags that decide the results (`run_dir.RESULT_FLAGS`), then, given
    `data` (`run_dir.data_record`), the training data) when they differ from the current run's, or its
    --w_bias tensors do. `ckpt`: the checkpoint already loaded (`load_training_checkpoint(path)`).
    """
    ckpt = checked_resume_checkpoint(path, moa_cfg, args, data) if ckpt is None else ckpt
    saved_adapter = MoAConfig.from_dict(ckpt["adapter_params"]).to_dict()  # older files: their defaults filled in
    if saved_adapter != moa_cfg.to_dict():
        diff = sorted(k for k, v in moa_cfg.to_dict().items() if saved_adapter.get(k) != v)
        raise ValueError(f"--resume {path}: its adapter flags differ from this command's: {diff}")
    if sorted(ckpt["base_trained"]) != sorted(base_trained):
        raise ValueError(f"--resume {path}: it was trained with a different --w_bias")
    load_adapter_state_dict(model, ckpt["model"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ckpt["base_trained"]:
                p.copy_(ckpt["base_trained"][name])
    optimizer.load_state_dict(ckpt["optimizer"])
    schedule.load_state_dict(ckpt["scheduler"])
    if ckpt["world_size"] == world_size:
        restore_rng_state(ckpt["rng"][rank])
    else:
        say(f"--resume: checkpoint written by {ckpt['world_size']} processes, now {world_size}: "
            "RNG states not restored")
    say(f"resumed from {path}: epoch {ckpt['epoch']} done, {ckpt['step']} optimizer steps")
    return ckpt["epoch"] + 1, ckpt["step"]
