"""Many task LoRAs on one frozen model: an `AdapterBank` of N plain LoRAs, run either one at a time
(top-1 routing: a group of rows with the same choice runs with its adapter) or fused with per-row
weights (B, N) (DLP-LoRA's top-p fusion, LoraHub's constant weights).

Fusion is the stacked-expert LoRA mixture that MoLoRA already computes (`LoRALinear` with
`mixture='molora'`: `sum_e p_e B_e A_e z`, one einsum over the stacked `A (E, r, in)`,
`B (E, out, r)`), with the router replaced by `RowWeights`, which hands every token its row's given
weights. No second copy of the LoRA math, no Python loop over rows or layers.

The N adapters may differ in rank, scaling, layers and targets: the bank pads them to a common
layout, exactly (the union of layers and targets, the largest rank; a site or rank row an adapter
lacks is zero), and folds each adapter's `alpha / r` into its B, so the bank's LoRA has scaling 1.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from llama.model import Transformer
from moa.method.experts import LoRALinear
from moa.lora.algebra import indices_to_spans, lora_sites, read_plain_lora
from moa.method.config import LORA_TARGETS, MoAConfig, parse_spans
from moa.method.inject import attach_adapters

@dataclass
class AdapterBank:
    """N plain LoRAs in one layout. `tasks[i]` names adapter i; `cfg`: the common plain-LoRA config
    (union of layers and targets, `lora_rank` = the largest rank, `lora_alpha` = that rank: scaling
    1); `lora_A[site]` (N, r, in) and `lora_B[site]` (N, out, r) fp32, adapter i's own `alpha_i / r_i`
    folded into its B, zeros where it has no such site or rank row."""

    tasks: list[str]
    cfg: MoAConfig
    lora_A: dict[str, torch.Tensor]
    lora_B: dict[str, torch.Tensor]

    @property
    def n(self) -> int:
        return len(self.tasks)


def build_bank(tasks: Sequence[str], adapters: Sequence[tuple[MoAConfig, dict[str, torch.Tensor]]]) -> AdapterBank:
    """Stack plain LoRAs (`(cfg, state)` each, as `moa.lora.algebra.read_plain_lora` returns) into a bank."""
    if len(tasks) != len(adapters) or not adapters:
        raise ValueError(f"build_bank: {len(tasks)} task names for {len(adapters)} adapters (need one each, >= 1)")
    layers = sorted({i for cfg, _ in adapters for s, e in parse_spans("lora_layers", cfg.lora_layers)
                     for i in range(s, e)})
    targets = [t for t in LORA_TARGETS if any(t in cfg.target_list for cfg, _ in adapters)]
    rank = max(cfg.lora_rank for cfg, _ in adapters)
    cfg = MoAConfig(lora_layers=indices_to_spans(layers), lora_targets=",".join(targets), lora_rank=rank,
                    lora_alpha=float(rank), type_router="none")
    lora_A, lora_B = {}, {}
    for site in lora_sites(cfg):
        a_list, b_list = [], []
        # (out, in) of this projection; every layer has the same, and some adapter has this target.
        proj = site.split(".", 2)[2]  # e.g. attention.wq
        shape = next((state[k.replace("lora_A", "lora_B")].shape[0], state[k].shape[1])
                     for _, state in adapters for k in state if k.endswith(f".{proj}.lora_A"))
        for c, state in adapters:
            a = torch.zeros(rank, shape[1])
            b = torch.zeros(shape[0], rank)
            if f"{site}.lora_A" in state:
                a_i, b_i = state[f"{site}.lora_A"].float(), state[f"{site}.lora_B"].float()
                if (b_i.shape[0], a_i.shape[1]) != tuple(shape):
                    raise ValueError(f"{site}: adapters disagree on its shape ({tuple(shape)} vs "
                                     f"{(b_i.shape[0], a_i.shape[1])}): they were trained on different bases")
                a[: c.lora_rank] = a_i
                b[:, : c.lora_rank] = b_i * (c.lora_alpha / c.lora_rank)
            a_list.append(a)
            b_list.append(b)
        lora_A[site], lora_B[site] = torch.stack(a_list), torch.stack(b_list)  # (N, r, in), (N, out, r)
    return AdapterBank(list(tasks), cfg, lora_A, lora_B)


def load_bank(tasks: Sequence[str], paths: Sequence[str | os.PathLike]) -> AdapterBank:
    """Read plain LoRA files (adapter.pth or its folder, adapter_params.json beside it) into a bank."""
    return build_bank(tasks, [read_plain_lora(p) for p in paths])


class RowWeights(nn.Module):
    """Stands in for a MoLoRA site's router: returns the given per-row weights for every token.

    `weights` (B, N), set by `set_row_weights` before a forward; the site's input z is the batch's
    tokens flattened row-major, (B*T, in), so row b's T tokens get weights[b].
    """

    def __init__(self) -> None:
        super().__init__()
        self.weights: Optional[torch.Tensor] = None

    def reset_parameters(self) -> None:
        self.weights = None

    def forward(self, z: torch.Tensor, row_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z (B*T, in) -> (B*T, N) in z's dtype."""
        w = self.weights
        if w is None:
            raise ValueError("fused adapters: call moa.tasks.fusion.set_row_weights(model, weights) before a forward")
        if z.shape[0] % w.shape[0]:
            raise ValueError(f"fused adapters: {z.shape[0]} tokens do not split into the {w.shape[0]} rows "
                             "whose weights were set (set weights for exactly the batch being run)")
        return w.to(device=z.device, dtype=z.dtype).repeat_interleave(z.shape[0] // w.shape[0], dim=0)


def _sites(model: Transformer) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def attach_bank(model: Transformer, bank: AdapterBank, fused: bool) -> Transformer:
    """Attach the bank's LoRA sites to a model without adapters, in place, and return it.

    fused=False: one plain LoRA per site (rank r); `use_adapter(model, bank, i)` loads adapter i.
    fused=True: a MoLoRA site holding all N adapters stacked, its router a `RowWeights`;
    `set_row_weights(model, w)` gives each row of the next forwards its weights.
    """
    if fused and bank.n < 2:
        raise ValueError(f"fusion needs at least 2 adapters, the bank has {bank.n}")
    cfg = dataclasses.replace(bank.cfg, expert_num=bank.n if fused else 1, hydra_moe=False, expert_router="soft")
    attach_adapters(model, cfg)
    model.moa_bank_tasks = list(bank.tasks)
    if not fused:
        model.moa_bank_fused = False
        use_adapter(model, bank, 0)
        return model
    router = RowWeights()
    with torch.no_grad():
        for name, site in _sites(model):
            site.lora_A.copy_(bank.lora_A[name])
            site.lora_B.copy_(bank.lora_B[name])
            site.router = router  # one shared module: the weights are set once per batch
    model.moa_bank_fused = True
    model.moa_row_weights = router
    return model


def use_adapter(model: Transformer, bank: AdapterBank, index: int) -> None:
    """Load adapter `index` of `bank` into a model made by `attach_bank(..., fused=False)`."""
    if getattr(model, "moa_bank_fused", None) is not False:
        raise ValueError("use_adapter: the model was not attached with attach_bank(model, bank, fused=False)")
    if not 0 <= index < bank.n:
        raise ValueError(f"use_adapter: adapter index {index} out of range for {bank.n} adapters")
    with torch.no_grad():
        for name, site in _sites(model):
            site.lora_A.copy_(bank.lora_A[name][index])
            site.lora_B.copy_(bank.lora_B[name][index])


def set_row_weights(model: Transformer, weights: torch.Tensor) -> None:
    """Per-row adapter weights (B, N) for the next forwards of a model made by
    `attach_bank(..., fused=True)` (prefill and every decode step of one `generate` call)."""
    router = getattr(model, "moa_row_weights", None)
    if router is None:
        raise ValueError("set_row_weights: the model was not attached with attach_bank(model, bank, fused=True)")
    n = len(model.moa_bank_tasks)
    if weights.dim() != 2 or weights.shape[1] != n:
        raise ValueError(f"set_row_weights: expected weights (B, {n}), got {tuple(weights.shape)}")
    router.weights = weights.detach().float()


def top_p_weights(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """DLP-LoRA's fusion weights: per row, the most probable adapters until their probability
    reaches `top_p` (the one that crosses it included), renormalised; the others 0.

    probs (B, N) rows summing to 1 -> (B, N). `top_p` in (0, 1]; a small `top_p` keeps only the
    top-1 adapter (weight 1).
    """
    if not 0 < top_p <= 1:
        raise ValueError(f"--top_p_adapters: expected a value in (0, 1], got {top_p!r}")
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    kept = torch.where(mass_before < top_p, sorted_p, torch.zeros_like(sorted_p))
    kept[:, 0] = sorted_p[:, 0]  # the top-1 always stays, even if rounding pushed mass_before over
    weights = torch.zeros_like(probs).scatter(-1, idx, kept)
    return weights / weights.sum(-1, keepdim=True)


def group_rows(choice: Sequence[int]) -> dict[int, list[int]]:
    """{adapter index: row indices in order} for top-1 choices (one per row)."""
    groups: dict[int, list[int]] = {}
    for row, c in enumerate(choice):
        groups.setdefault(int(c), []).append(row)
    return groups
