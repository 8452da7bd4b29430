"""One process per device under torchrun (NCCL on CUDA, Gloo on CPU), or a plain process: where this
process sits, DDP over the trainable parameters only, and one rank's answer handed to all."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

T = TypeVar("T")


@dataclass
class DistEnv:
    """Where this process sits: rank, world size, device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistEnv:
    """Join the torchrun process group when launched by torchrun (NCCL on CUDA, Gloo on CPU);
    a plain process is rank 0 of 1. On CUDA each process takes the GPU of its LOCAL_RANK."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv(0, 1, torch.device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistEnv(rank, world, dev)


def wrap_ddp(module: nn.Module, env: DistEnv, find_unused_parameters: bool) -> nn.Module:
    """DDP over the trainable parameters only (the frozen base is neither broadcast nor reduced).

    `find_unused_parameters` is needed when some trainable tensor gets no gradient in a step (the
    sparse router's learned threshold without --threshold_ste); sparse experts that no token picked
    still run on zero rows, so they stay in the graph and cost DDP nothing special.
    """
    if env.world_size == 1:
        return module
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in module.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(module, frozen)
    return DDP(module, device_ids=[env.device.index] if env.device.type == "cuda" else None,
               find_unused_parameters=find_unused_parameters)


def on_rank0(fn: Callable[[], T], rank: int, world: int) -> T:
    """Run `fn` on rank 0 only and hand its result, or its error, to every rank (an error of any kind
    reaches the other ranks, so none waits for a result that never comes). A ValueError or
    FileNotFoundError keeps its type there (user mistakes, reported in one line); others arrive as
    RuntimeError with rank 0's message."""
    if world == 1:
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:
            kind = next((k.__name__ for k in (FileNotFoundError, ValueError) if isinstance(e, k)), type(e).__name__)
            box[0] = ("error", kind, str(e))
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        kind = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}.get(box[0][1], RuntimeError)
        raise kind(box[0][2] if kind is not RuntimeError else f"rank 0 failed: {box[0][1]}: {box[0][2]}")
    return box[0][1]
