"""Forward+backward step time and peak memory of the adapter kinds on the SmolLM2-135M shape.

    python benchmarks/bench_moa.py                       # CPU
    python benchmarks/bench_moa.py --device cuda
    python benchmarks/bench_moa.py --layers 2 --steps 2 --seqlen 128 --dtypes fp32   # a quick look, small size

Shape: dim 576, 30 layers, 9 heads, 3 KV heads, FFN 1536, vocab 49152; batch 4 x 256 tokens, random
tokens and targets, loss = cross-entropy over all positions. Configurations: the bare model (its
input embedding made to require grad so that backward runs through every layer, as with adapters),
LoRA r8 on Q,K,V,O,FFN_DOWN (no type router), Soft MoA (the paper's 7 types: that LoRA + prompt 10 +
parallel adapter 16, swi_x 4) and Sparse MoA with the same types, routed at a constant threshold
0.5 after shifting each type router's output bias by the median logit of this batch, so that half
of the real tokens run each type (the measured share is printed).

Each (configuration, dtype) runs in its own subprocess, with glibc's malloc keeping freed memory
(`KEEP_FREED`, so that page faults of re-mapped buffers do not decide the comparison), so that CPU
peak memory (peak RSS, and peak minus the RSS after building the model) is not mixed between runs; on CUDA the peak is
`torch.cuda.max_memory_allocated`. bf16 rows run the same full model and loss as fp32 on CUDA and on
CPUs with bf16 instructions (`avx512_bf16` / `amx_bf16`). On a CPU without them bf16 is ~30x slower
than fp32, so there bf16 rows time the blocks only (loss = mean square of the final hidden states,
no vocabulary projection) on `--bf16_layers` layers (default 1 there); compare them per layer.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from llama import ModelArgs, Transformer
from moa import RouterStats, attach_adapters, count_adapter_parameters
from moa.method.presets import preset_config
from moa.method.routers import BlockRouter

SMOLLM2_135M = dict(dim=576, n_heads=9, n_kv_heads=3, vocab_size=49152, multiple_of=256, norm_eps=1e-5,
                    rope_theta=100000.0, max_seq_len=2048)
# name -> (preset of moa/method/presets.py, flags changed from it); "bare": no adapters.
CONST_50 = dict(type_router="sparse", const_threshold=True, max_threshold=0.5)  # Soft MoA's 7 types, prompt included
E8 = dict(expert_num=8, hydra_moe=False, p_adapter_hydra=False)  # MoLoRA per site, 8 parallel adapters, 8 prompt sets
CONFIGS = {
    "bare": None,
    "lora_r8": ("lora", {}),
    "soft_moa": ("soft_moa", {}),
    "sparse_moa_50": ("soft_moa", CONST_50),
    # Heavier experts (every type an 8-expert mixture), where skipping has more work to save.
    "soft_moa_e8": ("soft_moa", E8),
    "sparse_moa_e8_50": ("soft_moa", dict(E8, **CONST_50)),
}
DEFAULT_CONFIGS = "bare,lora_r8,soft_moa,sparse_moa_50"
# Workers run with glibc's malloc keeping freed memory (no mmap'ed blocks, no heap trimming): otherwise
# the step's largest buffers (the 4 x 256 x 49152 logits and their gradient) are unmapped at free and
# fault in again at the next step, or not, depending on how earlier allocations left the heap; that
# moved a 30-layer bf16 step by up to 0.4 s between configurations that compute the same loss.
KEEP_FREED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def build(name: str, n_layers: int, dtype: torch.dtype, device: str) -> Transformer:
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in the target dtype (no fp32 copy inflating peak RSS)
    try:
        with torch.device(device):
            model = Transformer(ModelArgs(**SMOLLM2_135M, n_layers=n_layers))
    finally:
        torch.set_default_dtype(default)
    config = CONFIGS[name]
    if config is None:
        for p in model.parameters():
            p.requires_grad_(False)
        model.tok_embeddings.register_forward_hook(lambda mod, args, out: out.detach().requires_grad_())
        return model
    preset, changes = config
    return attach_adapters(model, dataclasses.replace(preset_config(preset, n_layers), **changes))


@torch.no_grad()
def center_type_routers(model: Transformer, tokens: torch.Tensor) -> None:
    """Shift each type router's output bias by the median logit per type on `tokens`, so w > 0.5 for
    half of the tokens. Fresh adapters leave every block's input unchanged, so one pass suffices."""
    logits = {}
    hooks = []
    for block in model.layers:
        r = getattr(block, "type_router", None)
        if isinstance(r, BlockRouter):
            last = r.w2 if hasattr(r, "w2") else r.proj
            hooks.append(last.register_forward_hook(lambda mod, a, out: logits.__setitem__(mod, out)))
    model.hidden_states(tokens)
    for h in hooks:
        h.remove()
    for lin, out in logits.items():
        lin.bias -= out.float().flatten(0, -2).median(0).values.to(lin.bias.dtype)


def bf16_is_fast(device: str) -> bool:
    """True on CUDA and on CPUs with bf16 instructions (Linux /proc/cpuinfo flags)."""
    if device == "cuda":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def current_rss_mib() -> float:
    """Resident memory of this process now (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(name: str, dtype_name: str, n_layers: int, args: argparse.Namespace) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    device = args.device
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch, args.seqlen), generator=gen).to(device)
    targets = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch, args.seqlen), generator=gen).to(device)
    model = build(name, n_layers, dtype, device)
    result = {"config": name, "dtype": dtype_name, "layers": n_layers,
              "trainable_M": count_adapter_parameters(model) / 1e6 if name != "bare" else 0.0}
    if name.startswith("sparse"):
        center_type_routers(model, tokens)
        with torch.no_grad(), RouterStats(model) as stats:
            model.hidden_states(tokens)
        active = [v["active"] for layer in stats.summary().values() for s, v in layer.items() if s != "prompt"]
        result["active"] = sum(active) / len(active)

    full_loss = dtype_name == "fp32" or bf16_is_fast(device)

    def step() -> None:
        if full_loss:
            F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()).backward()
        else:  # blocks only: the 49152-way projection alone would take minutes in CPU bf16
            model.hidden_states(tokens).float().pow(2).mean().backward()
        for p in model.parameters():
            p.grad = None

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    rss_built = current_rss_mib()
    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    times, cpu_times = [], []
    for _ in range(args.steps if dtype_name == "fp32" else args.bf16_steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    # Best of N: on a shared machine other jobs only ever add time; the CPU time (all threads of
    # this process) is a second, contention-insensitive view of the work done.
    result["step_s"] = min(times)
    result["median_s"] = sorted(times)[len(times) // 2]
    result["cpu_s"] = min(cpu_times)
    result["per_layer_ms"] = 1000 * result["step_s"] / n_layers
    if device == "cuda":
        result["peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20
        result["above_model_MiB"] = result["peak_MiB"] - sum(
            t.numel() * t.element_size() for t in model.parameters()) / 2**20
    else:
        result["peak_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["above_model_MiB"] = result["peak_MiB"] - rss_built
    return result


def print_goals(dtype_name: str, step_s: dict[str, float]) -> None:
    """The goals: Soft MoA <= 1.15x LoRA's step; Sparse MoA at ~50% activation faster than Soft MoA."""
    goals = []
    if "soft_moa" in step_s and "lora_r8" in step_s:
        ratio = step_s["soft_moa"] / step_s["lora_r8"]
        goals.append(f"soft_moa/lora_r8 {ratio:.2f}x (goal <= 1.15x: {'met' if ratio <= 1.15 else 'NOT met'})")
    for soft, sparse in (("soft_moa", "sparse_moa_50"), ("soft_moa_e8", "sparse_moa_e8_50")):
        if soft in step_s and sparse in step_s:
            ratio = step_s[sparse] / step_s[soft]
            goals.append(f"{sparse}/{soft} {ratio:.2f}x (goal < 1: {'met' if ratio < 1 else 'NOT met'})")
    if goals:
        print(f"goals {dtype_name}: " + "; ".join(goals), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, from {','.join(CONFIGS)}")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--bf16_layers", type=int, default=None,
                    help="layers for bf16 (default: --layers, or 1 on a CPU without bf16 instructions)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--bf16_steps", type=int, default=3)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        name, dtype_name, n_layers = args.worker.split(":")
        print(json.dumps(worker(name, dtype_name, int(n_layers), args)))
        return

    bf16_full = bf16_is_fast(args.device)
    if args.bf16_layers is None:
        args.bf16_layers = args.layers if bf16_full else 1
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch} x {args.seqlen}, best of {args.steps} fp32 / {args.bf16_steps} bf16 steps "
          f"after {args.warmup} warm-up; bf16 rows: "
          + ("full model and loss" if bf16_full else "blocks only, no vocabulary projection (no bf16 instructions)"))
    header = (f"{'config':<15}{'dtype':<6}{'layers':>7}{'trainable M':>12}{'active':>8}{'step s':>9}"
              f"{'median s':>9}{'cpu s':>8}{'ms/layer':>10}{'vs LoRA':>9}{'peak MiB':>10}{'+model MiB':>11}")
    print(header)
    for dtype_name in args.dtypes.split(","):
        n_layers = args.layers if dtype_name == "fp32" else args.bf16_layers
        lora_time = None
        step_s: dict[str, float] = {}
        for name in args.configs.split(","):
            passthrough = [a for a in sys.argv[1:] if not a.startswith("--worker")]
            out = subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough,
                                  "--worker", f"{name}:{dtype_name}:{n_layers}"],
                                 capture_output=True, text=True, check=True, env=dict(os.environ, **KEEP_FREED))
            r = json.loads(out.stdout.strip().splitlines()[-1])
            step_s[name] = r["step_s"]
            if name == "lora_r8":
                lora_time = r["step_s"]
            ratio = f"{r['step_s'] / lora_time:.2f}x" if lora_time else "-"
            active = f"{r['active']:.2f}" if "active" in r else "-"
            print(f"{name:<15}{dtype_name:<6}{n_layers:>7}{r['trainable_M']:>12.3f}{active:>8}{r['step_s']:>9.3f}"
                  f"{r['median_s']:>9.3f}{r['cpu_s']:>8.2f}{r['per_layer_ms']:>10.1f}{ratio:>9}"
                  f"{r['peak_MiB']:>10.0f}{r['above_model_MiB']:>11.0f}", flush=True)
        print_goals(dtype_name, step_s)


if __name__ == "__main__":
    main()
