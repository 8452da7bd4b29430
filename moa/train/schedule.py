"""The paper's optimisation recipe: learning-rate scaling, warmup + half-cosine schedule, AdamW
parameter groups (weight decay on matrices only)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import nn

ADAMW_BETAS = (0.9, 0.95)


def scaled_lr(blr: float, batch_size: int, accum_iter: int, world_size: int, lr: Optional[float] = None) -> float:
    """Peak learning rate: `lr` when given, else `blr * batch_size * accum_iter * world_size / 256`
    (the base rate is per 256 sequences of effective batch)."""
    if lr is not None:
        return lr
    return blr * batch_size * accum_iter * world_size / 256


@dataclass
class WarmupCosine:
    """Linear warmup from 0 to `peak_lr` over `warmup_epochs`, then a half cosine down to `min_lr`
    at `epochs`, as a function of the fractional epoch.

    `lr_at(e)` = peak_lr * e / warmup_epochs                                  for e < warmup_epochs
              = min_lr + (peak_lr - min_lr) * (1 + cos(pi * (e - w) / (epochs - w))) / 2   otherwise.
    The trainer evaluates it at the start of every optimizer step, at
    `e = epoch + (index of the step's first micro-batch in the epoch) / (micro-batches per epoch)`,
    so the very first step of a warmup runs at lr 0 (as in the MAE / LLaMA-Adapter recipe).
    """

    peak_lr: float
    min_lr: float
    warmup_epochs: float
    epochs: int
    last_lr: float = 0.0

    def lr_at(self, epoch: float) -> float:
        """Learning rate at fractional epoch `epoch`."""
        if epoch < self.warmup_epochs:
            return self.peak_lr * epoch / self.warmup_epochs
        span = self.epochs - self.warmup_epochs
        if span <= 0:  # no room left for a decay: stay at the peak
            return self.peak_lr
        progress = min((epoch - self.warmup_epochs) / span, 1.0)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def step(self, optimizer: torch.optim.Optimizer, epoch: float) -> float:
        """Set every parameter group's lr for the optimizer step that starts at fractional `epoch`."""
        lr = self.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.last_lr = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `last_lr` (the shape of the schedule comes from the current flags; the step count
        that older checkpoints also hold here is the checkpoint's own `step`)."""
        self.last_lr = float(state["last_lr"])


def _is_matrix(p: torch.Tensor) -> bool:
    # A gate of shape (1, n_heads, 1, 1) is a vector in disguise: count dims larger than one.
    return sum(s > 1 for s in p.shape) >= 2


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters (in `named_parameters` order): weight decay on
    matrices, none on vectors, scalars, biases and norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _is_matrix(p) and not name.endswith("bias"):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The paper's optimiser over the trainable parameters of `model`: AdamW, betas (0.9, 0.95), weight
    decay on matrices only (`param_groups`). The trainer and the benchmarks both build it here."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=ADAMW_BETAS)
