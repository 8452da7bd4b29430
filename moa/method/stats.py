"""Router statistics without touching model code: a context manager that the blocks' routers report to.

    with RouterStats(model) as stats:
        model(tokens, token_mask=mask)
    stats.summary()  # {layer: {slot: {"weight": mean router weight, "active": share of tokens run, "tokens": n}}}

Everything is averaged over real tokens only (pads never count). `weight` is the type router's
weight before any threshold (1.0 for `--type_router none`; for instance/UniPEFT each token carries
its sequence's weight); `active` is the share of real tokens that selected the type (sparse; 1.0
for dense routers, and for the sparse prompt the share whose masked weight is nonzero).
Recomputation under activation checkpointing is not counted twice.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moa.method.routers import BlockRouter


class RouterStats:
    """Accumulates per layer x slot sums while its `with` block runs (any number of forwards)."""

    def __init__(self, model: nn.Module):
        self.routers = [m for m in model.modules() if isinstance(m, BlockRouter)]
        self._acc: dict[int, tuple[tuple[str, ...], torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __enter__(self) -> "RouterStats":
        for router in self.routers:
            if router.stats is not None:
                raise ValueError("RouterStats: another RouterStats is already collecting on this model")
            router.stats = self
        return self

    def __exit__(self, *exc: Any) -> None:
        for router in self.routers:
            router.stats = None

    def reset(self) -> None:
        """Forget everything collected so far."""
        self._acc.clear()

    def record(self, layer_id: int, slots: tuple[str, ...], weight_sum: torch.Tensor,
               active_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        """Called by a BlockRouter: weight_sum, active_sum (n_slots,) and tokens () summed over real tokens."""
        if layer_id in self._acc:
            _, w, a, t = self._acc[layer_id]
            weight_sum, active_sum, tokens = w + weight_sum, a + active_sum, t + tokens
        self._acc[layer_id] = (slots, weight_sum.detach(), active_sum.detach(), tokens.detach())

    def summary(self) -> dict[int, dict[str, dict[str, float]]]:
        """{layer_id: {slot: {"weight": float, "active": float, "tokens": int}}} (layers that ran)."""
        out: dict[int, dict[str, dict[str, float]]] = {}
        for layer_id in sorted(self._acc):
            slots, w, a, t = self._acc[layer_id]
            n = max(float(t), 1.0)
            w, a = (w.float().cpu() / n).tolist(), (a.float().cpu() / n).tolist()
            out[layer_id] = {s: {"weight": w[j], "active": a[j], "tokens": int(t)} for j, s in enumerate(slots)}
        return out

    def tables(self) -> dict[str, Any]:
        """Plot-ready arrays: {"layers": [..], "slots": [..], "weight": [[..]], "active": [[..]]},
        rows = layers, columns = slots (NaN where a layer lacks that slot)."""
        summary = self.summary()
        slots: list[str] = []
        for per_layer in summary.values():
            slots += [s for s in per_layer if s not in slots]
        nan = float("nan")
        layers = list(summary)
        return {
            "layers": layers,
            "slots": slots,
            "weight": [[summary[i].get(s, {}).get("weight", nan) for s in slots] for i in layers],
            "active": [[summary[i].get(s, {}).get("active", nan) for s in slots] for i in layers],
        }
