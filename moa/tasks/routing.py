"""Per-row task-adapter routing for generation (`example.py --adapter_registry FILE --selector PATH
[--fusion top1|topp --top_p_adapters P]`).

Before any adapter is attached, the selector reads every row's base-model embedding and gives task
probabilities (R, N). Then:
- `top1`: each row runs with its most probable task's adapter. Rows are grouped by that choice and
  each group is batched on its own; before a batch, its adapter's tensors are loaded into the
  model's one plain LoRA per site (`moa.tasks.fusion.use_adapter`).
- `topp`: each row runs with the weighted fusion of the adapters whose probabilities reach
  `top_p_adapters` (DLP-LoRA; `moa.tasks.fusion.top_p_weights`); batches mix rows freely, each row with its
  own weights, through the stacked MoLoRA sites (`moa.tasks.fusion.set_row_weights`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence, TypeVar

import torch

from llama.model import Transformer
from moa.tasks.embedding import embed_rows
from moa.tasks.fusion import AdapterBank, attach_bank, group_rows, load_bank, set_row_weights, top_p_weights, use_adapter
from moa.tasks.registry import load_registry
from moa.tasks.selector import check_tasks, load_selector

FUSION_MODES = ("top1", "topp")


class _HasIndex(Protocol):
    index: int


P = TypeVar("P", bound=_HasIndex)


def check_routing_flags(adapter_path: Optional[str], adapter_registry: Optional[str], selector: Optional[str],
                        fusion: str, top_p_adapters: float) -> None:
    """`ValueError` naming the flag for an inconsistent combination of the routing flags."""
    if fusion not in FUSION_MODES:
        raise ValueError(f"--fusion: expected one of {FUSION_MODES}, got {fusion!r}")
    if not 0 < top_p_adapters <= 1:
        raise ValueError(f"--top_p_adapters: expected a value in (0, 1], got {top_p_adapters!r}")
    if adapter_registry and adapter_path:
        raise ValueError("--adapter_registry and --adapter_path exclude each other (the registry's selector "
                         "picks the adapter of each row)")
    if bool(adapter_registry) != bool(selector):
        raise ValueError("--adapter_registry and --selector go together (the selector trained on that registry)")


@dataclass
class RoutingPlan:
    """The routing of every test row (indices into the test rows): task `probs` (R, N), the
    adapter `weights` (R, N) each row runs with (one-hot for top1), and the top-1 `choice`."""

    tasks: list[str]
    fusion: str
    probs: torch.Tensor
    weights: torch.Tensor
    choice: list[int]
    bank: AdapterBank
    model: Transformer
    _loaded: Optional[int] = None

    def batches(self, prompts: Sequence[P], make_batches: Callable[[list[P]], list[list[P]]]) -> list[list[P]]:
        """top1: `make_batches` over each choice's prompts separately (a batch never mixes adapters);
        topp: over all prompts."""

        if self.fusion == "topp":
            return make_batches(list(prompts))
        out: list[list[P]] = []
        for task in sorted(group_rows([self.choice[p.index] for p in prompts])):
            out += make_batches([p for p in prompts if self.choice[p.index] == task])
        return out

    def before_batch(self, batch: Sequence[_HasIndex]) -> None:
        """Set the model up for `batch` (its rows' adapter, or their fusion weights in batch order)."""

        if self.fusion == "topp":
            set_row_weights(self.model, self.weights[[p.index for p in batch]])
            return
        chosen = {self.choice[p.index] for p in batch}
        if len(chosen) != 1:
            raise ValueError(f"top-1 batch mixes adapters {sorted(chosen)}: batch with RoutingPlan.batches")
        (task,) = chosen
        if task != self._loaded:
            use_adapter(self.model, self.bank, task)
            self._loaded = task

    def row_info(self, index: int) -> dict[str, Any]:
        """What to record with row `index`'s prediction: the chosen task and the adapter weights."""
        return {"selected_task": self.tasks[self.choice[index]],
                "adapter_weights": {t: round(float(w), 6) for t, w in zip(self.tasks, self.weights[index])
                                    if float(w) > 0}}


def plan_task_routing(model: Transformer, tokenizer: Any, rows: Sequence[dict], adapter_registry: str,
                      selector: str, fusion: str = "top1", top_p_adapters: float = 0.9) -> RoutingPlan:
    """Route `rows` with the selector, then attach the registry's adapters to `model` (bare base) for
    that mode. The registry's tasks must be the selector's classes, in its order."""

    reg = load_registry(adapter_registry)
    sel = load_selector(selector)
    check_tasks(sel, reg.tasks, f"--adapter_registry {adapter_registry}")
    probs = sel.probs(embed_rows(model, tokenizer, rows, sel.cfg.max_tokens))  # (R, N)
    choice = probs.argmax(-1)
    if fusion == "topp":
        weights = top_p_weights(probs, top_p_adapters)
    else:
        weights = torch.nn.functional.one_hot(choice, len(reg.tasks)).float()
    bank = load_bank(reg.tasks, [e.adapter for e in reg.entries])
    attach_bank(model, bank, fused=fusion == "topp")
    return RoutingPlan(reg.tasks, fusion, probs, weights, choice.tolist(), bank, model)
