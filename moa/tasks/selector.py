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
class order, embedding settings: encoder, fields, max_tokens, ...), the standardisation statistics,
the parameters or keys, each task's training data as it was (`task_data`: file, SHA-256, rows used;
what `moa.tasks.selector_update` compares), and the held-out report of its training.

(Over 400 lines: the selector, its file, and the dataset it is trained on from a registry, which
shares its config; the in-place updates are `moa.tasks.selector_update`.)

Class order: a selector trained afresh takes the registry's task order; an updated one keeps its old
classes' indices and appends the added ones (`moa.tasks.selector_update`), so routing matches the
registry's adapters to the selector's classes by name (`check_tasks`), never by position.
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

from llama.checkpoint import read_model_args
from moa.atomic import atomic_write_files
from moa.checks import check_int, load_tensors
from moa.files.settings import sha256_file
from moa.tasks.embedding import EmbedConfig, EmbeddingCache, embed_tokens, parse_encoder, row_tokens
from moa.train.data import load_rows

if TYPE_CHECKING:  # type hints only: the registry is read by the caller
    from moa.tasks.registry import Registry, TaskEntry

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
    # What is embedded (moa.tasks.embedding.EmbedConfig); files written before these fields load as
    # "hidden" over instruction + input, which is what that code embedded.
    encoder: str = "hidden"
    use_instruction: bool = True
    use_input: bool = True
    use_output: bool = False  # training rows only
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
        _ = self.embed_config  # raises on invalid embedding settings (encoder, fields, max_tokens)

    @property
    def embed_config(self) -> EmbedConfig:
        """How rows are embedded for this selector, at training and at routing time."""
        return EmbedConfig(self.encoder, self.max_tokens, self.use_instruction, self.use_input, self.use_output)


@dataclass
class Selector:
    """A trained selector. `mean`, `std` (dim,): standardisation; `mlp` (kind mlp) or `keys` (K, dim)
    with `key_task` (K,) int64 (kind nearest); `report`: held-out accuracy of its training;
    `task_data`: {task: `task_fingerprint`} of the rows it was trained on (empty in older files)."""

    cfg: SelectorConfig
    mean: torch.Tensor
    std: torch.Tensor
    mlp: Optional[nn.Sequential] = None
    keys: Optional[torch.Tensor] = None
    key_task: Optional[torch.Tensor] = None
    report: dict[str, Any] = field(default_factory=dict)
    task_data: dict[str, dict[str, Any]] = field(default_factory=dict)

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
    if cfg.kind == "nearest":
        sel.keys, sel.key_task = fit_keys(sel, feats, labels, range(n_tasks), torch.Generator().manual_seed(cfg.seed))
        return sel
    torch.manual_seed(cfg.seed)  # the MLP's initialisation
    mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, n_tasks))
    sel.mlp = train_mlp(mlp, feats, labels, cfg)
    return sel


def fit_keys(sel: Selector, feats: torch.Tensor, labels: torch.Tensor, tasks: Sequence[int],
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest-key selector's keys of the classes `tasks`: `cfg.n_clusters` k-means centroids of
    each one's rows in the metric's space (standardised features `feats` (n, dim), unit-normalised for
    `cos`). Returns keys (K, dim) and key_task (K,) int64 (the class of each key)."""
    space = F.normalize(feats, dim=-1) if sel.cfg.metric == "cos" else feats
    keys, key_task = [torch.zeros(0, sel.cfg.dim)], [torch.zeros(0, dtype=torch.long)]
    for t in tasks:
        c = kmeans(space[labels == t], sel.cfg.n_clusters, generator)
        keys.append(c)
        key_task.append(torch.full((c.shape[0],), t, dtype=torch.long))
    return torch.cat(keys), torch.cat(key_task)


def train_mlp(mlp: nn.Sequential, feats: torch.Tensor, labels: torch.Tensor, cfg: SelectorConfig) -> nn.Sequential:
    """`cfg.steps` full-batch AdamW steps of `mlp` (from its current parameters) on standardised
    features (n, dim) with labels (n,): cross-entropy weighted so that every class present counts
    alike, even when the rows are not balanced. Returns it in eval mode, frozen."""
    n_tasks = len(cfg.tasks)
    counts = torch.bincount(labels, minlength=n_tasks).float()
    class_weight = counts.sum() / (n_tasks * counts)  # balanced loss even if the rows are not
    mlp.requires_grad_(True).train()
    opt = torch.optim.AdamW(mlp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    with torch.enable_grad():
        for _ in range(cfg.steps):
            loss = F.cross_entropy(mlp(feats), labels, weight=class_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return mlp.eval().requires_grad_(False)


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

@dataclass
class TaskSplit:
    """One task's rows for the selector: its data file's rows (the first `n_train` when the registry
    sets it), and which of them (indices into `rows`) are held out and which are its balanced training
    rows, both in the selector's row order (`row_order`)."""

    task: str
    data: Path
    rows: list[dict]
    held: list[int]
    train: list[int]


def row_order(task: str, n_rows: int, seed: int) -> list[int]:
    """The order in which the selector takes a task's rows (0 .. n_rows-1): by a random key drawn for
    each row index from one stream per (seed, task). So a task's order never depends on the other
    tasks, and the first n rows of a file keep their relative order whatever follows them (`n_train`):
    an update (another task added, a balance) takes the rows it took before, which the embedding
    cache then holds."""
    rng = random.Random(f"{seed}/{task}")  # a string seed is hashed with SHA-512: the same in every run
    keys = [rng.random() for _ in range(n_rows)]
    return sorted(range(n_rows), key=keys.__getitem__)


def task_splits(reg: Registry, tasks: Sequence[str], rows_per_task: Optional[int], heldout_per_task: int,
                seed: int = 0) -> dict[str, TaskSplit]:
    """Turn the tasks' own training rows into the selector's dataset (DLP-LoRA's data maker).

    Per task of `tasks` (registered in `reg`): its rows in `row_order`; the first `heldout_per_task`
    are held out, and the same number of the rest is taken from every task (balanced): the smallest
    task's count, capped at `rows_per_task`.
    """
    if heldout_per_task < 0:
        raise ValueError(f"--heldout_per_task: expected >= 0, got {heldout_per_task}")
    if rows_per_task is not None:
        check_int("rows_per_task", rows_per_task, 1)
    loaded = {}
    for task in tasks:
        e = reg.entry(task)
        rows = load_rows(e.data)[: e.n_train]
        if len(rows) <= heldout_per_task:
            raise ValueError(f"task {e.task}: {len(rows)} rows in {e.data}, not more than --heldout_per_task "
                             f"{heldout_per_task}")
        loaded[task] = (e.data, rows, row_order(task, len(rows), seed))
    n = min(len(rows) - heldout_per_task for _, rows, _ in loaded.values())
    if rows_per_task is not None:
        n = min(n, rows_per_task)
    return {task: TaskSplit(task, data, rows, order[:heldout_per_task], order[heldout_per_task: heldout_per_task + n])
            for task, (data, rows, order) in loaded.items()}


def selector_rows(reg: Registry, rows_per_task: Optional[int], heldout_per_task: int,
                  seed: int = 0) -> tuple[list[dict], list[int], list[dict], list[int]]:
    """`task_splits` of every registered task as (train rows, train labels, held-out rows, held-out
    labels), labels = registry order."""
    splits = task_splits(reg, reg.tasks, rows_per_task, heldout_per_task, seed)
    train, train_y, held, held_y = [], [], [], []
    for t, split in enumerate(splits.values()):
        held += [split.rows[i] for i in split.held]
        held_y += [t] * len(split.held)
        train += [split.rows[i] for i in split.train]
        train_y += [t] * len(split.train)
    return train, train_y, held, held_y


@dataclass
class SelectorData:
    """Embedded rows: training (n, dim) with class labels (n,) int64, held-out (h, dim) with (h,)."""

    train_emb: torch.Tensor
    train_y: torch.Tensor
    held_emb: torch.Tensor
    held_y: torch.Tensor


def embed_splits(model: Any, tokenizer: Any, cfg: SelectorConfig, splits: dict[str, TaskSplit],
                 train_rows: dict[str, Sequence[int]], embed_batch_size: int = 16,
                 cache: Optional[EmbeddingCache] = None) -> SelectorData:
    """Embed, for every class of `cfg.tasks`, its training rows `train_rows[task]` (indices into its
    split's rows; as training rows, `cfg.use_output` included) and its held-out rows (as rows to route),
    in one pass (`cache.embed` when given: only rows it does not hold are run)."""
    tokens: list[list[int]] = []
    labels: list[int] = []
    counts = []
    for held in (False, True):
        for c, task in enumerate(cfg.tasks):
            split = splits[task]
            for i in (split.held if held else train_rows.get(task, ())):
                try:
                    tokens.append(row_tokens(tokenizer, split.rows[i], cfg.embed_config, training=not held))
                except ValueError as e:
                    raise ValueError(f"task {task}: {split.data} row {i}: {e}") from None
                labels.append(c)
        counts.append(len(tokens))
    if cache is not None:
        emb = cache.embed(model, tokens, cfg.encoder, embed_batch_size)
    else:
        emb = embed_tokens(model, tokens, embed_batch_size, cfg.encoder)
    y = torch.tensor(labels, dtype=torch.long)
    n = counts[0]  # training rows first, then the held-out ones
    return SelectorData(emb[:n], y[:n], emb[n:], y[n:])


def task_fingerprint(entry: TaskEntry) -> dict[str, Any]:
    """What decides a task's rows for the selector: its data file (path, SHA-256 of its content) and
    how many of its rows are used (`rows`: the first `n_train`, or all)."""
    return {"data": str(entry.data), "sha256": sha256_file(entry.data),
            "rows": len(load_rows(entry.data)[: entry.n_train])}


def finish_training(sel: Selector, reg: Registry, splits: dict[str, TaskSplit], data: SelectorData,
                    calibrate: bool = True) -> Selector:
    """Store in `sel` its training report (accuracy on its training rows, the rows per task; the
    held-out `routing_report`) and its tasks' `task_fingerprint`s; with `calibrate` and held-out rows,
    fit the softmax temperature on them (`calibrate_temperature`, in the report as "calibration")."""
    counts = torch.bincount(data.train_y, minlength=len(sel.cfg.tasks)).tolist()
    first = splits[sel.cfg.tasks[0]]
    sel.cfg.calibration = 1.0
    # No training rows: a nearest-key update that only drops keys.
    train = routing_report(sel, data.train_emb, data.train_y)["accuracy"] if data.train_y.numel() else None
    sel.report = {"train_rows_per_task": len(first.train), "heldout_rows_per_task": len(first.held),
                  "train_rows": dict(zip(sel.cfg.tasks, counts)), "train": train}
    if data.held_y.numel():
        sel.report["heldout"] = routing_report(sel, data.held_emb, data.held_y)
        if calibrate:
            sel.report["calibration"] = calibrate_temperature(sel, data.held_emb, data.held_y)
    sel.task_data = {t: task_fingerprint(reg.entry(t)) for t in sel.cfg.tasks}
    return sel


# ---- file ----------------------------------------------------------------------------------------------

def save_selector(sel: Selector, path: str | os.PathLike) -> Path:
    """Write the selector to `path` (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob: dict[str, Any] = {"format": FORMAT, "config": dataclasses.asdict(sel.cfg), "mean": sel.mean,
                            "std": sel.std, "report": sel.report, "task_data": sel.task_data}
    if sel.cfg.kind == "mlp":
        blob["mlp"] = {k: v.detach().clone() for k, v in sel.mlp.state_dict().items()}
    else:
        blob["keys"], blob["key_task"] = sel.keys, sel.key_task
    atomic_write_files({str(path): lambda tmp: torch.save(blob, tmp)})
    return path


def load_selector(path: str | os.PathLike) -> Selector:
    """Read a selector file written by `save_selector`; errors name the file. Files written before a
    config field existed load with its default (encoder "hidden" over instruction + input, calibration 1)."""
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
    sel = Selector(cfg, blob["mean"], blob["std"], report=blob.get("report", {}), task_data=blob.get("task_data", {}))
    if cfg.kind == "mlp":
        sel.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, len(cfg.tasks)))
        sel.mlp.load_state_dict(blob["mlp"])
        sel.mlp.eval().requires_grad_(False)
    else:
        sel.keys, sel.key_task = blob["keys"], blob["key_task"]
    return sel


def check_selector_base(sel: Selector, path: str | os.PathLike, base_dir: str | os.PathLike,
                        base_flag: str = "--ckpt_dir") -> None:
    """Before the base loads: a ValueError unless the selector file `path` fits the base of `base_dir`
    (read from its params.json / config.json alone): the width `dim` its embeddings had, and the block
    its encoder `hidden:LAYER` reads. `base_flag` names the base in the message."""
    args = read_model_args(base_dir)
    if sel.cfg.dim != args.dim:
        raise ValueError(f"--selector {path}: trained on a base with dim {sel.cfg.dim}, {base_flag} {base_dir} "
                         f"has dim {args.dim}")
    _, layer = parse_encoder(sel.cfg.encoder)
    if layer is not None and layer >= args.n_layers:
        raise ValueError(f"--selector {path}: its encoder {sel.cfg.encoder} reads block {layer}, {base_flag} "
                         f"{base_dir} has {args.n_layers} blocks (0-{args.n_layers - 1})")


def check_tasks(sel: Selector, tasks: Sequence[str], where: str) -> None:
    """`ValueError` unless the selector's classes are exactly `tasks`, in any order (routing matches
    the registry's adapters to the selector's classes by name)."""
    if sorted(sel.cfg.tasks) != sorted(tasks):
        extra = [t for t in tasks if t not in sel.cfg.tasks]
        gone = [t for t in sel.cfg.tasks if t not in tasks]
        raise ValueError(f"--selector (trained for tasks {sel.cfg.tasks}) does not fit {where}, which lists "
                         f"{list(tasks)} (new there: {extra}; not there: {gone}); update it with "
                         "scripts/train_selector.py --update SELECTOR --action add|delete, or retrain it")


def train_on_registry(model: Any, tokenizer: Any, reg: Registry, kind: str, rows_per_task: Optional[int] = None,
                      heldout_per_task: int = 32, embed_batch_size: int = 16, calibrate: bool = True,
                      cache: Optional[EmbeddingCache] = None, **options: Any) -> Selector:
    """Embed the registry's training rows with the bare base `model` (`task_splits`; through `cache`
    when given), fit a selector of `kind` (`options`: the other `SelectorConfig` fields; classes in
    registry order), and store its held-out routing report and calibration (`finish_training`)."""
    cfg = SelectorConfig(kind=kind, tasks=reg.tasks, dim=model.args.dim, **options)
    return fit_on_registry(model, tokenizer, reg, cfg, rows_per_task, heldout_per_task, embed_batch_size,
                           calibrate, cache)


def fit_on_registry(model: Any, tokenizer: Any, reg: Registry, cfg: SelectorConfig, rows_per_task: Optional[int],
                    heldout_per_task: int, embed_batch_size: int = 16, calibrate: bool = True,
                    cache: Optional[EmbeddingCache] = None) -> Selector:
    """`train_on_registry` for a given config: classes `cfg.tasks` (registered tasks, in any order)."""
    splits = task_splits(reg, cfg.tasks, rows_per_task, heldout_per_task, cfg.seed)
    data = embed_splits(model, tokenizer, cfg, splits, {t: s.train for t, s in splits.items()}, embed_batch_size,
                        cache)
    return finish_training(fit_selector(cfg, data.train_emb, data.train_y), reg, splits, data, calibrate)
