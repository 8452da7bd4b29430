"""Selector updates, as Adapters Selector's `update_selector.py` offers them (`--option add|balance|delete
--option_type new|mix --reduce_ratio r`): after tasks were added to or deleted from the registry, or
their rows changed (`scripts/registry.py balance`), the old selector file becomes the new one, and
with an `EmbeddingCache` only rows never embedded before are run through the base.

What changed is read from the registry as it stands, compared with the old selector file: its
classes (`cfg.tasks`) and the rows each was trained on (`task_data`: the data file's SHA-256 and
how many of its rows are used, the first `n_train` or all). `added`: registered, not a class;
`removed`: a class no longer registered; `changed`: both, with other rows (a file written before
`task_data` existed counts every task as changed).
`--action add` needs added tasks and none removed, `delete` the reverse, `balance` the same tasks
with some changed: an action that does not match the registry is a `ValueError` saying what it found.

Classes: the old ones still registered keep their order (an index shifts only past deleted ones),
the added ones are appended in registry order. Routing matches them to the registry's adapters by
name (`moa.tasks.selector.check_tasks`), so the registry's own order may differ.

Modes (the old selector's config is kept: kind, embedding, structure, seed; `steps`, `lr`,
`weight_decay` may change):
- `new`: trained afresh on the registry with that class order (as without --update), standardised
  with its own training rows.
- `mix`: from the old selector. `mlp`: the old network warm-starts (`warm_start_mlp`) and trains on
  every added or changed task's training rows plus ceil(r * n) of each unchanged task's (the first of
  its rows in the selector's order: deterministic by seed, rows the old selector trained on and the
  cache holds); n = the balanced rows per task, r = `reduce_ratio` in (0, 1] (default 0.5). Adapters
  Selector's r is the same share of the old tasks' data, kept beside the new task's. `nearest`: the
  unchanged tasks' keys stay as they are, the added or changed tasks' keys are fit on their rows, the
  removed tasks' keys are dropped (`reduce_ratio` does not apply). Both keep the old standardisation
  statistics: the warm-started first layer and the kept keys live in that space, and statistics of the
  reduced rows would move every input they see; new rows are standardised the same way.
Either way the held-out rows of every task (the first `heldout_per_task` of its rows, as the old
selector held them out) give the report and the softmax temperature, fitted again.

Adapters Selector's `new` trains its (generative) selector further on the new task's data alone;
here that is `mix` with a small r, and `new` is the full refit.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from moa.tasks.embedding import EmbeddingCache
from moa.tasks.registry import Registry
from moa.tasks.selector import (
    Selector,
    embed_splits,
    finish_training,
    fit_keys,
    fit_on_registry,
    task_fingerprint,
    task_splits,
    train_mlp,
)

UPDATE_ACTIONS = ("add", "balance", "delete")
UPDATE_MODES = ("new", "mix")
UPDATABLE = ("steps", "lr", "weight_decay")  # the SelectorConfig fields an update may change
DEFAULT_REDUCE_RATIO = 0.5


@dataclass(frozen=True)
class UpdatePlan:
    """What an update does: the new class order `tasks`, and the tasks added, removed and changed."""

    action: str
    tasks: list[str]
    added: list[str]
    removed: list[str]
    changed: list[str]

    @property
    def refit(self) -> list[str]:
        """The tasks whose rows are new to the selector (added or changed), in class order."""
        return [t for t in self.tasks if t in self.added or t in self.changed]


def _same_rows(old: Optional[dict[str, Any]], now: dict[str, Any]) -> bool:
    return old is not None and old.get("sha256") == now["sha256"] and old.get("rows") == now["rows"]


def plan_update(old: Selector, reg: Registry, action: str) -> UpdatePlan:
    """Compare the registry `reg` as it stands with the selector `old` for `--action` `action`."""
    if action not in UPDATE_ACTIONS:
        raise ValueError(f"--action: expected one of {UPDATE_ACTIONS}, got {action!r}")
    where = reg.source or "the registry"
    added = [t for t in reg.tasks if t not in old.cfg.tasks]
    removed = [t for t in old.cfg.tasks if t not in reg.tasks]
    kept = [t for t in old.cfg.tasks if t in reg.tasks]
    changed = [t for t in kept if not _same_rows(old.task_data.get(t), task_fingerprint(reg.entry(t)))]
    seen = f"(the selector's classes: {old.cfg.tasks}; {where}: {reg.tasks})"
    if action == "add" and not added:
        raise ValueError(f"--action add: {where} registers no task the selector lacks {seen}; register it first "
                         "(scripts/registry.py add)")
    if action == "delete" and not removed:
        raise ValueError(f"--action delete: every class of the selector is still in {where} {seen}; delete the "
                         "task from the registry first (scripts/registry.py delete)")
    if action in ("add", "balance") and removed:
        raise ValueError(f"--action {action}: task(s) {removed} are no longer in {where} {seen}; update with "
                         "--action delete first")
    if action in ("delete", "balance") and added:
        raise ValueError(f"--action {action}: task(s) {added} are new in {where} {seen}; update with --action add "
                         "afterwards")
    if action == "balance" and not changed:
        raise ValueError(f"--action balance: every task in {where} has the rows the selector was trained on (the "
                         "same data files and n_train); change them first (scripts/registry.py balance --n_train N)")
    tasks = kept + added
    if len(tasks) < 2:
        raise ValueError(f"--action delete: the selector would keep {tasks}; a selector needs at least 2 tasks")
    return UpdatePlan(action, tasks, added, removed, changed)


def warm_start_mlp(old: Selector, tasks: Sequence[str], seed: int = 0) -> nn.Sequential:
    """The old selector's MLP for the classes `tasks`: the hidden layer copied; in the output layer a
    class of the old selector keeps its weight row and bias (at its index in `tasks`), a new class gets
    a freshly initialised row (nn.Linear's initialisation, seeded by `seed`), a class not in `tasks` is
    dropped. A new module; the old one is left as it was."""
    cfg = old.cfg
    torch.manual_seed(seed)
    head = nn.Linear(cfg.hidden, len(tasks))
    index = {t: i for i, t in enumerate(cfg.tasks)}
    with torch.no_grad():
        for i, t in enumerate(tasks):
            if t in index:
                head.weight[i] = old.mlp[2].weight[index[t]]
                head.bias[i] = old.mlp[2].bias[index[t]]
    return nn.Sequential(copy.deepcopy(old.mlp[0]), nn.GELU(), head)


def _kept_keys(old: Selector, tasks: Sequence[str], refit: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The old keys of the classes of `tasks` not in `refit`, relabelled with their index in `tasks`."""
    index = {t: i for i, t in enumerate(old.cfg.tasks)}
    keys, key_task = [], []
    for c, t in enumerate(tasks):
        if t in index and t not in refit:
            mine = old.key_task == index[t]
            keys.append(old.keys[mine])
            key_task.append(torch.full((int(mine.sum()),), c, dtype=torch.long))
    return torch.cat(keys), torch.cat(key_task)


def update_selector(model: Any, tokenizer: Any, old: Selector, reg: Registry, action: str, mode: str = "mix",
                    reduce_ratio: Optional[float] = None, rows_per_task: Optional[int] = None,
                    heldout_per_task: Optional[int] = None, embed_batch_size: int = 16, calibrate: bool = True,
                    cache: Optional[EmbeddingCache] = None, **training: Any) -> Selector:
    """The selector `old` updated to the registry `reg` as it stands (see the module docstring), with
    the bare base `model` embedding the rows (through `cache` when given). `heldout_per_task` defaults
    to the old selector's, so that the old tasks' held-out rows stay rows it never trained on;
    `training`: new values of `UPDATABLE` config fields. The report gets an "update" entry."""
    if mode not in UPDATE_MODES:
        raise ValueError(f"--mode: expected one of {UPDATE_MODES}, got {mode!r}")
    unknown = sorted(set(training) - set(UPDATABLE))
    if unknown:
        raise ValueError(f"update_selector: {unknown} cannot change in an update (only {UPDATABLE}); train a new "
                         "selector without --update")
    if model.args.dim != old.cfg.dim:
        raise ValueError(f"--update: the selector was trained on a base of dim {old.cfg.dim}; --ckpt_dir's base has "
                         f"dim {model.args.dim}")
    if reduce_ratio is not None and (mode != "mix" or old.cfg.kind != "mlp"):
        why = "it refits on every row" if mode == "new" else "the unchanged tasks' keys are kept as they are"
        raise ValueError(f"--reduce_ratio: only for --mode mix of an mlp selector (--mode {mode} of a {old.cfg.kind} "
                         f"selector: {why})")
    ratio = DEFAULT_REDUCE_RATIO if reduce_ratio is None else reduce_ratio
    if not 0 < ratio <= 1:
        raise ValueError(f"--reduce_ratio: expected a share in (0, 1] of each unchanged task's rows, got {ratio!r}")
    plan = plan_update(old, reg, action)
    cfg = dataclasses.replace(old.cfg, tasks=plan.tasks, calibration=1.0, **training)
    held = old.report.get("heldout_rows_per_task", 32) if heldout_per_task is None else heldout_per_task
    if mode == "new":
        sel = fit_on_registry(model, tokenizer, reg, cfg, rows_per_task, held, embed_batch_size, calibrate, cache)
    else:
        splits = task_splits(reg, cfg.tasks, rows_per_task, held, cfg.seed)
        if cfg.kind == "mlp":
            n = len(splits[cfg.tasks[0]].train)
            picks = {t: s.train if t in plan.refit else s.train[: math.ceil(ratio * n)] for t, s in splits.items()}
        else:
            picks = {t: splits[t].train for t in plan.refit}
        data = embed_splits(model, tokenizer, cfg, splits, picks, embed_batch_size, cache)
        sel = Selector(cfg, old.mean.clone(), old.std.clone())
        feats = sel._features(data.train_emb)
        if cfg.kind == "mlp":
            sel.mlp = train_mlp(warm_start_mlp(old, cfg.tasks, cfg.seed), feats, data.train_y, cfg)
        else:
            kept, kept_task = _kept_keys(old, cfg.tasks, plan.refit)
            new, new_task = fit_keys(sel, feats, data.train_y, [cfg.tasks.index(t) for t in plan.refit],
                                     torch.Generator().manual_seed(cfg.seed))
            key_task = torch.cat([kept_task, new_task])
            order = key_task.argsort(stable=True)  # keys grouped by class
            sel.keys, sel.key_task = torch.cat([kept, new])[order], key_task[order]
        sel = finish_training(sel, reg, splits, data, calibrate)
    sel.report["update"] = {"action": action, "mode": mode, "reduce_ratio": ratio if mode == "mix" and cfg.kind == "mlp"
                            else None, "from_tasks": list(old.cfg.tasks), "added": plan.added,
                            "removed": plan.removed, "changed": plan.changed}
    return sel
