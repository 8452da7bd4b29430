"""Per-row task-adapter routing for generation (`example.py --adapter_registry FILE --selector PATH
[--fusion top1|topp --top_p_adapters P]`).

Before any adapter is attached, the selector reads every row's base-model embedding and gives task
probabilities (R, N). Each row then runs with adapter weights (N,): one-hot on its most probable
task (`top1`), or DLP-LoRA's fusion of the tasks whose probabilities reach `top_p_adapters`
(`topp`, `moa.tasks.fusion.top_p_weights`). Batches mix rows freely: the bank applies each row's
own adapters in one pass (`moa.tasks.fusion.AttachedBank.rows`).
"""
from __future__ import annotations

from dataclasses import dataclass
import contextlib
from typing import Any, Iterator, Optional, Protocol, Sequence

import torch

from llama.model import Transformer
from moa.tasks.embedding import embed_rows
from moa.tasks.fusion import AttachedBank, attach_bank, load_bank, top_p_weights
from moa.tasks.registry import load_registry
from moa.tasks.selector import Selector, check_tasks, load_selector

FUSION_MODES = ("top1", "topp")


class _HasIndex(Protocol):
    index: int


def check_fusion(fusion: str, top_p_adapters: float) -> None:
    """`ValueError` naming the flag for an unknown fusion mode or a top-p outside (0, 1]."""
    if fusion not in FUSION_MODES:
        raise ValueError(f"--fusion: expected one of {FUSION_MODES}, got {fusion!r}")
    if not 0 < top_p_adapters <= 1:
        raise ValueError(f"--top_p_adapters: expected a value in (0, 1], got {top_p_adapters!r}")


def check_routing_flags(adapter_path: Optional[str], adapter_registry: Optional[str], selector: Optional[str],
                        fusion: str, top_p_adapters: float) -> None:
    """`ValueError` naming the flag for an inconsistent combination of the routing flags."""
    check_fusion(fusion, top_p_adapters)
    if adapter_registry and adapter_path:
        raise ValueError("--adapter_registry and --adapter_path exclude each other (the registry's selector "
                         "picks the adapter of each row)")
    if bool(adapter_registry) != bool(selector):
        raise ValueError("--adapter_registry and --selector go together (the selector trained on that registry)")


@dataclass
class RoutingPlan:
    """The routing of every test row (indices into the test rows): task `probs` (R, N), the
    adapter `weights` (R, N) each row runs with (one-hot for top1), the top-1 `choice`, and the bank
    attached to the model that runs them."""

    tasks: list[str]
    fusion: str
    probs: torch.Tensor
    weights: torch.Tensor
    choice: list[int]
    bank: AttachedBank

    @contextlib.contextmanager
    def rows(self, batch: Sequence[_HasIndex]) -> Iterator[None]:
        """Run the forwards inside (one batch's generation) with each row of `batch` on its adapters."""
        with self.bank.rows(self.weights[[p.index for p in batch]]):
            yield

    def row_info(self, index: int) -> dict[str, Any]:
        """What to record with row `index`'s prediction: the chosen task and the adapter weights."""
        return {"selected_task": self.tasks[self.choice[index]],
                "adapter_weights": {t: round(float(w), 6) for t, w in zip(self.tasks, self.weights[index])
                                    if float(w) > 0}}


def route_rows(model: Transformer, tokenizer: Any, rows: Sequence[dict], sel: Selector, bank: AttachedBank,
               fusion: str = "top1", top_p_adapters: float = 0.9) -> RoutingPlan:
    """Route `rows` with the selector (it embeds them with the bare base: the bank runs no adapter
    outside `rows`) onto `bank`, attached to `model`, for that fusion mode."""
    check_fusion(fusion, top_p_adapters)
    if fusion == "topp" and bank.bank.dora_tasks:
        raise ValueError(f"--fusion topp: the adapters of {bank.bank.dora_tasks} are DoRA, whose outputs do not "
                         "mix linearly; route them with --fusion top1")
    probs = sel.probs(embed_rows(model, tokenizer, rows, sel.cfg.max_tokens))  # (R, N)
    choice = probs.argmax(-1)
    if fusion == "topp":
        weights = top_p_weights(probs, top_p_adapters)
    else:
        weights = torch.nn.functional.one_hot(choice, bank.bank.n).float()
    return RoutingPlan(bank.tasks, fusion, probs, weights, choice.tolist(), bank)


def load_routing(model: Transformer, adapter_registry: str, selector: str) -> tuple[Selector, AttachedBank]:
    """Read the registry and its selector, and attach the registry's adapters to `model` (bare base) as
    one bank. The registry's tasks must be the selector's classes, in its order."""
    reg = load_registry(adapter_registry)
    sel = load_selector(selector)
    check_tasks(sel, reg.tasks, f"--adapter_registry {adapter_registry}")
    return sel, attach_bank(model, load_bank(reg.tasks, [e.adapter for e in reg.entries], dora_ok=True))


def plan_task_routing(model: Transformer, tokenizer: Any, rows: Sequence[dict], adapter_registry: str,
                      selector: str, fusion: str = "top1", top_p_adapters: float = 0.9) -> RoutingPlan:
    """`load_routing`, then `route_rows` (example.py's one pass over a test file)."""
    sel, bank = load_routing(model, adapter_registry, selector)
    return route_rows(model, tokenizer, rows, sel, bank, fusion, top_p_adapters)
