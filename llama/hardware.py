"""Automatic dtype choices from the hardware's declared features, never from a timing.

Nothing that changes numbers may depend on a timing: a timed choice flips under load, so that two
identical commands (or a killed job and its rerun) would compute their rows in different dtypes.
The rules:

- `auto_dtype(device)` (`--dtype auto`, `--bf16 auto`): on CUDA, bfloat16 when the device declares
  bf16 support (`torch.cuda.is_bf16_supported()`), else float32; on a CPU, bfloat16 when its flags
  include `amx_bf16` or `avx512_bf16` (native bf16 matmul kernels), else float32 (bf16 is emulated
  there: slower than fp32, and it rounds the activations); any other device: float32.
- `auto_kv_cache_dtype(weight_dtype, device)` (the KV cache's default): the weights' dtype, except
  half-precision weights on a CPU without `amx_bf16`, which get an fp32 cache (measured: CPUs without
  AMX run a one-token query's half-precision SDPA about 6x slower than fp32, whose kernel reads the
  keys at memory speed).

`cpu_flags()` reads the `flags` line of /proc/cpuinfo once per process; the environment variable
`MOA_CPU_FLAGS` (flags separated by commas or spaces; empty: none) replaces it, to simulate another
machine (tests) or to pin a choice.
"""
from __future__ import annotations

import functools
import os
import re

import torch

CPU_FLAGS_ENV = "MOA_CPU_FLAGS"
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # either: a CPU with native bf16 matmul kernels
FAST_HALF_ATTENTION_FLAG = "amx_bf16"  # without it, half-precision SDPA is far slower than fp32


@functools.lru_cache(maxsize=1)
def _proc_cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: `MOA_CPU_FLAGS` when set (comma- or space-separated), else the `flags`
    line of /proc/cpuinfo (read once; empty where there is none)."""
    override = os.environ.get(CPU_FLAGS_ENV)
    if override is not None:
        return frozenset(f for f in re.split(r"[,\s]+", override.strip().lower()) if f)
    return _proc_cpu_flags()


def _flags_source() -> str:
    return f"${CPU_FLAGS_ENV}" if os.environ.get(CPU_FLAGS_ENV) is not None else "/proc/cpuinfo"


def auto_dtype(device: torch.device | str) -> tuple[torch.dtype, str]:
    """The weights' dtype `auto` means on `device`, and the reason (for the printed report)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16, "the CUDA device declares bf16 support"
        return torch.float32, "the CUDA device declares no bf16 support"
    if dev.type != "cpu":
        return torch.float32, f"no bf16 rule for device type {dev.type}"
    found = [f for f in BF16_CPU_FLAGS if f in cpu_flags()]
    if found:
        return torch.bfloat16, f"CPU flags ({_flags_source()}) include {', '.join(found)}"
    return torch.float32, f"CPU flags ({_flags_source()}) include neither {' nor '.join(BF16_CPU_FLAGS)}"


def auto_kv_cache_dtype(weight_dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The KV cache's dtype under weights of `weight_dtype`: the same, except bf16/fp16 weights on a CPU
    whose flags lack `amx_bf16` (then float32; attention then runs in fp32)."""
    if torch.device(device).type != "cpu" or weight_dtype not in (torch.bfloat16, torch.float16):
        return weight_dtype
    return weight_dtype if FAST_HALF_ATTENTION_FLAG in cpu_flags() else torch.float32
