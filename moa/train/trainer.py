"""The training loop behind main_finetune.py: data, forward, label-only loss, backward, step, log,
checkpoint. One process per device under torchrun (NCCL on CUDA, Gloo on CPU), or a plain process
(`moa.train.distributed`).

Loss: cross-entropy averaged over the label tokens of the whole effective batch (all micro-batches
of an optimizer step on all ranks), so the gradient does not depend on how the batch is split over
micro-batches and processes. Logits exist only at label positions, a chunk of rows at a time
(`moa.train.loss`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import random
import re
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from llama.checkpoint import load_model, read_model_args
from llama.hardware import auto_dtype
from llama.kernels import use_compiled_kernels
from llama.model import Transformer
from llama.tokenizer import Tokenizer
from moa.checks import check_int, check_number
from moa.files.lock import OutputLock
from moa.method.config import MoAConfig, check_pissa_rank
from moa.method.inject import MoABlock, adapter_names, attach_adapters
from moa.train.checkpointing import (
    checked_resume_checkpoint,
    checkpoint_path,
    resume_training,
    save_training_checkpoint,
)
from moa.train.data import InstructionDataset, collate, load_rows, split_test_overlap, tokenize_rows

# The loss and the process-group names are also importable from here, where they used to live.
from moa.train.distributed import DistEnv, init_distributed, on_rank0, wrap_ddp  # noqa: F401
from moa.train.loss import LOGITS_CHUNK_ELEMENTS, CausalLMLoss, count_labels, label_cross_entropy  # noqa: F401
from moa.train.run_dir import SETTINGS_FILE, claim_output_dir, data_record, record_run, train_settings
from moa.train.schedule import WarmupCosine, make_adamw, scaled_lr

Say = Callable[..., None]


@dataclass
class TrainConfig:
    """Every training flag of main_finetune.py except the adapter ones (those are `MoAConfig`)."""

    llama_path: str
    data_path: str
    output_dir: str
    data_root: str
    keep_test_overlap: bool = False
    max_seq_len: int = 300
    max_batch_size: int = 32  # accepted for old command lines; training does not read it
    batch_size: int = 8
    accum_iter: int = 1
    epochs: int = 2
    warmup_epochs: float = 1.0
    start_epoch: int = 0
    blr: float = 6e-3
    lr: Optional[float] = None
    min_lr: float = 0.0
    weight_decay: float = 0.02
    w_bias: bool = False
    bf16: bool = False  # what --bf16 resolved to (`resolve_bf16`)
    bf16_requested: Optional[str] = None  # "auto" when --bf16 auto asked for it (recorded as bf16)
    grad_checkpointing: bool = False
    flash_attention2: bool = False
    compile_kernels: bool = False  # RMSNorm and SwiGLU fused by torch.compile (llama/kernels.py)
    device: str = "cpu"
    seed: int = 0
    num_workers: int = 2
    resume: str = ""
    log_every: int = 10
    overwrite: bool = False  # replace another run's files in output_dir (moa/train/run_dir.py)

    def __post_init__(self) -> None:
        for flag, low in (("max_seq_len", 2), ("max_batch_size", 1), ("batch_size", 1), ("accum_iter", 1),
                          ("epochs", 1), ("start_epoch", 0), ("num_workers", 0), ("log_every", 1)):
            check_int(flag, getattr(self, flag), low)
        for flag in ("warmup_epochs", "blr", "min_lr", "weight_decay") + (("lr",) if self.lr is not None else ()):
            check_number(flag, getattr(self, flag))
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"--warmup_epochs {self.warmup_epochs} exceeds --epochs {self.epochs}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: no CUDA device is available (use --device cpu)")


def forward_backward(module: nn.Module, batches: list[dict[str, torch.Tensor]], env: DistEnv,
                     bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate the gradients of one optimizer step over `batches` (this rank's micro-batches).

    Each micro-batch's summed loss is divided by the label count of the whole step (all ranks) and
    multiplied by the world size (DDP averages over ranks). Returns (this rank's summed loss, the
    global label count), both detached tensors on the device.
    """
    n_global = torch.tensor(float(sum(count_labels(b) for b in batches)), device=env.device)
    if env.world_size > 1:
        dist.all_reduce(n_global)
    scale = env.world_size / n_global
    total = torch.zeros((), device=env.device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last or not isinstance(module, DDP) else module.no_sync()
        mask = batch["token_mask"]
        mask = None if bool(mask.all()) else mask.to(env.device, non_blocking=True)
        with sync:
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss_sum, aux = module(batch["tokens"].to(env.device, non_blocking=True),
                                       batch["labels"].to(env.device, non_blocking=True), mask)
            (loss_sum * scale + aux / len(batches)).backward()
        total += loss_sum.detach()
    return total, n_global


def trainable_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameter elements per type: LoRA sites by slot (`lora.wq`, ...), `prompt`,
    `p_adapter`, `type_router`, `threshold`, and `norms/biases` (--w_bias), read from the sites each
    block holds (`MoABlock.moa_sites`)."""
    counts: dict[str, int] = {}
    seen: set[int] = set()

    def add(kind: str, params) -> None:
        for _, p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                counts[kind] = counts.get(kind, 0) + p.numel()

    blocks = [b for b in model.modules() if isinstance(b, MoABlock)]
    for slot in dict.fromkeys(s for b in blocks for s in b.moa_sites):
        add(slot, [kv for b in blocks if slot in b.moa_sites for kv in b.moa_sites[slot].adapter_params()])
    add("type_router", [kv for b in blocks for kv in b.type_router.named_parameters()
                        if not kv[0].startswith("threshold.")])
    add("threshold", [kv for b in blocks for kv in b.type_router.named_parameters() if kv[0].startswith("threshold.")])
    add("norms/biases", model.named_parameters())
    ordered = [k for k in counts if k.startswith("lora.")] + [k for k in counts if not k.startswith("lora.")]
    return {k: counts[k] for k in ordered}


def _attn_impl(cfg: TrainConfig, device: torch.device, say) -> str:
    if not cfg.flash_attention2:
        return "sdpa"
    reason = ("it needs a CUDA device" if device.type != "cuda" else
              "it needs --bf16 True" if not cfg.bf16 else
              "flash-attn is not installed" if importlib.util.find_spec("flash_attn") is None else None)
    if reason:
        say(f"--flash_attention2 True: {reason}; falling back to PyTorch SDPA attention")
        return "sdpa"
    say("--flash_attention2 True: flash-attn (its varlen kernel for padded batches)")
    return "flash_attn"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far, MiB: CUDA memory allocated by torch on a GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB of peak RSS


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's RNGs (the trainer passes --seed + rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_bf16(requested: Any, device: str, output_dir: str, resume: str = "",
                 overwrite: bool = False) -> tuple[bool, str]:
    """What `--bf16 requested` (True, False or "auto") means for this run, and a one-line report. auto:
    the choice an earlier run of this output folder (or of --resume's folder) recorded in its
    train_settings.json (`bf16_resolved` under `bf16: "auto"`), so that a resumed run trains in the dtype
    it started in; else `llama.hardware.auto_dtype` (the device's declared features, never a timing)."""
    if requested != "auto":
        return bool(requested), f"--bf16 {bool(requested)}"
    folders = ([] if overwrite else [output_dir]) + ([os.path.dirname(resume) or "."] if resume else [])
    for folder in folders:
        path = os.path.join(folder, SETTINGS_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                recorded = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(recorded, dict) and recorded.get("bf16") == "auto" and \
                isinstance(recorded.get("bf16_resolved"), bool):
            return recorded["bf16_resolved"], f"--bf16 auto: reusing bf16 {recorded['bf16_resolved']} recorded in {path}"
    dtype, reason = auto_dtype(device)
    return dtype == torch.bfloat16, f"--bf16 auto -> {dtype == torch.bfloat16} ({reason})"


def finetune(cfg: TrainConfig, moa_cfg: MoAConfig, args: dict[str, Any]) -> dict[str, Any]:
    """Train the adapters of `moa_cfg` on `cfg.data_path` and write `checkpoint-{epoch}.pth` and
    `log.txt` to `cfg.output_dir` (created only once every input has been checked).

    `args` (the command line as a dict) is stored in the checkpoints. Returns a summary
    {"epochs": [...], "last_loss": float, "steps": int} on every rank. User mistakes raise
    ValueError / FileNotFoundError naming the flag, file, row or field.
    """
    rows = load_rows(cfg.data_path)
    if cfg.resume and not os.path.isfile(cfg.resume):
        raise FileNotFoundError(f"--resume {cfg.resume}: checkpoint file not found")
    check_pissa_rank(moa_cfg, read_model_args(cfg.llama_path))  # the base's sizes, before its weights load
    env = init_distributed(cfg.device)
    lock = OutputLock(cfg.output_dir)  # rank 0's, for the whole run
    try:
        settings = train_settings(dataclasses.asdict(cfg), moa_cfg.to_dict(), env.world_size)
        on_rank0(lambda: claim_output_dir(lock, cfg.output_dir, settings, cfg.resume, cfg.overwrite),
                 env.rank, env.world_size)
        return _finetune(cfg, moa_cfg, args, rows, env, settings)
    finally:
        lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Run:
    """What the loop needs besides the model and the data: the optimizer, its schedule, the frozen
    base's trained tensors (--w_bias), where training starts, and where it logs."""

    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    peak_lr: float
    base_trained: list[str]
    start_epoch: int
    step: int
    log_path: str


def _finetune(cfg: TrainConfig, moa_cfg: MoAConfig, args: dict[str, Any], rows: list[dict],
              env: DistEnv, settings: dict[str, Any]) -> dict[str, Any]:
    say: Say = print if env.is_main else (lambda *a, **k: None)
    rows = _drop_test_overlap(rows, cfg, say)
    asked = {"bf16": cfg.bf16_requested} if cfg.bf16_requested is not None else {}  # compared as asked (auto)
    flags, data = {**dataclasses.asdict(cfg), **asked}, data_record(cfg.data_path, len(rows))
    args = {**args, **data}  # the checkpoints record the data (file, SHA-256, rows), compared on --resume
    # --resume: every difference (adapter flags, training flags, data) in one message, before the model loads
    ckpt = checked_resume_checkpoint(cfg.resume, moa_cfg, flags, data) if cfg.resume else None
    seed_everything(cfg.seed + env.rank)
    model, tokenizer, base_trained = _build_model(cfg, moa_cfg, env, say)
    sampler, loader = _make_loader(rows, tokenizer, cfg, env, say)
    run = _make_run(cfg, moa_cfg, model, base_trained, len(loader), env, say, flags, ckpt)
    _report(model, cfg, env, len(sampler.dataset), run.peak_lr, -(-len(loader) // cfg.accum_iter), say)

    if env.is_main:
        record_run(cfg.output_dir, settings, cfg.overwrite, run.step)  # log.txt: no step twice after a resume
    module = wrap_ddp(CausalLMLoss(model), env, moa_cfg.has_unused_params)
    summary: dict[str, Any] = {"epochs": [], "last_loss": float("nan"), "steps": run.step}
    for epoch in range(run.start_epoch, cfg.epochs):
        record = _train_epoch(module, sampler, loader, run, epoch, cfg, env)
        _log(run, env, record)
        say(json.dumps(record))
        summary["epochs"].append(record)
        summary["last_loss"], summary["steps"] = record["loss"], run.step
        save_training_checkpoint(checkpoint_path(cfg.output_dir, epoch), model, run.base_trained, run.optimizer,
                                 run.schedule, epoch, run.step, moa_cfg, args, env.rank, env.world_size)
    return summary


def _train_epoch(module: nn.Module, sampler: DistributedSampler, loader: DataLoader, run: _Run, epoch: int,
                 cfg: TrainConfig, env: DistEnv) -> dict[str, Any]:
    """One epoch of optimizer steps (a "step" record every --log_every steps); its "epoch" record."""
    sampler.set_epoch(epoch)
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}", disable=not env.is_main, dynamic_ncols=True)
    epoch_t0 = window_t0 = time.perf_counter()
    epoch_sums = torch.zeros(3, device=env.device)  # loss sum, labels, real tokens (this rank)
    window_sums = torch.zeros(3, device=env.device)
    for first, batches in _step_batches(loader, cfg.accum_iter):
        lr = run.schedule.step(run.optimizer, epoch + first / len(loader))
        sums = _train_step(module, batches, run, env, cfg.bf16)
        window_sums += sums
        epoch_sums += sums
        bar.update(len(batches))
        if run.step % cfg.log_every == 0:
            now = time.perf_counter()
            record = _record("step", epoch, run.step, _reduce(window_sums, env), lr, now - window_t0, env)
            _log(run, env, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
            window_sums.zero_()
            window_t0 = now
    bar.close()
    return _record("epoch", epoch, run.step, _reduce(epoch_sums, env), run.schedule.last_lr,
                   time.perf_counter() - epoch_t0, env)


def _step_batches(loader: DataLoader, accum_iter: int) -> Iterator[tuple[int, list[dict[str, torch.Tensor]]]]:
    """(index in the epoch of the step's first micro-batch, the step's micro-batches) for each
    optimizer step: `accum_iter` micro-batches, the last step of the epoch whatever is left."""
    batches: list[dict[str, torch.Tensor]] = []
    for i, batch in enumerate(loader):
        batches.append(batch)
        if len(batches) == accum_iter or i + 1 == len(loader):
            yield i + 1 - len(batches), batches
            batches = []


def _train_step(module: nn.Module, batches: list[dict[str, torch.Tensor]], run: _Run, env: DistEnv,
                bf16: bool) -> torch.Tensor:
    """Forward, backward and one optimizer step over `batches`; (loss sum, labels, real tokens) of
    this rank, a float32 tensor on the device."""
    loss_sum, _ = forward_backward(module, batches, env, bf16)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    n_labels = sum(count_labels(b) for b in batches)
    n_tokens = sum(int(b["token_mask"].sum()) for b in batches)
    counts = torch.tensor([n_labels, n_tokens], dtype=torch.float32, device=env.device)
    return torch.cat([loss_sum[None], counts])


def _record(kind: str, epoch: int, step: int, totals: list[float], lr: float, seconds: float,
            env: DistEnv) -> dict[str, Any]:
    """A log.txt record from the all-rank (loss sum, labels, real tokens) of a window of steps."""
    return {"kind": kind, "epoch": epoch, "step": step, "loss": totals[0] / totals[1], "lr": lr,
            "tokens_per_s": totals[2] / seconds, "peak_mem_mb": peak_memory_mb(env.device)}


def _log(run: _Run, env: DistEnv, record: dict[str, Any]) -> None:
    if env.is_main:
        with open(run.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _drop_test_overlap(rows: list[dict], cfg: TrainConfig, say: Say) -> list[dict]:
    """The training rows, without those that repeat a test question unless --keep_test_overlap."""
    kept, overlap, test_files = split_test_overlap(rows, cfg.data_root)
    if not test_files:
        say(f"warning: no test sets under --data_root {cfg.data_root}: test-set overlap not checked")
    elif overlap:
        action = "kept (--keep_test_overlap True)" if cfg.keep_test_overlap else "left out"
        say(f"{len(overlap)} of {len(rows)} training rows repeat a question of the {len(test_files)} test sets "
            f"under {cfg.data_root}: {action} (rows {overlap[:10]}{' ...' if len(overlap) > 10 else ''})")
    else:
        say(f"no training row repeats a question of the {len(test_files)} test sets under {cfg.data_root}")
    return rows if cfg.keep_test_overlap else kept


def _build_model(cfg: TrainConfig, moa_cfg: MoAConfig, env: DistEnv,
                 say: Say) -> tuple[Transformer, Tokenizer, list[str]]:
    """The base with the adapters attached, in training mode; its tokenizer; the names of the base
    tensors that are trained too (norms and biases under --w_bias)."""
    model, tokenizer = load_model(cfg.llama_path, dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
                                  device=env.device, max_seq_len=cfg.max_seq_len,
                                  attn_impl=_attn_impl(cfg, env.device, say))
    attach_adapters(model, moa_cfg)
    model.train()
    model.grad_checkpointing = cfg.grad_checkpointing
    if cfg.compile_kernels:
        say(use_compiled_kernels(True))
    if cfg.w_bias:  # also train the base's norms and biases, in fp32 (AdamW steps vanish in bf16)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.data = p.data.float()
                p.requires_grad_(True)
    adapters = set(adapter_names(model))
    base_trained = [n for n, p in model.named_parameters() if p.requires_grad and n not in adapters]
    return model, tokenizer, base_trained


def _make_loader(rows: list[dict], tokenizer: Tokenizer, cfg: TrainConfig, env: DistEnv,
                 say: Say) -> tuple[DistributedSampler, DataLoader]:
    """This rank's shuffled share of the tokenized rows, in micro-batches of --batch_size."""
    examples, skipped = tokenize_rows(rows, tokenizer, cfg.max_seq_len)
    if skipped:
        say(f"{len(skipped)} rows skipped: their prompt alone fills --max_seq_len {cfg.max_seq_len} "
            f"(rows {skipped[:10]}{' ...' if len(skipped) > 10 else ''})")
    if not examples:
        raise ValueError(f"{cfg.data_path}: no trainable row left (after test-overlap removal and "
                         f"--max_seq_len {cfg.max_seq_len})")
    dataset = InstructionDataset(examples)
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=False)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
                        num_workers=cfg.num_workers, pin_memory=env.device.type == "cuda", drop_last=False)
    return sampler, loader


def _make_run(cfg: TrainConfig, moa_cfg: MoAConfig, model: Transformer, base_trained: list[str],
              batches_per_epoch: int, env: DistEnv, say: Say, flags: dict[str, Any],
              ckpt: Optional[dict[str, Any]] = None) -> _Run:
    """AdamW and its schedule at --start_epoch, or where the --resume checkpoint left off."""
    peak_lr = scaled_lr(cfg.blr, cfg.batch_size, cfg.accum_iter, env.world_size, cfg.lr)
    optimizer = make_adamw(model, peak_lr, cfg.weight_decay)
    schedule = WarmupCosine(peak_lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
    steps_per_epoch = -(-batches_per_epoch // cfg.accum_iter)
    start_epoch, step = cfg.start_epoch, cfg.start_epoch * steps_per_epoch
    if cfg.resume:
        start_epoch, step = resume_training(cfg.resume, model, base_trained, optimizer, schedule, moa_cfg,
                                            env.rank, env.world_size, say, flags, ckpt=ckpt)
    if start_epoch >= cfg.epochs:
        raise ValueError(f"--epochs {cfg.epochs}: training would start at epoch {start_epoch}, nothing to do")
    return _Run(optimizer, schedule, peak_lr, base_trained, start_epoch, step,
                os.path.join(cfg.output_dir, "log.txt"))


def _report(model: Transformer, cfg: TrainConfig, env: DistEnv, n_examples: int, peak_lr: float,
            steps_per_epoch: int, say: Say) -> None:
    """The trainable parameters by type, and the shape of the run."""
    counts = trainable_counts(model)
    adapters = set(adapter_names(model))
    n_base = sum(p.numel() for n, p in model.named_parameters() if n not in adapters)
    say(f"trainable parameters by type ({model.args.n_layers} layers, base {n_base / 1e6:.1f}M frozen):")
    for kind, n in counts.items():
        say(f"  {kind:<14} {n:>14,}")
    say(f"  {'total':<14} {sum(counts.values()):>14,}")
    say(f"{n_examples} examples, {env.world_size} process(es) on {env.device}, effective batch "
        f"{cfg.batch_size * cfg.accum_iter * env.world_size}, peak lr {peak_lr:.3g}, {steps_per_epoch} steps/epoch")


def _reduce(sums: torch.Tensor, env: DistEnv) -> list[float]:
    sums = sums.clone()
    if env.world_size > 1:
        dist.all_reduce(sums)
    return sums.tolist()
