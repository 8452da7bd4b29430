"""Task selectors over base-model embeddings (`moa.tasks.embedding`): which task adapter(s) a row needs.

Two kinds, one file format:
- `mlp` (MoLE's task classifier, DLP-LoRA's mini-MLP): Linear(dim, hidden) -> GELU ->
  Linear(hidden, N) over standardised embeddings, trained with AdamW on a class-weighted
  cross-entropy (full batch); probabilities = softmax of its logits.
- `nearest` (Adapters Selector): `n_clusters` examples kept per task, as k-means centroids (Lloyd's
  algorithm with k-means++ seeding, in the metric's space: unit-normalised embeddings for `cos`,
  standardised ones for `ip` and `l2`); a task's score is its best key's similarity (`cos`: cosine,
  `ip`: inner product, `l2`: minus the squared distance), probabilities = softmax(score / temperature).
  Inner product is not a distance: it favours long keys, so with many centroids per task the one
  furthest from the origin wins; `ip` works best with few keys (`n_clusters 1` = the task mean).

A selector file (`torch.save`, loadable with `weights_only=True`) holds the config (kind, tasks in
class order, embedding settings, ...), the standardisation statistics, the parameters or keys, and
the held-out report of its training.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moa.checks import check_int, load_tensors
from moa.files.atomic import atomic_write_files
from moa.train.data import load_rows
from moa.tasks.embedding import embed_rows

if TYPE_CHECKING:  # a type hint only: the registry is read by the caller
    from moa.tasks.registry import Registry

SELECTOR_KINDS = ("mlp", "nearest")
METRICS = ("cos", "ip", "l2")
FORMAT = "moa-task-selector-v1"


@dataclass
class SelectorConfig:
    """How a selector is built (saved inside its file). `tasks`: class order (the registry's order)."""

    kind: str
    tasks: list[str]
    dim: int
    max_tokens: int = 256  # tokens of each row's text embedded (moa.tasks.embedding.row_tokens)
    standardize: bool = True  # z-score embeddings with the training rows' mean/std first
    hidden: int = 256  # mlp
    steps: int = 300  # mlp: full-batch AdamW steps
    lr: float = 1e-3
    weight_decay: float = 0.01
    metric: str = "cos"  # nearest
    n_clusters: int = 16  # nearest: keys kept per task
    temperature: float = 0.1  # nearest: softmax temperature of the task scores
    seed: int = 0
    # Fitted after training on the held-out rows (`calibrate_temperature`): the scores are divided by it
    # before the softmax, so that the probabilities (and top-p fusion) are calibrated; argmax unchanged.
    calibration: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in SELECTOR_KINDS:
            raise ValueError(f"--kind: expected one of {SELECTOR_KINDS}, got {self.kind!r}")
        if self.metric not in METRICS:
            raise ValueError(f"--metric: expected one of {METRICS}, got {self.metric!r}")
        if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"selector: need at least 2 distinct tasks, got {self.tasks}")
        for flag in ("dim", "max_tokens", "hidden", "steps", "n_clusters"):
            check_int(flag, getattr(self, flag), 1)
        if not self.temperature > 0:
            raise ValueError(f"--temperature: expected > 0, got {self.temperature!r}")
        if not self.calibration > 0:
            raise ValueError(f"selector calibration temperature: expected > 0, got {self.calibration!r}")


@dataclass
class Selector:
    """A trained selector. `mean`, `std` (dim,): standardisation; `mlp` (kind mlp) or `keys` (K, dim)
    with `key_task` (K,) int64 (kind nearest); `report`: held-out accuracy of its training."""

    cfg: SelectorConfig
    mean: torch.Tensor
    std: torch.Tensor
    mlp: Optional[nn.Sequential] = None
    keys: Optional[torch.Tensor] = None
    key_task: Optional[torch.Tensor] = None
    report: dict[str, Any] = field(default_factory=dict)

    def _features(self, emb: torch.Tensor) -> torch.Tensor:
        if emb.dim() != 2 or emb.shape[1] != self.cfg.dim:
            raise ValueError(f"selector: expected embeddings (B, {self.cfg.dim}) from a base of dim "
                             f"{self.cfg.dim}, got {tuple(emb.shape)}: the selector was trained on another base")
        x = emb.float()
        return (x - self.mean) / self.std if self.cfg.standardize else x

    @torch.no_grad()
    def scores(self, emb: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, dim) -> per-task scores (B, N): MLP logits, or best-key similarity / temperature,
        divided by the fitted calibration temperature."""
        return self._raw_scores(emb) / self.cfg.calibration

    def _raw_scores(self, emb: torch.Tensor) -> torch.Tensor:
        x = self._features(emb)
        if self.cfg.kind == "mlp":
            return self.mlp(x)
        return task_scores(x, self.keys, self.key_task, len(self.cfg.tasks), self.cfg.metric) / self.cfg.temperature

    def probs(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, dim) -> (B, N) task probabilities (rows sum to 1)."""
        return self.scores(emb).softmax(-1)

    def predict(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, dim) -> (B,) int64 index of the chosen task."""
        return self.scores(emb).argmax(-1)


def similarity(q: torch.Tensor, keys: torch.Tensor, metric: str) -> torch.Tensor:
    """q (B, d), keys (K, d) -> (B, K), larger = closer: cosine, inner product or -squared L2."""
    if metric == "cos":
        return F.normalize(q, dim=-1) @ F.normalize(keys, dim=-1).t()
    if metric == "ip":
        return q @ keys.t()
    if metric == "l2":
        return -torch.cdist(q, keys).pow(2)
    raise ValueError(f"--metric: expected one of {METRICS}, got {metric!r}")


def task_scores(q: torch.Tensor, keys: torch.Tensor, key_task: torch.Tensor, n_tasks: int,
                metric: str) -> torch.Tensor:
    """Per task, the similarity of its closest key: q (B, d), keys (K, d), key_task (K,) -> (B, n_tasks)."""
    sim = similarity(q, keys, metric)  # (B, K)
    out = torch.full((q.shape[0], n_tasks), float("-inf"), dtype=sim.dtype)
    return out.scatter_reduce(1, key_task.expand_as(sim), sim, reduce="amax")


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 25) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding: x (n, d) -> centroids (min(k, n), d)."""
    n = x.shape[0]
    if k >= n:
        return x.clone()
    centroids = [x[torch.randint(n, (1,), generator=generator)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centroids)).pow(2).min(1).values  # (n,)
        total = float(d2.sum())
        pick = (torch.multinomial(d2 / total, 1, generator=generator) if total > 0
                else torch.randint(n, (1,), generator=generator))
        centroids.append(x[pick].squeeze(0))
    c = torch.stack(centroids)  # (k, d)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)  # (n,)
        counts = torch.bincount(assign, minlength=k).clamp_min(1).to(x.dtype)[:, None]
        new = torch.zeros_like(c).index_add_(0, assign, x) / counts
        empty = torch.bincount(assign, minlength=k) == 0
        new[empty] = c[empty]  # a centroid that lost every point stays where it was
        if torch.allclose(new, c):
            break
        c = new
    return c


def fit_selector(cfg: SelectorConfig, emb: torch.Tensor, labels: torch.Tensor) -> Selector:
    """Train a selector on embeddings (n, dim) fp32 with task labels (n,) int64 in [0, N)."""
    n_tasks = len(cfg.tasks)
    if emb.shape[0] != labels.shape[0] or emb.dim() != 2 or emb.shape[1] != cfg.dim:
        raise ValueError(f"fit_selector: embeddings {tuple(emb.shape)} and labels {tuple(labels.shape)} "
                         f"do not match (expected (n, {cfg.dim}) and (n,))")
    missing = [cfg.tasks[t] for t in range(n_tasks) if not bool((labels == t).any())]
    if missing:
        raise ValueError(f"fit_selector: no training rows for task(s) {missing}")
    x = emb.float()
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones(cfg.dim)
    sel = Selector(cfg, mean, std)
    feats = sel._features(x)
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.kind == "nearest":
        space = F.normalize(feats, dim=-1) if cfg.metric == "cos" else feats
        keys, key_task = [], []
        for t in range(n_tasks):
            c = kmeans(space[labels == t], cfg.n_clusters, generator)
            keys.append(c)
            key_task.append(torch.full((c.shape[0],), t, dtype=torch.long))
        sel.keys, sel.key_task = torch.cat(keys), torch.cat(key_task)
        return sel
    torch.manual_seed(cfg.seed)  # the MLP's initialisation
    mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, n_tasks))
    counts = torch.bincount(labels, minlength=n_tasks).float()
    class_weight = counts.sum() / (n_tasks * counts)  # balanced loss even if the rows are not
    opt = torch.optim.AdamW(mlp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    with torch.enable_grad():
        for _ in range(cfg.steps):
            loss = F.cross_entropy(mlp(feats), labels, weight=class_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    sel.mlp = mlp.eval().requires_grad_(False)
    return sel


CALIBRATION_RANGE = (0.01, 100.0)  # the temperatures searched (log-spaced), beyond which nothing changes


@torch.no_grad()
def calibrate_temperature(sel: Selector, emb: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Temperature scaling (Guo et al., 2017): the T in `CALIBRATION_RANGE` that minimises the mean
    negative log-likelihood of `labels` under softmax(scores / T) on held-out embeddings, by a
    log-spaced grid then golden-section search on log T (the NLL is convex in 1/T). Sets
    `sel.cfg.calibration` and returns {"temperature", "nll_before", "nll_after"}. Routing by argmax
    is unchanged; probabilities, and so top-p fusion, follow the held-out error rate."""
    raw = sel._raw_scores(emb).double()
    target = labels.long()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(raw / math.exp(log_t), target))

    lo, hi = (math.log(v) for v in CALIBRATION_RANGE)
    grid = [lo + (hi - lo) * i / 40 for i in range(41)]
    best = min(range(len(grid)), key=lambda i: nll(grid[i]))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if nll(c) <= nll(d):
            b = d
        else:
            a = c
    log_t = (a + b) / 2
    before = nll(0.0)
    sel.cfg.calibration = math.exp(log_t)
    return {"temperature": sel.cfg.calibration, "nll_before": before, "nll_after": nll(log_t)}


def routing_report(sel: Selector, emb: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Accuracy of `sel` on labelled embeddings: overall, per task, and the confusion counts
    (`confusion[true][chosen]`)."""
    pred = sel.predict(emb)
    tasks = sel.cfg.tasks
    per_task = {t: float((pred[labels == i] == i).float().mean()) if bool((labels == i).any()) else None
                for i, t in enumerate(tasks)}
    confusion = {t: {u: int(((labels == i) & (pred == j)).sum()) for j, u in enumerate(tasks)}
                 for i, t in enumerate(tasks)}
    return {"accuracy": float((pred == labels).float().mean()), "per_task": per_task, "rows": int(labels.numel()),
            "confusion": confusion}


# ---- the selector's dataset from the registry ---------------------------------------------------------

def selector_rows(reg: Registry, rows_per_task: Optional[int], heldout_per_task: int,
                  seed: int = 0) -> tuple[list[dict], list[int], list[dict], list[int]]:
    """Turn the tasks' own training rows into the selector's dataset (DLP-LoRA's data maker).

    Per task (in registry order): its data file's rows, the first `n_train` of them when the
    registry sets it, shuffled with `seed`; the first `heldout_per_task` are held out, and the same
    number of the rest is taken from every task (balanced): the smallest task's count, capped at
    `rows_per_task`. Returns (train rows, train labels, held-out rows, held-out labels).
    """
    if heldout_per_task < 0:
        raise ValueError(f"--heldout_per_task: expected >= 0, got {heldout_per_task}")
    rng = random.Random(seed)
    pools = []
    for e in reg.entries:
        rows = load_rows(e.data)[: e.n_train]
        rng.shuffle(rows)
        if len(rows) <= heldout_per_task:
            raise ValueError(f"task {e.task}: {len(rows)} rows in {e.data}, not more than --heldout_per_task "
                             f"{heldout_per_task}")
        pools.append(rows)
    n = min(len(p) - heldout_per_task for p in pools)
    if rows_per_task is not None:
        n = min(n, rows_per_task)
    train, train_y, held, held_y = [], [], [], []
    for t, rows in enumerate(pools):
        held += rows[:heldout_per_task]
        held_y += [t] * heldout_per_task
        train += rows[heldout_per_task: heldout_per_task + n]
        train_y += [t] * n
    return train, train_y, held, held_y


# ---- file ----------------------------------------------------------------------------------------------

def save_selector(sel: Selector, path: str | os.PathLike) -> Path:
    """Write the selector to `path` (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob: dict[str, Any] = {"format": FORMAT, "config": dataclasses.asdict(sel.cfg), "mean": sel.mean,
                            "std": sel.std, "report": sel.report}
    if sel.cfg.kind == "mlp":
        blob["mlp"] = {k: v.detach().clone() for k, v in sel.mlp.state_dict().items()}
    else:
        blob["keys"], blob["key_task"] = sel.keys, sel.key_task
    atomic_write_files({str(path): lambda tmp: torch.save(blob, tmp)})
    return path


def load_selector(path: str | os.PathLike) -> Selector:
    """Read a selector file written by `save_selector`; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--selector {path}: no such file")
    try:
        blob = load_tensors(path, "selector file")
    except ValueError as e:
        raise ValueError(f"--selector {path}: cannot read it ({e})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"--selector {path}: not a selector file (written by scripts/train_selector.py)")
    try:
        cfg = SelectorConfig(**blob["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"--selector {path}: its config does not load ({e}); retrain it with "
                         "scripts/train_selector.py") from None
    sel = Selector(cfg, blob["mean"], blob["std"], report=blob.get("report", {}))
    if cfg.kind == "mlp":
        sel.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, len(cfg.tasks)))
        sel.mlp.load_state_dict(blob["mlp"])
        sel.mlp.eval().requires_grad_(False)
    else:
        sel.keys, sel.key_task = blob["keys"], blob["key_task"]
    return sel


def check_tasks(sel: Selector, tasks: Sequence[str], where: str) -> None:
    """`ValueError` unless the selector's classes are exactly `tasks`, in that order."""
    if list(sel.cfg.tasks) != list(tasks):
        raise ValueError(f"--selector (trained for tasks {sel.cfg.tasks}) does not fit {where}, which lists {list(tasks)} "
                         "(retrain it with scripts/train_selector.py after adding/deleting tasks)")


def train_on_registry(model: Any, tokenizer: Any, reg: Registry, kind: str, rows_per_task: Optional[int] = None,
                      heldout_per_task: int = 32, embed_batch_size: int = 16, calibrate: bool = True,
                      **options: Any) -> Selector:
    """Embed the registry's training rows with the bare base `model` (`selector_rows`), fit a
    selector of `kind` (`options`: the other `SelectorConfig` fields), and store its held-out routing
    report (`routing_report`, plus the rows used per task) in `selector.report`. With `calibrate` and
    held-out rows, the softmax temperature is then fitted on them (`calibrate_temperature`, in the
    report as "calibration")."""
    cfg = SelectorConfig(kind=kind, tasks=reg.tasks, dim=model.args.dim, **options)
    train, train_y, held, held_y = selector_rows(reg, rows_per_task, heldout_per_task, cfg.seed)
    emb = embed_rows(model, tokenizer, train + held, cfg.max_tokens, embed_batch_size)
    sel = fit_selector(cfg, emb[: len(train)], torch.tensor(train_y))
    sel.report = {"train_rows_per_task": len(train) // len(reg.tasks), "heldout_rows_per_task": heldout_per_task,
                  "train": routing_report(sel, emb[: len(train)], torch.tensor(train_y))["accuracy"]}
    if held:
        sel.report["heldout"] = routing_report(sel, emb[len(train):], torch.tensor(held_y))
        if calibrate:
            sel.report["calibration"] = calibrate_temperature(sel, emb[len(train):], torch.tensor(held_y))
    return sel
