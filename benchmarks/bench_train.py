"""Training step time and memory, two modes.

`--mode compare` (default; CPU, a few minutes): SmolLM2-135M shape, random weights, 4 x 256, fp32:
our LoRA r8 vs transformers + PEFT LoRA r8 on the same weights in the same run (goal: ours <= 0.8x),
plus our Soft MoA (the paper's Soft MoA command's 7 types) and Sparse MoA, printed as one table.

    pip install peft                                  # benchmark only, not a project dependency
    python benchmarks/bench_train.py                  # SmolLM2-135M shape, 4 x 256, fp32, CPU

`--mode llama8b` (a GPU with >= 24 GB): LLaMA-3.1-8B shape with random bf16 weights built on the
device, the paper's Soft MoA command's adapters in fp32, bf16 autocast, batch 8 x 300, with and without
activation checkpointing: peak memory (goal <= 20 GB), tokens/s and MFU (goal >= 45%).

    python benchmarks/bench_train.py --mode llama8b                      # cuda, 32 layers, 8 x 300
    python benchmarks/bench_train.py --mode llama8b --peak_tflops 989    # a GPU not in PEAK_BF16_TFLOPS
    python benchmarks/bench_train.py --mode llama8b --device cpu --n_layers 1 --batch 1 --seq_len 32 \\
        --rounds 1                                                        # smoke test of the script

A step = forward + label-only loss + backward + AdamW step (the trainer's `CausalLMLoss`,
`forward_backward` and `make_adamw`), on one batch whose first `--prompt_len` tokens of every row
are prompt (label -100) and the rest response. transformers computes logits everywhere (its
standard causal-LM loss). Configurations are timed in turns, one step each per round, so a change
in machine load hits all of them alike; tables give the median over rounds.

MFU = model FLOPs of a step / (step time x the device's peak dense bf16 FLOP/s). Model FLOPs with a
frozen base (`train_step_flops`): 4 per frozen matmul weight per token (forward + input gradient;
frozen weights get no weight gradient), causal attention 6 T^2 d per sequence and layer (forward +
backward), the vocabulary projection only at label positions (4 V d per label), and 6 per adapter
parameter per token. Recomputation by activation checkpointing is not model FLOPs; HFU counts it.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Optional

import torch

from llama.kernels import use_compiled_kernels
from llama.model import ModelArgs, Transformer
from moa import MoAConfig, RouterStats, attach_adapters
from moa.method.presets import LLAMA31_8B, preset_config
from moa.train.data import IGNORE_INDEX
from moa.train.schedule import ADAMW_BETAS, make_adamw
from moa.train.trainer import CausalLMLoss, DistEnv, forward_backward, peak_memory_mb

SMOLLM2 = dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, multiple_of=256,
               norm_eps=1e-5, rope_theta=100000.0)
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
WEIGHT_DECAY = 0.02  # the paper's Soft MoA command's
# Peak dense bf16 tensor-core FLOP/s (vendor data sheets), by a substring of the CUDA device name.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1}


def adapter_configs(n_layers: int) -> dict[str, MoAConfig]:
    """Our three configurations over all `n_layers` blocks (moa/method/presets.py): LoRA r8, the paper's
    Soft MoA command (7 types, swi_x 4), Sparse MoA (no prompt, learned threshold)."""
    return {name: preset_config(preset, n_layers) for name, preset in (
        ("ours LoRA r8", "lora"), ("ours Soft MoA (paper's command)", "soft_moa"), ("ours Sparse MoA", "sparse_moa"))}


def make_batch(vocab_size: int, batch: int, seq_len: int, prompt_len: int) -> dict[str, torch.Tensor]:
    """Random ids (B, T), labels -100 on the first `prompt_len` positions, no padding."""
    tokens = torch.randint(0, vocab_size, (batch, seq_len))
    labels = tokens.clone()
    labels[:, :prompt_len] = IGNORE_INDEX
    return {"tokens": tokens, "labels": labels, "token_mask": torch.ones_like(tokens, dtype=torch.bool)}


def our_step(model: Transformer, batch: dict[str, torch.Tensor], device: torch.device,
             bf16: bool) -> Callable[[], None]:
    """One training step of the trainer's code path (loss, backward, AdamW) as a closure."""
    optimizer = make_adamw(model, 1e-4, WEIGHT_DECAY)
    loss_module, env = CausalLMLoss(model), DistEnv(device=device)

    def step() -> None:
        forward_backward(loss_module, [batch], env, bf16)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_step_times(steps: dict[str, Callable[[], None]], rounds: int, device: torch.device,
                      warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each step, timed in turns (one call each per round)."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def train_step_flops(args: ModelArgs, n_adapter: int, batch: int, seq_len: int, n_labels: int,
                     recompute: bool = False) -> float:
    """FLOPs of one training step of a frozen base with adapters (see the module docstring).

    `recompute=True` adds the block forward that activation checkpointing repeats in backward (HFU).
    """
    d, L, tokens = args.dim, args.n_layers, batch * seq_len
    kv = args.n_kv_heads * args.head_dim
    block_weights = 2 * d * d + 2 * d * kv + 3 * d * args.ffn_hidden_dim  # wq, wo, wk, wv, w1, w2, w3
    forward_blocks = 2 * block_weights * L * tokens + 2 * batch * seq_len ** 2 * d * L  # matmuls + causal attn
    flops = 2 * forward_blocks + 2 * batch * seq_len ** 2 * d * L  # + input gradients; attention bwd = 2x fwd
    flops += 4 * args.vocab_size * d * n_labels + 6 * n_adapter * tokens
    return flops + (forward_blocks if recompute else 0)


def peak_tflops(device: torch.device, given: Optional[float]) -> Optional[float]:
    """Peak dense bf16 TFLOP/s of `device`: `given`, else looked up by the CUDA device name, else None."""
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for key, v in PEAK_BF16_TFLOPS.items() if key in name), None)


# ---- --mode compare --------------------------------------------------------------------------------
def run_compare(args: argparse.Namespace) -> None:
    if args.compile_kernels:
        print(use_compiled_kernels(True))
    try:
        import peft
    except ImportError:
        sys.exit("error: --mode compare measures against PEFT: pip install peft")
    from references import hf_twin

    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    bf16 = dtype == torch.bfloat16
    torch.manual_seed(0)
    base = Transformer(ModelArgs(**SMOLLM2, max_seq_len=args.seq_len))
    batch = make_batch(SMOLLM2["vocab_size"], args.batch, args.seq_len, args.prompt_len)

    steps, models = {}, {}
    for name, cfg in adapter_configs(SMOLLM2["n_layers"]).items():
        model = Transformer(ModelArgs(**SMOLLM2, max_seq_len=args.seq_len))
        model.load_state_dict(base.state_dict())
        models[name] = model = attach_adapters(model.to(device, dtype), cfg).train()
        steps[name] = our_step(model, batch, device, bf16)

    hf = peft.get_peft_model(hf_twin(base).to(device, dtype).train(),
                             peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=PEFT_TARGETS))
    hf_opt = torch.optim.AdamW([q for q in hf.parameters() if q.requires_grad], lr=1e-4, betas=ADAMW_BETAS,
                               weight_decay=WEIGHT_DECAY)
    hf_tokens, hf_labels = batch["tokens"].to(device), batch["labels"].to(device)

    def hf_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = hf(input_ids=hf_tokens, labels=hf_labels).loss
        loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
    steps["transformers + PEFT LoRA r8"] = hf_step

    median = median_step_times(steps, args.rounds, device)
    with RouterStats(models["ours Sparse MoA"]) as stats, torch.no_grad():
        models["ours Sparse MoA"](batch["tokens"].to(device))
    active = [v["active"] for layer in stats.summary().values() for v in layer.values()]
    ref = median["transformers + PEFT LoRA r8"]
    trainable = {name: sum(q.numel() for q in m.parameters() if q.requires_grad) for name, m in models.items()}
    trainable["transformers + PEFT LoRA r8"] = sum(q.numel() for q in hf.parameters() if q.requires_grad)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nSmolLM2-135M shape, random weights, {args.dtype} base, batch {args.batch} x {args.seq_len} "
          f"({args.seq_len - args.prompt_len} label tokens per row), {where}, median of {args.rounds} rounds")
    print("| configuration | trainable params | step time (s) | tokens/s | time vs PEFT LoRA r8 |")
    print("|---|---|---|---|---|")
    for name, t in median.items():
        print(f"| {name} | {trainable[name]:,} | {t:.3f} | {args.batch * args.seq_len / t:,.0f} | {t / ref:.2f}x |")
    print(f"\nSparse MoA: {100 * sum(active) / len(active):.0f}% of (token, type) pairs ran their expert "
          "(fresh router, default --max_threshold 0.5)")
    if device.type == "cpu":
        print_matmul_floor(models["ours LoRA r8"], trainable["ours LoRA r8"], batch, median["ours LoRA r8"], dtype)


def print_matmul_floor(model: Transformer, n_adapter: int, batch: dict[str, torch.Tensor], seconds: float,
                       dtype: torch.dtype) -> None:
    """The step's matmul floor on this CPU: model FLOPs / the measured matmul rate in `dtype`
    (benchmarks/matmul_rate.py: a printed number, never a choice)."""
    from matmul_rate import matmul_gflops

    bsz, seq_len = batch["tokens"].shape
    n_labels = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    flops = train_step_flops(model.args, n_adapter, bsz, seq_len, n_labels)
    rate = matmul_gflops(dtype, seconds=1.0)
    floor = flops / (rate * 1e9)
    print(f"LoRA r8 step: {flops / 1e12:.3f} TFLOP of model FLOPs; measured matmul rate {rate:,.0f} GFLOP/s "
          f"({str(dtype).removeprefix('torch.')}) -> floor {floor:.3f} s; step {seconds:.3f} s = "
          f"{seconds / floor:.2f}x the floor (goal <= 2.5x)")


# ---- --mode llama8b --------------------------------------------------------------------------------
def build_random_bf16(params: dict, seq_len: int, device: torch.device, attn_impl: str) -> Transformer:
    """A Transformer of `params` with random bf16 weights created directly on `device` (never an fp32
    copy: the 8B shape must fit a 24 GB GPU)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return Transformer(ModelArgs(**params, max_seq_len=seq_len, attn_impl=attn_impl))
    finally:
        torch.set_default_dtype(before)


def run_llama8b(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --mode llama8b needs a CUDA device (or --device cpu with small --n_layers for a smoke test)")
    torch.manual_seed(0)
    params = {**LLAMA31_8B, "n_layers": args.n_layers}
    model = build_random_bf16(params, args.seq_len, device, args.attn_impl)
    attach_adapters(model, adapter_configs(args.n_layers)["ours Soft MoA (paper's command)"]).train()
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch = make_batch(params["vocab_size"], args.batch, args.seq_len, args.prompt_len)
    n_labels = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    step = our_step(model, batch, device, bf16=True)
    peak = peak_tflops(device, args.peak_tflops)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"

    print(f"\nLLaMA-3.1-8B shape ({args.n_layers} layers), random bf16 base, Soft MoA (the paper's command) "
          f"fp32 adapters "
          f"({n_adapter:,} trainable), bf16 autocast, batch {args.batch} x {args.seq_len} ({n_labels} labels), "
          f"attention {args.attn_impl}, {where}, peak {peak or 'unknown'} TFLOP/s bf16, median of {args.rounds}")
    print("| activation checkpointing | step time (s) | tokens/s | peak memory (GiB) | MFU | HFU |")
    print("|---|---|---|---|---|---|")
    settings = {"on": [True], "off": [False], "both": [False, True]}[args.grad_checkpointing]
    for checkpointing in settings:
        model.grad_checkpointing = checkpointing
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            seconds = median_step_times({"step": step}, args.rounds, device, warmup=2)["step"]
        except torch.cuda.OutOfMemoryError:
            print(f"| {'on' if checkpointing else 'off'} | out of memory | | | | |")
            model.zero_grad(set_to_none=True)
            continue
        mem_gib = peak_memory_mb(device) / 1024
        mfu = hfu = "n/a"
        if peak:
            flops = train_step_flops(model.args, n_adapter, args.batch, args.seq_len, n_labels)
            mfu = f"{100 * flops / seconds / (peak * 1e12):.1f}%"
            hw = train_step_flops(model.args, n_adapter, args.batch, args.seq_len, n_labels, recompute=checkpointing)
            hfu = f"{100 * hw / seconds / (peak * 1e12):.1f}%"
        print(f"| {'on' if checkpointing else 'off'} | {seconds:.3f} | {args.batch * args.seq_len / seconds:,.0f} | "
              f"{mem_gib:.2f} | {mfu} | {hfu} |")
    if device.type == "cpu":
        print("(CPU: peak memory is the process's peak RSS)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["compare", "llama8b"], default="compare")
    p.add_argument("--device", default=None, help="default: cpu for compare, cuda for llama8b")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compare: base weights (adapters stay fp32; bfloat16 also turns on autocast)")
    p.add_argument("--batch", type=int, default=None, help="default: 4 (compare), 8 (llama8b)")
    p.add_argument("--seq_len", type=int, default=None, help="default: 256 (compare), 300 (llama8b)")
    p.add_argument("--prompt_len", type=int, default=None, help="masked tokens at the start of each row "
                   "(default: half of --seq_len)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile_kernels", action="store_true",
                   help="our models with RMSNorm and SwiGLU fused by torch.compile (llama/kernels.py)")
    p.add_argument("--n_layers", type=int, default=LLAMA31_8B["n_layers"], help="llama8b: blocks (smoke tests)")
    p.add_argument("--grad_checkpointing", choices=["both", "on", "off"], default="both", help="llama8b")
    p.add_argument("--attn_impl", choices=["sdpa", "flash_attn"], default="sdpa", help="llama8b")
    p.add_argument("--peak_tflops", type=float, default=None, help="llama8b: the device's peak dense bf16 "
                   "TFLOP/s for MFU (default: looked up by device name)")
    args = p.parse_args()
    compare = args.mode == "compare"
    args.device = args.device or ("cpu" if compare else "cuda")
    args.batch = args.batch or (4 if compare else 8)
    args.seq_len = args.seq_len or (256 if compare else 300)
    args.prompt_len = args.seq_len // 2 if args.prompt_len is None else args.prompt_len
    if not 0 <= args.prompt_len < args.seq_len:
        sys.exit(f"error: --prompt_len {args.prompt_len} must be in [0, --seq_len {args.seq_len})")
    (run_compare if compare else run_llama8b)(args)


if __name__ == "__main__":
    main()
