"""Combine several plain LoRAs into one, as PEFT's `LoraModel.add_weighted_adapter` does (PEFT's
names and definitions, see `COMBINE_METHODS`); the combined LoRA, like PEFT's, has
`lora_alpha = rank` (scaling 1). What a plain LoRA is: moa/lora/algebra.py.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch

from moa.lora.algebra import check_plain_lora, lora_sites
from moa.method.config import MoAConfig

# PEFT's combination types (`add_weighted_adapter(combination_type=...)`):
#   cat: concatenate ranks, A_cat = [w_i s_i A_i] (rows), B_cat = [B_i] (columns): exact sum of w_i dW_i.
#   linear | ties | dare_linear | dare_ties | magnitude_prune: the A's and the B's are merged
#       separately (equal ranks required) with weights sqrt(|w_i s_i|), the sign of w_i s_i on A only;
#       an approximation of sum w_i dW_i (cross terms B_i A_j appear).
#   svd | ties_svd | dare_linear_svd | dare_ties_svd | magnitude_prune_svd: the full deltas
#       dW_i = s_i B_i A_i are merged with weights w_i, then truncated to `rank` by SVD (B = U S, A = V^T).
# The merge rule of each: task arithmetic (sum), TIES (magnitude pruning to `density`, majority sign
# on the pruned unweighted tensors, disjoint mean), DARE (Bernoulli(density) keep mask, rescale by
# 1/density) then sum (linear) or TIES' sign election (ties), magnitude pruning then sum.
COMBINE_METHODS = ("cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune",
                   "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")

Lora = tuple[MoAConfig, dict[str, torch.Tensor]]
Factors = tuple[torch.Tensor, torch.Tensor]  # A (r, in), B (out, r)


def combine(adapters: Sequence[Lora], weights: Sequence[float], method: str, density: Optional[float] = None,
            rank: Optional[int] = None, seed: int = 0, majority_sign_method: str = "total") -> Lora:
    """Combine plain LoRAs (each `(cfg, state)`, see `read_plain_lora`) like PEFT's
    `add_weighted_adapter(adapters, weights, combination_type=method, density=, svd_rank=rank,
    majority_sign_method=)`; see COMBINE_METHODS for each method.

    All adapters must have the same layers and targets; `linear`, `ties`, `dare_*`,
    `magnitude_prune` also the same rank. Result rank: sum of ranks (`cat`), `rank` or the largest
    rank (`*svd`), else the common rank; `lora_alpha` = that rank (scaling 1). `density` in [0, 1]
    for the pruning methods; DARE's masks come from a `torch.Generator` seeded with `seed`, drawn
    site by site, for each site all A's then all B's (`*svd`: the deltas). A single adapter is
    always combined `linear`, as in PEFT. Returns (cfg, state fp32).
    """
    sites = check_combine_inputs(adapters, weights, method, density, majority_sign_method)
    if len(adapters) == 1:
        method = "linear"
    rule = method.removesuffix("_svd")
    cfgs = [cfg for cfg, _ in adapters]
    new_rank = combined_rank(method, [cfg.lora_rank for cfg in cfgs], rank)
    generator = torch.Generator().manual_seed(seed)
    scales = [cfg.lora_scale for cfg in cfgs]
    out: dict[str, torch.Tensor] = {}
    for site in sites:
        a_list = [state[f"{site}.lora_A"].float() for _, state in adapters]  # (r_i, in)
        b_list = [state[f"{site}.lora_B"].float() for _, state in adapters]  # (out, r_i)
        if method == "cat":
            a, b = _combine_cat(a_list, b_list, weights, scales)
        elif method.endswith("svd"):
            a, b = _combine_svd(rule, a_list, b_list, weights, scales, new_rank, site, density,
                                majority_sign_method, generator)
        else:
            a, b = _combine_factors(rule, a_list, b_list, weights, scales, density, majority_sign_method, generator)
        out[f"{site}.lora_A"], out[f"{site}.lora_B"] = a.contiguous(), b.contiguous()
    new_cfg = dataclasses.replace(cfgs[0], lora_rank=new_rank, lora_alpha=float(new_rank), use_rslora=False)
    return new_cfg, out


# ---- input checks and the rank policy ------------------------------------------------------------

def check_combine_inputs(adapters: Sequence[Lora], weights: Sequence[float], method: str,
                         density: Optional[float], majority_sign_method: str) -> list[str]:
    """The LoRA sites the adapters share, once the flags are valid for `method` and the adapters
    are plain LoRAs of the same layers, targets and base model; else a ValueError naming the flag
    or the adapter."""
    if method not in COMBINE_METHODS:
        raise ValueError(f"--method: expected one of {COMBINE_METHODS}, got {method!r}")
    if len(adapters) == 0 or len(adapters) != len(weights):
        raise ValueError(f"--weights: got {len(weights)} weights for {len(adapters)} adapters (need one each, "
                         "at least one adapter)")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"--majority_sign_method: expected total or frequency, got {majority_sign_method!r}")
    if method.removesuffix("_svd") in _NEEDS_DENSITY and (density is None or not 0.0 <= density <= 1.0):
        raise ValueError(f"--density: method {method} needs a density in [0, 1], got {density!r}")
    for i, (cfg, _) in enumerate(adapters):
        check_plain_lora(cfg, f"adapter #{i}")
    cfgs = [cfg for cfg, _ in adapters]
    sites = lora_sites(cfgs[0])
    for i, cfg in enumerate(cfgs[1:], 1):
        if lora_sites(cfg) != sites:
            raise ValueError(f"adapter #{i} has --lora_layers {cfg.lora_layers} --lora_targets {cfg.lora_targets}, "
                             f"adapter #0 {cfgs[0].lora_layers} {cfgs[0].lora_targets}: combine needs the same "
                             "layers and targets")
    for site in sites:  # same sites, so a shape that differs means another base model
        for m in "AB":
            shapes = [tuple(state[f"{site}.lora_{m}"].shape) for _, state in adapters]
            dim = 1 if m == "A" else 0  # A: (r, in), B: (out, r)
            if len({sh[dim] for sh in shapes}) != 1:
                raise ValueError(f"{site}.lora_{m} has shapes {shapes} across the adapters: they were made for "
                                 "different base models (combine needs LoRAs of the same base)")
    return sites


def combined_rank(method: str, ranks: list[int], rank: Optional[int]) -> int:
    """The rank of the combination: the sum (`cat`), `rank` or the largest (`*svd`), else the
    common rank (ValueError when the ranks differ)."""
    if method == "cat":
        return sum(ranks)
    if method.endswith("svd"):
        return rank or max(ranks)
    if len(set(ranks)) != 1:
        raise ValueError(f"method {method} needs LoRAs of equal rank, got ranks {ranks} (use cat or svd)")
    return ranks[0]


# ---- one function per method family --------------------------------------------------------------

def _combine_cat(a_list: list[torch.Tensor], b_list: list[torch.Tensor], weights: Sequence[float],
                 scales: list[float]) -> Factors:
    """`cat`: the ranks side by side, the weight and scaling on A; B A is exactly sum w_i s_i B_i A_i."""
    a = torch.cat([w * s * a_i for w, s, a_i in zip(weights, scales, a_list)], 0)
    return a, torch.cat(b_list, 1)


def _combine_svd(rule: str, a_list: list[torch.Tensor], b_list: list[torch.Tensor], weights: Sequence[float],
                 scales: list[float], new_rank: int, site: str, density: Optional[float], sign_method: str,
                 generator: torch.Generator) -> Factors:
    """`*svd`: merge the full deltas s_i B_i A_i by `rule`, then keep the top `new_rank` singular
    directions (B = U S, A = V^T)."""
    deltas = [s * (b_i @ a_i) for s, a_i, b_i in zip(scales, a_list, b_list)]
    delta = _merge_tensors(rule, deltas, torch.tensor(weights, dtype=torch.float32), density or 1.0,
                           sign_method, generator)  # (out, in)
    if new_rank > min(delta.shape):
        raise ValueError(f"--rank {new_rank} exceeds min(out, in) = {min(delta.shape)} of {site}")
    u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
    return vh[:new_rank], u[:, :new_rank] * sv[:new_rank]


def _combine_factors(rule: str, a_list: list[torch.Tensor], b_list: list[torch.Tensor], weights: Sequence[float],
                     scales: list[float], density: Optional[float], sign_method: str,
                     generator: torch.Generator) -> Factors:
    """`linear`, `ties`, `dare_*`, `magnitude_prune`: the A's and the B's merged separately by `rule`,
    with sqrt(|w s|) on both factors and the sign on A only, so that B A carries w s (PEFT)."""
    ws = [w * s for w, s in zip(weights, scales)]
    w_a = torch.tensor([math.copysign(math.sqrt(abs(x)), x) for x in ws], dtype=torch.float32)
    w_b = torch.tensor([math.sqrt(abs(x)) for x in ws], dtype=torch.float32)
    a = _merge_tensors(rule, a_list, w_a, density or 1.0, sign_method, generator)
    b = _merge_tensors(rule, b_list, w_b, density or 1.0, sign_method, generator)
    return a, b


# ---- the merge rules -----------------------------------------------------------------------------

def _merge_tensors(rule: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
                   sign_method: str, generator: torch.Generator) -> torch.Tensor:
    """Merge same-shape task tensors by `rule` (linear/svd = weighted sum, see COMBINE_METHODS)."""
    if rule in ("ties", "magnitude_prune"):
        tensors = [_prune_magnitude(t, density) for t in tensors]
    elif rule in ("dare_linear", "dare_ties"):
        tensors = [_prune_random(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    if rule in ("ties", "dare_ties"):
        return _disjoint_merge(stacked, weights, sign_method)
    return (stacked * weights.view(-1, *[1] * (stacked.dim() - 1))).sum(0)


def _prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of largest |t|, zero the rest (density >= 1: keep all)."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return t * keep.view_as(t)


def _prune_random(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density` and rescale the kept ones by 1/density."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def _disjoint_merge(stacked: torch.Tensor, weights: torch.Tensor, sign_method: str) -> torch.Tensor:
    """TIES: elect a sign per entry from the (pruned, unweighted) stack (`total`: sign of the sum,
    `frequency`: the more frequent sign, ties to +), then average the weighted entries that agree."""
    sign = stacked.sign()
    votes = stacked.sum(0) if sign_method == "total" else sign.sum(0)
    agree = sign == torch.where(votes >= 0, 1.0, -1.0)
    weighted = stacked * weights.view(-1, *[1] * (stacked.dim() - 1))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)
