"""Predictions for a test set (example.py): a base model with or without trained adapters, Alpaca
prompts, length-sorted batches, data-parallel ranks and a resumable prediction file.

Adapters: `adapter.pth` with the `adapter_params.json` beside it (every adapter flag, plus the
training `max_seq_len`), and `base_trained.pth` when training also changed base tensors (--w_bias).

Prompt of a row: BOS (when the tokenizer has one) + `moa.train.data.build_prompt(instruction, input)`,
the template training used. Lengths, in tokens:
- `max_seq_len` caps prompt + generation. Default: the adapter's training `max_seq_len` (from its
  adapter_params.json), as the paper's loop does, so that numbers are comparable; the bare model
  (or an adapter_params.json without it) gets the model's context length, as does `max_seq_len=0`.
- a prompt longer than `max_seq_len - min_gen_len` is shortened so that at least `min_gen_len`
  tokens remain for generation: first the row's `input` text is cut at its end (re-tokenised,
  the longest prefix that fits), as the paper's loop does; if the prompt still does not fit
  (the instruction alone is too long), the prompt's tokens are cut from the left, keeping BOS and
  the end of the prompt (the question and "### Response:", which the answer depends on most).
  Each line of the prediction file says which (`truncated`: null, "input" or "prompt_left").
- a row generates at most `min(max_gen_len, max_seq_len - prompt tokens)` new tokens; `finish` says
  why it ended: "stop" (a stop token of the tokenizer), "max_gen_len" or "max_seq_len" (the cap;
  these rows are counted and reported).

Batches: rows are sorted by prompt length, longest first (a batch that runs out of memory does so
at the start), and packed up to `max_batch_size` rows. The left-padded batched generation of
`llama.generation.generate` computes for each row exactly what the row alone computes, and each
row's own length limit is applied to its output, so greedy predictions do not depend on
`max_batch_size` or on the number of ranks (bit for bit on CPU in fp32, as tested; GPU kernels
may round differently at another batch size, which can flip a near-tie in bf16). Sampling (`temperature > 0`) draws from one
`torch.Generator` per rank seeded with `seed + rank`: reproducible for the same flags, batch size
and number of ranks, but a row's sample depends on which rows share its batch and its rank.

Resumable, atomic output (the partial files and their merge: moa/infer/predictions.py; the pass over
the rows, shared with the held-out loss: moa/infer/rowjob.py): each rank appends finished rows to its
own partial file, flushed after every batch; a rerun with the same settings skips them; rank 0 writes
the prediction file in test order, atomically, once every row is done.

Per-row adapters (example.py --adapter_registry / --data_config with --selector) come from the caller:
`run_inference(cfg, routing)` takes a `RoutingLoader` (example.py builds it from the task modules,
`moa.tasks.routing.generation_routing`); this module knows nothing of registries or selectors.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Protocol, Sequence

import torch

from llama.checkpoint import load_model
from llama.generation import generate
from llama.model import Transformer
from moa.checks import check_int, require_rows
from moa.files.adapters import LoadedAdapter, adapter_identity, load_trained_adapter
from moa.files.settings import data_identity, file_identity, jsonable, model_identity
from moa.infer.dtype import DTYPES, KV_CACHE_DTYPE_NAMES, resolve_dtype, resolve_kv_cache_dtype, settle_dtype
from moa.infer.predictions import prediction_record, recorded_settings
from moa.infer.rowjob import RowJob, run_locked
from moa.train.data import build_prompt, load_rows


@dataclass
class InferenceConfig:
    """What example.py's flags describe (same names; see example.py --help for each)."""

    ckpt_dir: str
    data_path: str
    save_path: str
    adapter_path: Optional[str] = None
    adapter_registry: Optional[str] = None  # task adapters picked/fused per row by --selector (moa/tasks/routing.py)
    data_config: Optional[str] = None  # with adapter_pool: instead of adapter_registry (Adapters Selector format)
    adapter_pool: Optional[str] = None
    selector: Optional[str] = None
    fusion: str = "top1"  # top1 | topp
    top_p_adapters: float = 0.9
    max_gen_len: int = 200
    min_gen_len: int = 120
    max_seq_len: Optional[int] = None  # None: adapter's training max_seq_len, else the model's context; 0: context
    max_batch_size: int = 32
    temperature: float = 0.1
    top_p: float = 0.75
    seed: int = 1
    overwrite: bool = False
    dtype: str = "auto"  # auto: bf16 where the hardware declares it (llama.hardware.auto_dtype), else fp32
    kv_cache_dtype: str = "auto"  # auto: llama.hardware.auto_kv_cache_dtype; float32 | bfloat16 as given
    device: Optional[str] = None  # None: cuda:LOCAL_RANK when CUDA is available, else cpu
    progress: bool = True  # tqdm bar on rank 0
    compile_decode: bool = False  # decode steps as one captured graph (llama.generation.captured_decode)

    def __post_init__(self) -> None:
        for flag, low in (("max_gen_len", 1), ("min_gen_len", 0), ("max_batch_size", 1)):
            check_int(flag, getattr(self, flag), low)
        if self.max_seq_len is not None and (not isinstance(self.max_seq_len, int) or self.max_seq_len < 0):
            raise ValueError(f"--max_seq_len: expected an integer >= 0 (0 = the model's context), "
                             f"got {self.max_seq_len!r}")
        if not self.temperature >= 0:
            raise ValueError(f"--temperature: expected >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p: expected a value in (0, 1], got {self.top_p!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype: expected auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPE_NAMES:
            raise ValueError(f"--kv_cache_dtype: expected one of {', '.join(KV_CACHE_DTYPE_NAMES)}, "
                             f"got {self.kv_cache_dtype!r}")
        # The routing flags (registry, selector, fusion) are checked where the routing is built
        # (moa.tasks.routing.check_routing_flags, from example.py and generation_routing).

    @property
    def routed(self) -> bool:
        """Whether the flags name per-row task routing (a registry and its selector): then `run_inference`
        takes the routing built from them."""
        return bool(self.adapter_registry or self.data_config or self.adapter_pool or self.selector)


@dataclass
class InferenceSummary:
    """The outcome of `run_inference` (counts over the whole test set unless said otherwise)."""

    save_path: str
    rows: int
    left_alone: bool = False  # the prediction file existed complete and was not redone
    generated_rows: int = 0  # rows generated by this run (all ranks)
    resumed_rows: int = 0  # rows taken from partial files of an interrupted run
    new_tokens: int = 0  # tokens generated by this run (all ranks)
    seconds: float = 0.0  # generation wall time of this run (slowest rank), model loading excluded
    world_size: int = 1
    max_seq_len: int = 0
    max_seq_len_source: str = ""
    base_trained: int = 0  # base tensors replaced from base_trained.pth (training with --w_bias)
    truncated_input: int = 0
    truncated_prompt_left: int = 0
    hit_max_seq_len: int = 0
    hit_max_gen_len: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.generated_rows / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Prompt:
    """One test row ready to generate: `tokens` (BOS included) and its own `budget` of new tokens."""

    index: int
    tokens: list[int]
    budget: int
    truncated: Optional[str]  # None, "input" or "prompt_left"


class RowRouting(Protocol):
    """Per-row adapters for generation, on the loaded model (example.py's: `moa.tasks.routing.RoutingPlan`)."""

    @property
    def max_seq_len(self) -> Optional[int]:
        """The adapters' smallest training max_seq_len (None: none recorded); routed rows run at it."""

    def partition(self, items: Sequence[Prompt]) -> list[list[Prompt]]:
        """`items` in parts served alike, in serving order (batches are made within a part)."""

    def serving(self) -> ContextManager[Any]:
        """Generate the batches inside; the model is put back at its end."""

    def rows(self, batch: Sequence[Prompt]) -> ContextManager[Any]:
        """Run one batch's generation inside with each row on its adapters."""

    def row_info(self, index: int) -> dict[str, Any]:
        """What to record with row `index`'s prediction (e.g. the chosen task)."""


RoutingPlanner = Callable[[Transformer, Any, list[dict]], RowRouting]  # (model, tokenizer, test rows) -> routing
RoutingLoader = Callable[[], RoutingPlanner]  # reads and checks the routing's files, before the model is loaded


def resolve_max_seq_len(requested: Optional[int], train_max_seq_len: Optional[int], context: int) -> tuple[int, str]:
    """The cap on prompt + generation (tokens) and where it comes from (for the report)."""
    if requested == 0:
        return context, "the model's context (--max_seq_len 0)"
    if requested is not None:
        if requested > context:
            raise ValueError(f"--max_seq_len {requested} exceeds the model's context length {context} "
                             "(0 = the context)")
        return requested, "--max_seq_len"
    if train_max_seq_len is not None:
        return min(train_max_seq_len, context), "the adapters' training max_seq_len"
    return context, "the model's context (no training max_seq_len known)"


# ---- prompts and batches -------------------------------------------------------------------------
def encode_prompt(tokenizer: Any, row: dict, max_prompt_tokens: int) -> tuple[list[int], Optional[str]]:
    """Tokens (BOS included) of a row's Alpaca prompt, shortened to at most `max_prompt_tokens`.

    Returns (tokens, truncated): truncated is None, "input" (the row's input text was cut at its
    end, the longest prefix that fits) or "prompt_left" (even the prompt without input is too long:
    its tokens were cut from the left, BOS kept).
    """
    if max_prompt_tokens < 2:
        raise ValueError(f"max_prompt_tokens must be >= 2, got {max_prompt_tokens}")
    instruction, text = row["instruction"], row.get("input") or ""

    def encode(inp: str) -> list[int]:
        return tokenizer.encode(build_prompt(instruction, inp), bos=True, eos=False)

    tokens = encode(text)
    if len(tokens) <= max_prompt_tokens:
        return tokens, None
    if text:
        input_ids = tokenizer.encode(text, bos=False, eos=False)
        shortest = encode("")
        if len(shortest) <= max_prompt_tokens:
            # Largest k whose prompt with the first k input tokens fits (k = 0 fits, all does not).
            lo, hi, best = 0, len(input_ids), shortest
            while hi - lo > 1:
                mid = (lo + hi) // 2
                candidate = encode(tokenizer.decode(input_ids[:mid]))
                if len(candidate) <= max_prompt_tokens:
                    lo, best = mid, candidate
                else:
                    hi = mid
            return best, "input"
        tokens = shortest
    bos = tokenizer.bos_id
    if bos is not None and tokens and tokens[0] == bos:
        return [bos] + tokens[len(tokens) - (max_prompt_tokens - 1):], "prompt_left"
    return tokens[len(tokens) - max_prompt_tokens:], "prompt_left"


def make_prompts(tokenizer: Any, rows: list[dict], indices: list[int], max_seq_len: int,
                 max_gen_len: int, min_gen_len: int) -> list[Prompt]:
    """`Prompt`s of rows[i] for i in `indices`, each leaving room for at least `min_gen_len` (>= 1) new tokens."""
    max_prompt_tokens = max_seq_len - max(min_gen_len, 1)
    if max_prompt_tokens < 2:
        raise ValueError(f"--min_gen_len {min_gen_len} leaves no room for a prompt within max_seq_len {max_seq_len}")
    prompts = []
    for i in indices:
        tokens, truncated = encode_prompt(tokenizer, rows[i], max_prompt_tokens)
        prompts.append(Prompt(i, tokens, min(max_gen_len, max_seq_len - len(tokens)), truncated))
    return prompts


def make_batches(prompts: list[Prompt], max_batch_size: int, max_slots: int) -> list[list[Prompt]]:
    """Pack prompts, longest first, into batches of at most `max_batch_size`.

    A batch is also closed before its longest prompt plus its largest budget would exceed
    `max_slots` (the model's `max_seq_len`): `generate` shortens every row of a batch to fit that,
    which would make a row's output depend on its batch.
    """
    batches: list[list[Prompt]] = []
    current: list[Prompt] = []
    budget = 0
    for p in sorted(prompts, key=lambda p: (-len(p.tokens), p.index)):
        if current and (len(current) == max_batch_size or len(current[0].tokens) + max(budget, p.budget) > max_slots):
            batches.append(current)
            current, budget = [], 0
        current.append(p)
        budget = max(budget, p.budget)
    if current:
        batches.append(current)
    return batches


# ---- the generation loop -------------------------------------------------------------------------
def generate_batch(model: Transformer, tokenizer: Any, rows: list[dict], batch: list[Prompt], cfg: InferenceConfig,
                   generator: torch.Generator, routing: Optional[RowRouting] = None,
                   kv_cache_dtype: Optional[torch.dtype] = None) -> tuple[list[dict], int]:
    """Generate one batch: its prediction records (each with the row `index` first) and the new tokens
    kept. With `routing` the batch runs with its rows' adapters, and each record gets the row's choice.
    `kv_cache_dtype`: the KV cache's (None: `setup_caches`' default)."""
    with routing.rows(batch) if routing is not None else contextlib.nullcontext():
        outs = generate(model, [p.tokens for p in batch], max(p.budget for p in batch),
                        temperature=cfg.temperature, top_p=cfg.top_p, tokenizer=tokenizer,
                        generator=generator, compile_decode=cfg.compile_decode,
                        kv_cache_dtype=kv_cache_dtype)
    records, new_tokens = [], 0
    for p, out in zip(batch, outs):
        # The batch may run past a row's own budget; a row that reached its budget without a
        # stop token ended at its limit, whichever of the two it was.
        if len(out) >= p.budget:
            finish = "max_gen_len" if p.budget == cfg.max_gen_len else "max_seq_len"
        else:
            finish = "stop"
        out = out[: p.budget]
        new_tokens += len(out)
        record = prediction_record(rows[p.index], tokenizer.decode(out), len(p.tokens), len(out), finish,
                                   p.truncated)
        if routing is not None:
            record.update(routing.row_info(p.index))
        records.append({"index": p.index, **record})
    return records, new_tokens


def generate_into_partial(model: Transformer, tokenizer: Any, rows: list[dict], batches: list[list[Prompt]],
                          cfg: InferenceConfig, job: RowJob, generator: torch.Generator, show_progress: bool,
                          routing: Optional[RowRouting] = None,
                          kv_cache_dtype: Optional[torch.dtype] = None) -> tuple[int, float]:
    """Generate `batches` and append their prediction records (with the row index) to this rank's partial
    file of `job` (`RowJob.write_partial`: flushed and synced after every batch).

    Returns (new tokens kept, seconds of generation).
    """
    new_tokens = 0

    def run_batch(batch: list[Prompt]) -> list[dict]:
        nonlocal new_tokens
        records, n = generate_batch(model, tokenizer, rows, batch, cfg, generator, routing, kv_cache_dtype)
        new_tokens += n
        return records

    seconds = job.write_partial(batches, run_batch, show_progress=show_progress,
                                postfix=lambda s: {"tok_s": f"{new_tokens / max(s, 1e-9):.1f}"})
    return new_tokens, seconds


# ---- the run -------------------------------------------------------------------------------------
def run_inference(cfg: InferenceConfig, routing: Optional[RoutingLoader] = None) -> InferenceSummary:
    """Generate the prediction file `cfg.save_path` for the test rows of `cfg.data_path`.

    `routing`: when the flags name per-row task routing (`cfg.routed`), the routing built from them
    (example.py: `moa.tasks.routing.generation_routing(cfg)`); it reads its files after the settings
    check and before the model is loaded, and plans the rows on the loaded model.

    Under torchrun every rank calls this: the rows are split across ranks and rank 0 writes the
    file. Returns the same summary on every rank. User mistakes raise ValueError /
    FileNotFoundError naming the flag or file.
    """
    if cfg.routed and routing is None:
        raise ValueError("--adapter_registry / --data_config / --selector name per-row task routing: pass the "
                         "routing built from them (moa.tasks.routing.generation_routing(cfg), as example.py does)")
    if routing is not None and not cfg.routed:
        raise ValueError("a routing was given, but no task registry is named (--adapter_registry, or "
                         "--data_config with --adapter_pool, and --selector)")
    return run_locked(cfg.save_path, cfg.device,
                      lambda rank, world, device: _run(cfg, routing, rank, world, str(device)))


def _run(cfg: InferenceConfig, routing: Optional[RoutingLoader], rank: int, world: int,
         device: str) -> InferenceSummary:
    save = Path(cfg.save_path)
    rows = require_rows(load_rows(cfg.data_path), cfg.data_path)
    job = RowJob(save, rows, rank, world)
    if job.settle(lambda: _resolved_settings(cfg, device), cfg.overwrite, "example.py"):
        return InferenceSummary(str(save), len(rows), left_alone=True, world_size=world)
    dtype_name = job.settings["dtype_resolved"]
    kv_cache_dtype = DTYPES[job.settings["kv_cache_dtype_resolved"]]

    # The routing's files (the registry) are read (and checked) before the model is loaded.
    planner = routing() if routing is not None else None
    model, tokenizer = load_model(cfg.ckpt_dir, dtype=DTYPES[dtype_name], device=device)
    context = model.args.max_seq_len
    loaded = load_trained_adapter(model, cfg.adapter_path, cfg.ckpt_dir) if cfg.adapter_path else LoadedAdapter(None, [])
    router = planner(model, tokenizer, rows) if planner is not None else None
    # Routed rows run at the registry adapters' (smallest) training max_seq_len, as one adapter does at its own.
    train_len = loaded.max_seq_len if router is None else router.max_seq_len
    max_seq_len, source = resolve_max_seq_len(cfg.max_seq_len, train_len, context)
    model.eval()

    pending = job.pending()
    prompts = make_prompts(tokenizer, rows, pending, max_seq_len, cfg.max_gen_len, cfg.min_gen_len)
    mine = job.deal(prompts, length=lambda p: len(p.tokens), index=lambda p: p.index)
    # Routed rows: the bank's rows mix LoRAs freely; each non-LoRA task adapter's rows get batches of their own.
    parts = [mine] if router is None else router.partition(mine)
    batches = [b for part in parts for b in make_batches(part, cfg.max_batch_size, context)]

    generator = torch.Generator(device=device).manual_seed(cfg.seed + rank)
    new_tokens, seconds = 0, 0.0
    if mine:
        with router.serving() if router is not None else contextlib.nullcontext():  # attach each adapter once
            new_tokens, seconds = generate_into_partial(model, tokenizer, rows, batches, cfg, job, generator,
                                                        show_progress=cfg.progress and rank == 0, routing=router,
                                                        kv_cache_dtype=kv_cache_dtype)
    gathered = job.gather({"rows": len(mine), "tokens": new_tokens, "seconds": seconds})

    counts = job.finish()
    return InferenceSummary(
        save_path=str(save), rows=len(rows), generated_rows=sum(s["rows"] for s in gathered),
        resumed_rows=job.resumed, new_tokens=sum(s["tokens"] for s in gathered),
        seconds=max(s["seconds"] for s in gathered), world_size=world, max_seq_len=max_seq_len,
        max_seq_len_source=source, base_trained=len(loaded.base_trained), **counts)


def _resolved_settings(cfg: InferenceConfig, device: str) -> dict[str, Any]:
    """`_settings` plus what `--dtype` and `--kv_cache_dtype` resolved to (`dtype_resolved`,
    `kv_cache_dtype_resolved`): for auto, the values an earlier run with the same requested settings
    recorded (its partial file or complete output), else the rule's choice (moa.infer.dtype); printed once."""
    settings = _settings(cfg)
    recorded = None if cfg.overwrite else recorded_settings(cfg.save_path, settings)
    dtype_name, report = settle_dtype("dtype", cfg.dtype, lambda: resolve_dtype("auto", device), recorded)
    kv_name, kv_report = settle_dtype("kv_cache_dtype", cfg.kv_cache_dtype,
                                      lambda: resolve_kv_cache_dtype("auto", DTYPES[dtype_name], device), recorded)
    print(f"{report}; {kv_report}")
    return {**settings, "dtype_resolved": dtype_name, "kv_cache_dtype_resolved": kv_name}


def _settings(cfg: InferenceConfig) -> dict[str, Any]:
    """What decides the predictions, recorded in the partial files' header and in the prediction
    file's sidecar: the flags as given (--max_seq_len too: its default follows from the adapter, whose
    content is recorded; --dtype and --kv_cache_dtype as requested, `auto` included: what they resolved
    to is added by `_resolved_settings`), and the identity of the model, adapter, data (and routing) files."""
    settings: dict[str, Any] = {
        **data_identity(cfg.data_path), **model_identity(cfg.ckpt_dir), **adapter_identity(cfg.adapter_path),
        "max_gen_len": cfg.max_gen_len, "min_gen_len": cfg.min_gen_len, "max_seq_len": cfg.max_seq_len,
        "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed, "dtype": cfg.dtype,
        "kv_cache_dtype": cfg.kv_cache_dtype,
    }
    if cfg.compile_decode:  # the same tokens in fp32; compiled bf16 kernels may round differently
        settings["compile_decode"] = True
    if cfg.adapter_registry:
        settings.update(adapter_registry=os.path.abspath(cfg.adapter_registry),
                        registry_file=file_identity(cfg.adapter_registry))
    if cfg.data_config:  # a data config and an adapter pool: both recorded, as the registry file is
        settings.update(data_config=os.path.abspath(cfg.data_config),
                        data_config_file=file_identity(cfg.data_config),
                        adapter_pool=os.path.abspath(cfg.adapter_pool),
                        adapter_pool_file=file_identity(cfg.adapter_pool))
    if cfg.routed:
        settings.update(selector=os.path.abspath(cfg.selector) if cfg.selector else None,
                        selector_file=file_identity(cfg.selector) if cfg.selector else None,
                        fusion=cfg.fusion, top_p_adapters=cfg.top_p_adapters if cfg.fusion == "topp" else None)
    return jsonable(settings)


def format_summary(s: InferenceSummary, min_gen_len: int) -> str:
    """A few lines for the end of example.py's output."""
    if s.left_alone:
        return (f"{s.save_path} already holds predictions for all {s.rows} rows: left alone "
                "(--overwrite True to redo it)")
    resumed = f", {s.resumed_rows} resumed from an interrupted run" if s.resumed_rows else ""
    base = f"; base_trained.pth replaced {s.base_trained} base tensors (--w_bias)" if s.base_trained else ""
    return "\n".join([
        f"wrote {s.save_path}: {s.rows} rows ({s.generated_rows} generated now{resumed}){base}",
        f"max_seq_len {s.max_seq_len} ({s.max_seq_len_source}): {s.hit_max_seq_len} rows hit it, "
        f"{s.hit_max_gen_len} reached max_gen_len without a stop token",
        f"prompts shortened to leave min_gen_len {min_gen_len} tokens: {s.truncated_input} by cutting the "
        f"input, {s.truncated_prompt_left} by cutting the prompt's tokens from the left",
        f"generation: {s.new_tokens} new tokens in {s.seconds:.1f} s on {s.world_size} rank(s): "
        f"{s.tokens_per_s:.1f} tokens/s, {s.rows_per_s:.2f} rows/s",
    ])
