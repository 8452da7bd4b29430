"""Per-row task-adapter routing for generation (`example.py --adapter_registry FILE --selector PATH
[--fusion top1|topp --top_p_adapters P]`; a data config and an adapter pool in the Adapters Selector
data-config format instead of the registry: `--data_config D --adapter_pool P`).

Before any adapter is attached, the selector reads every row's base-model embedding and gives task
probabilities (R, N). Each row then runs with adapter weights (N,): one-hot on its most probable
task (`top1`), or DLP-LoRA's fusion of the tasks whose probabilities reach `top_p_adapters`
(`topp`, `moa.tasks.fusion.top_p_weights`).

The registry's adapters are served by kind (`moa.tasks.swap`):
- plain LoRAs (kind `lora`) as one bank: batches mix their rows freely, the bank applies each row's own
  adapter(s) in one pass (`moa.tasks.fusion.AttachedBank.rows`);
- every other adapter main_finetune.py writes (kind `moa`: Soft / Sparse MoA, HydraLoRA, MoLoRA, prompt,
  parallel adapter, ...) top-1: its rows form a part of their own, run with that adapter attached and
  its state swapped in (`moa.tasks.swap.AdapterSwap`), the bank suspended meanwhile.
`RoutingPlan.partition` orders the rows in parts: the bank's rows, then each `moa` adapter's rows,
adapters of equal flags next to each other (so each flag set is attached once per pass, the next adapter
only copies its state in); batches are made within a part. `RoutingPlan.serving()` keeps the attached
adapter between batches and puts the model back (bank only, base tensors as loaded) at its end.

Fusion weighs plain-LoRA deltas dW = s B A only. A row whose top-p set holds a `moa` adapter together
with other adapters is a ValueError naming the task, its adapter file and why; a row whose top-p set
is that one adapter alone runs on it, which is top-1 routing.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, TypeVar

import torch

from llama.model import Transformer
from moa.infer.generate import InferenceConfig, RoutingLoader
from moa.tasks.embedding import embed_rows
from moa.tasks.fusion import AttachedBank, attach_bank, load_bank, top_p_weights
from moa.tasks.registry import Registry, as_registry, registry_from_flags, registry_named
from moa.tasks.selector import Selector, check_selector_base, check_tasks, load_selector
from moa.tasks.swap import LORA_KIND, MOA_KIND, AdapterSwap, load_swap_adapter

FUSION_MODES = ("top1", "topp")


class _HasIndex(Protocol):
    index: int


Item = TypeVar("Item", bound=_HasIndex)


def check_fusion(fusion: str, top_p_adapters: float) -> None:
    """`ValueError` naming the flag for an unknown fusion mode or a top-p outside (0, 1]."""
    if fusion not in FUSION_MODES:
        raise ValueError(f"--fusion: expected one of {FUSION_MODES}, got {fusion!r}")
    if not 0 < top_p_adapters <= 1:
        raise ValueError(f"--top_p_adapters: expected a value in (0, 1], got {top_p_adapters!r}")


def check_routing_flags(adapter_path: Optional[str], adapter_registry: Optional[str], selector: Optional[str],
                        fusion: str, top_p_adapters: float, data_config: Optional[str] = None,
                        adapter_pool: Optional[str] = None) -> None:
    """`ValueError` naming the flag for an inconsistent combination of the routing flags (the registry
    named by `--adapter_registry`, or by `--data_config` with `--adapter_pool`: `registry_named`).
    Reads no file."""
    check_fusion(fusion, top_p_adapters)
    routed = registry_named(adapter_registry, data_config, adapter_pool)
    named = "--adapter_registry" if adapter_registry else "--data_config / --adapter_pool"
    if routed and adapter_path:
        raise ValueError(f"{named} and --adapter_path exclude each other (the registry's selector picks the "
                         "adapter of each row)")
    if routed and not selector:
        raise ValueError(f"{named} and --selector go together (the selector trained on that registry)")
    if selector and not routed:
        raise ValueError("--selector goes with the registry it was trained on: --adapter_registry, or "
                         "--data_config with --adapter_pool")


@dataclass
class TaskAdapters:
    """A registry's task adapters on one model, `tasks` in the selector's class order: the plain LoRAs
    attached as one `bank` (None when there are none), `bank_tasks` their task indices in the bank's
    order; the other adapters in `swap`, keyed by task index. `source` names the registry in messages."""

    model: Transformer
    tasks: list[str]
    bank: Optional[AttachedBank]
    bank_tasks: list[int]
    swap: AdapterSwap
    source: str = "registry"

    @classmethod
    def of_bank(cls, bank: AttachedBank) -> "TaskAdapters":
        """The adapters of a bank alone (every task a plain LoRA of it, in its order)."""
        return cls(bank.model, list(bank.tasks), bank, list(range(bank.bank.n)), AdapterSwap(bank.model, {}))

    @property
    def kinds(self) -> list[str]:
        """`lora` or `moa` per task."""
        return [MOA_KIND if i in self.swap.adapters else LORA_KIND for i in range(len(self.tasks))]

    @property
    def max_seq_len(self) -> Optional[int]:
        """The smallest training max_seq_len the adapters record (None: none does)."""
        lengths = [a.max_seq_len for a in self.swap.adapters.values() if a.max_seq_len is not None]
        if self.bank is not None and self.bank.bank.max_seq_len is not None:
            lengths.append(self.bank.bank.max_seq_len)
        return min(lengths) if lengths else None

    def use(self, task: int) -> None:
        """Serve the next forwards with the `moa` adapter of task index `task` (the bank suspended)."""
        if self.bank is not None:
            self.bank.suspend()
        self.swap.use(task)

    @contextlib.contextmanager
    def bank_rows(self, weights: torch.Tensor) -> Iterator[None]:
        """Run the forwards inside on the bank with per-row weights (B, N) over all tasks (zero on the
        `moa` ones); an attached `moa` adapter is detached first."""
        self.restore()
        if self.bank is None:  # no plain LoRA: only rows without any adapter come here
            if bool((weights != 0).any()):
                raise ValueError("bank rows: this registry has no plain LoRA, but the rows give one a weight")
            yield
            return
        with self.bank.rows(weights[:, self.bank_tasks]):
            yield

    def restore(self) -> None:
        """Detach an attached `moa` adapter and resume the bank: the model as loaded."""
        self.swap.restore()
        if self.bank is not None:
            self.bank.resume()

    def row_groups(self, weights: torch.Tensor, fusion: str) -> list[Optional[int]]:
        """How each row of `weights` (R, N) is served: None on the bank, or the task index of the one
        `moa` adapter it runs on. A row that gives a `moa` adapter a weight besides other adapters is a
        `ValueError` naming the task, its adapter file and why (fusion weighs LoRA deltas)."""
        groups: list[Optional[int]] = []
        bad: list[tuple[int, list[int]]] = []  # rows that fuse a moa adapter with others
        for r, row in enumerate(weights):
            used = [int(i) for i in torch.nonzero(row).flatten()]
            if not any(i in self.swap.adapters for i in used):
                groups.append(None)
            elif len(used) == 1:
                groups.append(used[0])
            else:
                bad.append((r, used))
        if bad:
            r, used = bad[0]
            task = next(i for i in used if i in self.swap.adapters)
            adapter = self.swap.adapters[task]
            more = f" ({len(bad) - 1} more rows fuse such an adapter)" if len(bad) > 1 else ""
            raise ValueError(
                f"--fusion {fusion}: row {r} fuses tasks {[self.tasks[i] for i in used]} (weights "
                f"{[round(float(weights[r, i]), 4) for i in used]}){more}, but task {self.tasks[task]!r} of "
                f"{self.source} is a {adapter.method} adapter ({adapter.path}), not a plain LoRA: fusion weighs "
                f"LoRA deltas dW = s B A, and this adapter's output (its routers, prompts or nonlinear branches) "
                f"is no weight delta ({adapter.why_not_lora}). A row whose top-p set is that adapter alone runs "
                f"on it (top-1); route with --fusion top1 or a smaller --top_p_adapters, or register a plain "
                f"LoRA for that task")
        return groups


@dataclass
class RoutingPlan:
    """The routing of every test row (indices into the test rows): task `probs` (R, N), the
    adapter `weights` (R, N) each row runs with (one-hot for top1), the top-1 `choice`, the task
    adapters attached to the model that runs them, and `groups`: how each row is served (None: on the
    bank; a task index: on that `moa` adapter, attached)."""

    tasks: list[str]
    fusion: str
    probs: torch.Tensor
    weights: torch.Tensor
    choice: list[int]
    adapters: TaskAdapters
    groups: list[Optional[int]] = field(init=False)
    _serving: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.groups = self.adapters.row_groups(self.weights, self.fusion)

    @property
    def max_seq_len(self) -> Optional[int]:
        """The adapters' smallest training max_seq_len (routed rows run at it, as one adapter at its own)."""
        return self.adapters.max_seq_len

    def partition(self, items: Sequence[Item]) -> list[list[Item]]:
        """`items` (rows by `index`) in parts served alike, in serving order: the bank's rows, then each
        `moa` adapter's rows, adapters of equal flags next to each other; the order within a part is
        kept. Make the batches within a part (`rows` takes one part's batch)."""
        parts: dict[Optional[int], list[Item]] = {}
        for item in items:
            parts.setdefault(self.groups[item.index], []).append(item)
        adapters = self.adapters.swap.adapters
        flag_sets: list[Any] = []  # distinct adapter flags, in task order (MoAConfig is not hashable)
        for task in sorted(k for k in parts if k is not None):
            if adapters[task].cfg not in flag_sets:
                flag_sets.append(adapters[task].cfg)
        order = sorted(parts, key=lambda k: (-1, -1) if k is None else (flag_sets.index(adapters[k].cfg), k))
        return [parts[k] for k in order]

    @contextlib.contextmanager
    def serving(self) -> Iterator["RoutingPlan"]:
        """Generate the batches inside: an attached `moa` adapter stays attached from one batch to the
        next (the next one of equal flags only copies its state in); at the end the model is put back."""
        self._serving = True
        try:
            yield self
        finally:
            self._serving = False
            self.adapters.restore()

    @contextlib.contextmanager
    def rows(self, batch: Sequence[_HasIndex]) -> Iterator[None]:
        """Run the forwards inside (one batch's generation) with each row of `batch` on its adapters.
        The batch must come from one part of `partition`. Outside `serving()` an attached adapter is
        detached again at the end of the batch."""
        groups = {self.groups[p.index] for p in batch}
        if len(groups) > 1:
            raise ValueError(f"this batch mixes rows served differently ({sorted(map(str, groups))}: bank rows and "
                             "rows of attached adapters): make the batches within the parts of RoutingPlan.partition")
        group = groups.pop() if groups else None
        if group is None:
            with self.adapters.bank_rows(self.weights[[p.index for p in batch]]):
                yield
            return
        self.adapters.use(group)
        try:
            yield
        finally:
            if not self._serving:
                self.adapters.restore()

    def row_info(self, index: int) -> dict[str, Any]:
        """What to record with row `index`'s prediction: the chosen task and the adapter weights."""
        return {"selected_task": self.tasks[self.choice[index]],
                "adapter_weights": {t: round(float(w), 6) for t, w in zip(self.tasks, self.weights[index])
                                    if float(w) > 0}}


def route_rows(model: Transformer, tokenizer: Any, rows: Sequence[dict], sel: Selector, adapters: TaskAdapters,
               fusion: str = "top1", top_p_adapters: float = 0.9) -> RoutingPlan:
    """Route `rows` with the selector (it embeds them with the bare base: the bank runs no adapter
    outside `rows`, and an attached `moa` adapter is detached first) onto `adapters`, attached to
    `model`, for that fusion mode."""
    check_fusion(fusion, top_p_adapters)
    if fusion == "topp" and adapters.bank is not None and adapters.bank.bank.dora_tasks:
        raise ValueError(f"--fusion topp: the adapters of {adapters.bank.bank.dora_tasks} are DoRA, whose outputs "
                         "do not mix linearly; route them with --fusion top1")
    adapters.restore()
    probs = sel.probs(embed_rows(model, tokenizer, rows, sel.cfg.embed_config))  # (R, N), embedded as it was trained
    choice = probs.argmax(-1)
    if fusion == "topp":
        weights = top_p_weights(probs, top_p_adapters)
    else:
        weights = torch.nn.functional.one_hot(choice, len(adapters.tasks)).float()
    return RoutingPlan(adapters.tasks, fusion, probs, weights, choice.tolist(), adapters)


def load_task_adapters(model: Transformer, reg: Registry, base_dir: str = "the base model") -> TaskAdapters:
    """Attach a registry's adapters to `model` (a bare base; `base_dir` names it in messages): its plain
    LoRAs as one bank, its other adapters read and checked against the base once (another base's
    shapes or layer count: a ValueError naming the task and file), held for swapping in."""
    reg.validate()  # also records each entry's kind
    where = str(reg.source or "registry")
    swaps = {i: load_swap_adapter(model, e.task, e.adapter, base_dir, where=f"{where}: task {e.domain}/{e.task}")
             for i, e in enumerate(reg.entries) if e.kind == MOA_KIND}
    bank_tasks = [i for i, e in enumerate(reg.entries) if e.kind == LORA_KIND]
    bank = None
    if bank_tasks:
        bank = attach_bank(model, load_bank([reg.entries[i].task for i in bank_tasks],
                                            [reg.entries[i].adapter for i in bank_tasks], dora_ok=True))
    return TaskAdapters(model, reg.tasks, bank, bank_tasks, AdapterSwap(model, swaps), where)


def load_routing(model: Transformer, registry: Registry | str | os.PathLike, selector: Selector | str | os.PathLike,
                 base_dir: str = "the base model") -> tuple[Selector, TaskAdapters]:
    """Read the selector (and the registry, when given by path: a registry JSON or domain/task/ tree; a
    `Registry` is taken as it is, e.g. a data config and an adapter pool read by `registry_from_flags`), and attach
    the registry's adapters to `model` (bare base; `load_task_adapters`). The registry's tasks must be
    the selector's classes, in any order (an updated selector keeps its old classes' indices): the
    adapters are taken in the selector's class order. `selector`: a file, or a `Selector` already read."""
    reg = as_registry(registry)
    sel = selector if isinstance(selector, Selector) else load_selector(selector)
    check_tasks(sel, reg.tasks, reg.flags)
    reg = replace(reg, entries=[reg.entry(t) for t in sel.cfg.tasks])
    return sel, load_task_adapters(model, reg, base_dir)


def plan_task_routing(model: Transformer, tokenizer: Any, rows: Sequence[dict], registry: Registry | str | os.PathLike,
                      selector: Selector | str | os.PathLike, fusion: str = "top1", top_p_adapters: float = 0.9,
                      base_dir: str = "the base model") -> RoutingPlan:
    """`load_routing`, then `route_rows` (example.py's one pass over a test file)."""
    sel, adapters = load_routing(model, registry, selector, base_dir)
    return route_rows(model, tokenizer, rows, sel, adapters, fusion, top_p_adapters)


def generation_routing(cfg: InferenceConfig) -> Optional[RoutingLoader]:
    """The routing that example.py's flags (`cfg`) describe, as `moa.infer.generate.run_inference(cfg,
    routing)` takes it: None when they name no registry; otherwise the flags are checked
    (`check_routing_flags`, reading no file) and the loader returned reads the registry
    (`registry_from_flags`) and the selector when generation calls it, before the model is loaded (a
    selector of another base or registry is refused there: `check_selector_base`, `check_tasks`); the
    planner it returns routes the test rows on the loaded base (`plan_task_routing`)."""
    check_routing_flags(cfg.adapter_path, cfg.adapter_registry, cfg.selector, cfg.fusion, cfg.top_p_adapters,
                        cfg.data_config, cfg.adapter_pool)
    if not registry_named(cfg.adapter_registry, cfg.data_config, cfg.adapter_pool):
        return None

    def load() -> Callable[[Transformer, Any, Sequence[dict]], RoutingPlan]:
        registry = registry_from_flags(cfg.adapter_registry, cfg.data_config, cfg.adapter_pool)
        sel = load_selector(cfg.selector)
        check_selector_base(sel, cfg.selector, cfg.ckpt_dir)
        check_tasks(sel, registry.tasks, registry.flags)

        def plan(model: Transformer, tokenizer: Any, rows: Sequence[dict]) -> RoutingPlan:
            return plan_task_routing(model, tokenizer, rows, registry, sel, cfg.fusion,
                                     cfg.top_p_adapters, base_dir=cfg.ckpt_dir)

        return plan

    return load
