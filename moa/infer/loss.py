"""Held-out loss (evaluate_loss.py): the teacher-forced negative log-likelihood of each test row's
reference `output` given its Alpaca prompt, for a base model with or without trained adapters.

What is scored is what training scores (moa/train/data.py): prompt = BOS + `build_prompt(instruction,
input)`, response = `output` + EOS, labels on the response tokens only; a row's `nll` is the mean over
its response tokens (EOS included) of -log p(token | everything before it), `tokens` their number.
The set's `nll_per_token` is the total NLL over the total tokens of all rows (a long answer weighs
more than a short one, as in training).

The answer cue: the bundled math references were written after a few-shot prompt's answer label, so
each starts with a newline and `A: ` (AQuA: `Rationale: `); training rows answer directly. By default
(`strip_answer_cue`) that leading whitespace and one leading cue of `ANSWER_CUES` are not scored, so
the loss measures the answer itself rather than the label's format; `strip_answer_cue=False` scores
the `output` verbatim. The choice is part of the recorded settings and of the summary line.

Lengths: prompt + response are cut at `max_seq_len` (default: the model's context) by dropping the
response's last tokens; only the kept ones are scored (`cut_tokens` in the row's line says how many
were dropped). A row whose prompt alone leaves no room for one response token is an error naming it.
Compare a bare model and adapters at the same `max_seq_len`, which is why the default does not follow
the adapter's training length.

One forward per batch, no generation: rows sorted by length (longest first), right-padded with a
`token_mask` (pads reach neither attention nor routers nor the loss), the label positions' logits
computed row by row and a chunk of positions at a time by `moa.train.loss.label_cross_entropy`
(never a (B, T, vocab) block). Data-parallel under torchrun (the length order dealt round-robin to the
ranks), resumable through the partial files of moa/infer/predictions.py (same settings only); rank 0
writes the file in test order, then appends the summary line to `loss_score.jsonl` beside it. The pass
over the rows (lock, settings, resume, length order, partial files, merge) is generation's too:
moa/infer/rowjob.py.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from llama.checkpoint import load_model
from llama.model import Transformer
from moa.checks import check_int, require_rows
from moa.files.adapters import adapter_identity, load_trained_adapter
from moa.files.settings import data_identity, jsonable, model_identity
from moa.infer.dtype import DTYPE_NAMES, DTYPES, resolve_dtype, settle_dtype
from moa.infer.predictions import recorded_settings
from moa.infer.rowjob import RowJob, run_locked
from moa.train.data import IGNORE_INDEX, Example, InstructionDataset, collate, load_rows, tokenize_rows
from moa.train.loss import label_cross_entropy

SCORE_FILE = "loss_score.jsonl"
ANSWER_CUES = ("A:", "Rationale:")  # the answer labels the bundled math references start with
_CUE = re.compile(r"^\s*(?:" + "|".join(re.escape(c) for c in ANSWER_CUES) + r")?\s*")


@dataclass
class LossConfig:
    """What evaluate_loss.py's flags describe (same names; see evaluate_loss.py --help)."""

    ckpt_dir: str
    data_path: str
    save_path: str
    adapter_path: Optional[str] = None
    max_seq_len: Optional[int] = None  # None or 0: the model's context
    max_batch_size: int = 32
    dtype: str = "float32"  # auto | float32 | bfloat16 (moa/infer/dtype.py)
    device: Optional[str] = None  # None: cuda:LOCAL_RANK when CUDA is available, else cpu
    overwrite: bool = False
    progress: bool = True
    strip_answer_cue: bool = True  # score the reference without its leading whitespace and answer label

    def __post_init__(self) -> None:
        check_int("max_batch_size", self.max_batch_size, 1)
        if self.max_seq_len is not None and (not isinstance(self.max_seq_len, int) or isinstance(self.max_seq_len, bool)
                                             or self.max_seq_len < 0 or self.max_seq_len == 1):
            raise ValueError(f"--max_seq_len: expected an integer >= 2 (0 = the model's context), "
                             f"got {self.max_seq_len!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"--dtype: expected one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")


@dataclass
class LossSummary:
    """The outcome of `evaluate_loss`; `score_line()` is the line appended to loss_score.jsonl."""

    set: str
    nll_per_token: float
    rows: int
    tokens: int
    adapter: Optional[str]
    data_path: str
    save_path: str
    max_seq_len: int = 0
    dtype: str = "float32"
    dtype_report: str = ""
    cut_rows: int = 0  # rows whose response was cut at max_seq_len
    evaluated_rows: int = 0  # rows computed by this run (all ranks)
    resumed_rows: int = 0  # rows taken from the partial files of an interrupted run
    seconds: float = 0.0  # forward wall time of this run (slowest rank), loading excluded
    world_size: int = 1
    left_alone: bool = False  # the file existed complete and was not redone
    score_file: str = ""
    strip_answer_cue: bool = True

    def score_line(self) -> dict[str, Any]:
        return {"set": self.set, "nll_per_token": self.nll_per_token, "rows": self.rows, "tokens": self.tokens,
                "adapter": self.adapter, "data_path": self.data_path, "save_path": self.save_path,
                "reference": "answer" if self.strip_answer_cue else "verbatim"}


def set_name(data_path: str | os.PathLike) -> str:
    """The test set's name: its file's folder (data/math/gsm8k/test.json -> gsm8k)."""
    return Path(os.path.abspath(data_path)).parent.name


def strip_answer_cue(text: str) -> str:
    """`text` without its leading whitespace and one leading answer label of `ANSWER_CUES`
    ("\\nA: He needs 24 tiles..." -> "He needs 24 tiles...")."""
    return _CUE.sub("", text, count=1)


def check_outputs(rows: list[dict], path: str | os.PathLike) -> None:
    """ValueError naming the file, row index and field for a row whose reference `output` is empty
    (`load_rows` already refuses a missing or non-string one)."""
    for i, row in enumerate(rows):
        if not row["output"].strip():
            raise ValueError(f"{os.fspath(path)}: row {i}: field 'output' is empty (the held-out loss scores "
                             "the reference output)")


def loss_examples(tokenizer: Any, rows: list[dict], indices: list[int], max_seq_len: int,
                  data_path: str) -> list[tuple[int, Example, int]]:
    """(row index, `Example`, response tokens cut at max_seq_len) for rows[i], i in `indices`, tokenised
    as training does (`tokenize_rows`). ValueError naming the row when its prompt leaves no room."""
    picked = [rows[i] for i in indices]
    examples, skipped = tokenize_rows(picked, tokenizer, max_seq_len)
    if skipped:
        i = indices[skipped[0]]
        raise ValueError(f"{data_path}: row {i}: its prompt (instruction + input) fills --max_seq_len {max_seq_len} "
                         f"tokens, leaving none for the output ({len(skipped)} such rows); raise --max_seq_len")
    out = []
    for i, ex in zip(indices, examples):
        cut = 0
        if len(ex.tokens) == max_seq_len:  # possibly cut: count what was dropped
            full = len(tokenizer.encode(rows[i]["output"], bos=False, eos=True))
            cut = ex.n_prompt + full - max_seq_len
        out.append((i, ex, cut))
    return out


@torch.no_grad()
def row_nll_sums(model: Transformer, batch: dict[str, torch.Tensor], device: torch.device | str) -> tuple[list[float], list[int]]:
    """Per row of a collated batch (tokens, labels, token_mask): the summed NLL of its label tokens and
    their number, from one forward. Logits only at label positions, row by row, in chunks."""
    mask = batch["token_mask"]
    mask = None if bool(mask.all()) else mask.to(device)
    hidden = model.hidden_states(batch["tokens"].to(device), token_mask=mask)  # (B, T, dim)
    targets = batch["labels"][:, 1:].to(device)  # position t predicts token t + 1
    selected = targets != IGNORE_INDEX
    weight = model.output.weight.detach()  # frozen here whatever its flag
    sums, counts = [], []
    for b in range(hidden.shape[0]):
        sel = selected[b]
        sums.append(float(label_cross_entropy(hidden[b, :-1][sel], weight, targets[b][sel])))
        counts.append(int(sel.sum()))
    return sums, counts


def make_batches(items: list[tuple[int, Example, int]], max_batch_size: int) -> list[list[tuple[int, Example, int]]]:
    """Items sorted longest first (ties by row index), packed `max_batch_size` at a time."""
    ordered = sorted(items, key=lambda it: (-len(it[1].tokens), it[0]))
    return [ordered[s:s + max_batch_size] for s in range(0, len(ordered), max_batch_size)]


def score_batch(model: Transformer, rows: list[dict], items: list[tuple[int, Example, int]],
                device: torch.device | str) -> list[dict]:
    """One forward over a batch of items: one loss record per row, its index first."""
    batch = collate([InstructionDataset([ex])[0] for _, ex, _ in items])
    sums, counts = row_nll_sums(model, batch, device)
    records = []
    for (i, _, cut), s, n in zip(items, sums, counts):
        row = rows[i]
        records.append({"index": i, "nll": s / n, "tokens": n, "instruction": row["instruction"],
                        "input": row.get("input"), "nll_sum": s, "cut_tokens": cut})
    return records


def evaluate_loss(cfg: LossConfig) -> LossSummary:
    """Write the per-row loss file `cfg.save_path` for the test rows of `cfg.data_path` and append the
    summary line to loss_score.jsonl beside it. Under torchrun every rank calls this; every rank
    returns the same summary. User mistakes raise ValueError / FileNotFoundError naming flag, file or row."""
    return run_locked(cfg.save_path, cfg.device, lambda rank, world, device: _run(cfg, rank, world, device))


def _run(cfg: LossConfig, rank: int, world: int, device: torch.device) -> LossSummary:
    save = Path(cfg.save_path)
    rows = require_rows(load_rows(cfg.data_path), cfg.data_path)
    check_outputs(rows, cfg.data_path)
    if cfg.strip_answer_cue:
        rows = [dict(row, output=strip_answer_cue(row["output"])) for row in rows]
        check_outputs(rows, cfg.data_path)  # a reference that is nothing but a cue
    job = RowJob(save, rows, rank, world)
    reports: list[str] = []

    def settings() -> dict[str, Any]:  # rank 0; every rank gets its result: one choice
        requested = _settings(cfg)
        recorded = None if cfg.overwrite else recorded_settings(save, requested)
        name, report = settle_dtype("dtype", cfg.dtype, lambda: resolve_dtype("auto", device), recorded)
        reports.append(report)
        return {**requested, "dtype_resolved": name}

    if job.settle(settings, cfg.overwrite, "evaluate_loss.py"):
        return job.on_rank0(lambda: _summarise(cfg, save, rows, left_alone=True))
    dtype_name = job.settings["dtype_resolved"]
    report = reports[0] if reports else f"dtype {dtype_name}"

    model, tokenizer = load_model(cfg.ckpt_dir, dtype=DTYPES[dtype_name], device=device)
    if cfg.adapter_path:
        load_trained_adapter(model, cfg.adapter_path, cfg.ckpt_dir)
    model.requires_grad_(False)
    model.eval()
    context = model.args.max_seq_len
    if cfg.max_seq_len and cfg.max_seq_len > context:
        raise ValueError(f"--max_seq_len {cfg.max_seq_len} exceeds the model's context length {context} "
                         "(0 = the context)")
    max_seq_len = cfg.max_seq_len or context

    items = loss_examples(tokenizer, rows, job.pending(), max_seq_len, cfg.data_path)
    mine = job.deal(items, length=lambda it: len(it[1].tokens), index=lambda it: it[0])
    seconds = 0.0
    if mine:
        seconds = job.write_partial(make_batches(mine, cfg.max_batch_size),
                                    lambda batch: score_batch(model, rows, batch, device),
                                    show_progress=cfg.progress and rank == 0)
    gathered = job.gather({"rows": len(mine), "seconds": seconds})

    summary = job.finish(lambda counts: _summarise(cfg, save, rows, left_alone=False))
    summary.max_seq_len, summary.dtype, summary.dtype_report = max_seq_len, dtype_name, report
    summary.evaluated_rows = sum(g["rows"] for g in gathered)
    summary.resumed_rows = job.resumed
    summary.seconds = max(g["seconds"] for g in gathered)
    summary.world_size = world
    if rank == 0:
        _append_score(summary)
    return summary


def _summarise(cfg: LossConfig, save: Path, rows: list[dict], left_alone: bool) -> LossSummary:
    """The summary of a complete loss file; for a file left alone, also appends its line to
    loss_score.jsonl when no line there names it (a run killed between the two writes)."""
    records = [json.loads(line) for line in save.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, (rec, row) in enumerate(zip(records, rows)):
        if not isinstance(rec, dict) or "nll_sum" not in rec or rec.get("instruction") != row["instruction"]:
            raise ValueError(f"--save_path {save} line {i + 1}: not the loss record of test row {i} of "
                             f"{cfg.data_path}; rerun with --overwrite True")
    total_nll = sum(r["nll_sum"] for r in records)
    total_tokens = sum(r["tokens"] for r in records)
    summary = LossSummary(set=set_name(cfg.data_path), nll_per_token=total_nll / total_tokens, rows=len(records),
                          tokens=total_tokens, adapter=cfg.adapter_path, data_path=cfg.data_path,
                          save_path=str(save), cut_rows=sum(1 for r in records if r.get("cut_tokens")),
                          left_alone=left_alone, score_file=str(save.parent / SCORE_FILE),
                          strip_answer_cue=cfg.strip_answer_cue)
    if left_alone and not _score_has(summary):
        _append_score(summary)
    return summary


def _score_has(summary: LossSummary) -> bool:
    path = Path(summary.score_file)
    if not path.is_file():
        return False
    target = os.path.abspath(summary.save_path)
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("save_path") and os.path.abspath(entry["save_path"]) == target:
            return True
    return False


def _append_score(summary: LossSummary) -> None:
    with open(summary.score_file, "a", encoding="utf-8") as f:
        f.write(json.dumps(summary.score_line()) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _settings(cfg: LossConfig) -> dict[str, Any]:
    """What decides the per-row numbers, recorded in the partial files' header and the loss file's
    sidecar: --max_seq_len and --dtype as given (`auto` too; `_run` adds `dtype_resolved`, what it
    resolved to), and the identity of the model, adapter and data files."""
    settings = {"kind": "loss", **data_identity(cfg.data_path), **model_identity(cfg.ckpt_dir),
                **adapter_identity(cfg.adapter_path), "max_seq_len": cfg.max_seq_len or 0, "dtype": cfg.dtype,
                "strip_answer_cue": cfg.strip_answer_cue}
    return jsonable(settings)


def format_summary(s: LossSummary) -> str:
    """The lines evaluate_loss.py prints."""
    who = f"adapter {s.adapter}" if s.adapter else "bare model"
    head = f"{s.set}: nll/token {s.nll_per_token:.4f} over {s.rows} rows, {s.tokens} tokens ({who})"
    if s.left_alone:
        return (f"{head}\n{s.save_path} already holds all {s.rows} rows: left alone (--overwrite True to redo it); "
                f"its line is in {s.score_file}")
    resumed = f", {s.resumed_rows} resumed from an interrupted run" if s.resumed_rows else ""
    rate = s.evaluated_rows / s.seconds if s.seconds > 0 else 0.0
    return "\n".join([
        head,
        s.dtype_report,
        f"wrote {s.save_path} ({s.evaluated_rows} rows scored now{resumed}; {s.cut_rows} outputs cut at "
        f"max_seq_len {s.max_seq_len}); summary appended to {s.score_file}",
        f"forward: {s.seconds:.1f} s on {s.world_size} rank(s), {rate:.2f} rows/s",
    ])


def summary_dict(s: LossSummary) -> dict[str, Any]:
    """Every field of a summary (for scripts that log it)."""
    return asdict(s)
