"""LoraHub: gradient-free search of the weights w (N,) of a linear combination of N task LoRAs on a
few examples of a new task, minimising the few-shot loss plus `l1 * sum |w_i|`.

The optimiser is CMA-ES from the `cma` package (bounded to [-bound, bound], as LoraHub bounds
its weights to [-1.5, 1.5]). A candidate w is evaluated on the adapter bank (`moa.tasks.fusion`,
every row with weights w), in one of two modes:
- `delta` (default): exactly the LoRA `sum_i w_i dW_i`; the result is written with
  `moa.lora.combine.combine(..., method="cat")`, the exact combined LoRA (or `svd`, its best rank-r
  approximation), on the union of the adapters' sites, so adapters of different layers, targets and
  ranks combine;
- `ab`: LoraHub's own composition `(sum_i w_i B_i)(sum_i w_i A_i)` (its code averages the A's and the
  B's; cross terms B_i A_j appear), written as that one LoRA, so published LoraHub numbers compare.
The loss is the label cross-entropy of training (`moa.train.loss`), averaged over the examples'
label tokens, on the Alpaca prompt + output of each row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import cma
import numpy as np
import torch

from llama.model import Transformer
from moa.checks import check_int
from moa.lora.combine import combine
from moa.method.config import MoAConfig
from moa.tasks.fusion import AttachedBank, attach_bank, bank_loras, compose_ab, load_bank
from moa.train.data import InstructionDataset, collate, tokenize_rows
from moa.train.loss import CausalLMLoss, count_labels

INITS = ("uniform", "zero")
LORAHUB_MODES = ("delta", "ab")


@dataclass
class LoraHubConfig:
    """steps: objective evaluations by CMA-ES (rounded up to whole generations of its population; the
    start point is evaluated once more); l1: weight of
    sum |w_i|; bound: each w_i in [-bound, bound]; sigma0: CMA-ES initial step size; init: start at
    w_i = 1/N (uniform) or 0 (LoraHub's start); seed: CMA-ES's seed (the same seed, the same weights)."""

    steps: int = 100
    l1: float = 0.05
    bound: float = 1.5
    sigma0: float = 0.5
    init: str = "uniform"
    seed: int = 0
    batch_size: int = 8
    max_seq_len: int = 512
    mode: str = "delta"  # delta: sum_i w_i dW_i (exact); ab: LoraHub's (sum_i w_i B_i)(sum_i w_i A_i)

    def __post_init__(self) -> None:
        for flag, low in (("steps", 1), ("batch_size", 1), ("max_seq_len", 2), ("seed", 0)):
            check_int(flag, getattr(self, flag), low)
        for flag in ("l1", "bound", "sigma0"):
            v = getattr(self, flag)
            if not isinstance(v, (int, float)) or not v >= 0 or (flag != "l1" and v == 0):
                raise ValueError(f"--{flag}: expected a number {'>= 0' if flag == 'l1' else '> 0'}, got {v!r}")
        if self.mode not in LORAHUB_MODES:
            raise ValueError(f"--lorahub_mode: expected one of {LORAHUB_MODES}, got {self.mode!r}")
        if self.init not in INITS:
            raise ValueError(f"--init: expected one of {INITS}, got {self.init!r}")


@dataclass
class LoraHubResult:
    """weights (N,) of the best objective found; its few-shot `loss` (mean per label token) and
    `objective` (loss + l1 term); the start point's; every evaluation as (weights, loss, objective)."""

    weights: list[float]
    loss: float
    objective: float
    start_weights: list[float]
    start_loss: float
    evaluations: list[tuple[list[float], float, float]] = field(default_factory=list)


def few_shot_batches(tokenizer: Any, rows: Sequence[dict], batch_size: int, max_seq_len: int) -> list[dict]:
    """The few-shot rows tokenised as for training (prompt masked with -100) in padded batches."""
    examples, skipped = tokenize_rows(list(rows), tokenizer, max_seq_len)
    if not examples:
        raise ValueError(f"--data: no example fits --max_seq_len {max_seq_len} (skipped rows {skipped})")
    data = InstructionDataset(examples)
    items = [data[i] for i in range(len(data))]
    return [collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


@torch.no_grad()
def few_shot_loss(bank: AttachedBank, batches: Sequence[dict], weights: torch.Tensor, mode: str = "delta") -> float:
    """Mean label cross-entropy (nats per label token) of the bank's model with weights (N,) on every
    row, the adapters combined as `mode` says (see `LoraHubConfig.mode`)."""
    loss_fn = CausalLMLoss(bank.model)
    device = bank.model.tok_embeddings.weight.device
    total, labels = 0.0, 0
    for batch in batches:
        tokens = batch["tokens"].to(device)
        mask = batch["token_mask"]
        with bank.rows(weights.expand(tokens.shape[0], -1), compose=mode == "ab"):
            loss_sum, _ = loss_fn(tokens, batch["labels"].to(device), None if bool(mask.all()) else mask.to(device))
        total += float(loss_sum)
        labels += count_labels(batch)
    return total / labels


def lorahub_search(bank: AttachedBank, batches: Sequence[dict], cfg: LoraHubConfig) -> LoraHubResult:
    """Search the combination weights of `bank` (`moa.tasks.fusion.attach_bank`) on the few-shot
    `batches` (see `few_shot_batches`)."""
    n = bank.bank.n
    if n < 2:
        raise ValueError(f"LoraHub needs at least 2 adapters (CMA-ES searches >= 2 weights), got {n}")
    evaluations: list[tuple[list[float], float, float]] = []

    def objective(x: np.ndarray) -> float:
        w = [float(v) for v in x]
        loss = few_shot_loss(bank, batches, torch.tensor(w), cfg.mode)
        value = loss + cfg.l1 * sum(abs(v) for v in w)
        evaluations.append((w, loss, value))
        return value if math.isfinite(value) else 1e30

    x0 = np.full(n, 1.0 / n if cfg.init == "uniform" else 0.0)
    objective(x0)
    # cma treats seed 0 as "seed from the clock": shift by one so that every --seed is reproducible.
    es = cma.CMAEvolutionStrategy(x0, cfg.sigma0, {"seed": cfg.seed + 1, "bounds": [-cfg.bound, cfg.bound],
                                                   "maxfevals": cfg.steps, "verbose": -9})
    while not es.stop():
        candidates = es.ask()
        es.tell(candidates, [objective(x) for x in candidates])
    best = min(evaluations, key=lambda e: e[2])
    start = evaluations[0]
    return LoraHubResult(best[0], best[1], best[2], start[0], start[1], evaluations)


def lorahub(model: Transformer, tokenizer: Any, adapters: Sequence[str], rows: Sequence[dict], cfg: LoraHubConfig,
            method: str = "cat", rank: int | None = None) -> tuple[LoraHubResult, MoAConfig, dict[str, torch.Tensor]]:
    """The whole LoraHub step: attach the plain LoRAs `adapters` (files; they may differ in layers,
    targets and ranks) as a bank to the bare base `model` (detached again at the end), search the
    weights on the few-shot `rows`, and write what was searched: mode delta, the LoRAs combined on the
    union of their sites (`moa.lora.combine.combine`, `cat`: exact; `svd`: truncated to `rank`);
    mode ab, LoraHub's composed A and B. Returns (search result, combined cfg, combined state)."""
    if method not in ("cat", "svd"):
        raise ValueError(f"--method: expected cat (the exact sum of the weighted deltas) or svd (its rank-r "
                         f"approximation), got {method!r}")
    if cfg.mode == "ab" and method != "cat":
        raise ValueError("--method svd combines deltas (--lorahub_mode delta); --lorahub_mode ab writes its "
                         "composed LoRA as it is (the largest input rank)")
    bank = load_bank([str(p) for p in adapters], adapters)
    attached = attach_bank(model, bank)  # refuses adapters of another base before any search
    try:
        result = lorahub_search(attached, few_shot_batches(tokenizer, rows, cfg.batch_size, cfg.max_seq_len), cfg)
    finally:
        attached.detach()
    if cfg.mode == "ab":
        return (result, *compose_ab(bank, result.weights))
    # The bank's layout covers adapters of different layers, targets and ranks (zeros where one has none).
    combined_cfg, state = combine(bank_loras(bank), result.weights, method, rank=rank)
    return result, combined_cfg, state
