"""The CPU timing probe behind the KV cache's dtype (`kv_cache_dtype`, the default of
`Transformer.setup_caches`): half-precision weights keep a half-precision cache unless one decode step's
attention runs faster over an fp32 one on this CPU.
"""
from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def kv_cache_dtype(weight_dtype: torch.dtype, device: torch.device, n_heads: int, n_kv_heads: int,
                   head_dim: int) -> torch.dtype:
    """The dtype of a KV cache for weights of `weight_dtype`: the same, except bf16/fp16 on a CPU where a
    probe finds one decode step's attention faster over an fp32 cache (then fp32, and attention runs in
    fp32). CPUs without AMX run half-precision SDPA far slower than fp32 (~6x for a one-token query
    over 200 keys on a 2-core EPYC) while their fp32 kernel reads the keys at memory speed; a GPU
    keeps the weights' dtype. The probe (a few ms, once per process and head shape) times a batch of
    8 one-token queries over 256 cached keys in both dtypes."""
    if device.type != "cpu" or weight_dtype not in (torch.bfloat16, torch.float16):
        return weight_dtype
    g = torch.Generator().manual_seed(0)
    q = torch.randn(8, n_heads, 1, head_dim, generator=g)
    k, v = (torch.randn(8, n_kv_heads, 256, head_dim, generator=g) for _ in range(2))
    gqa = n_heads != n_kv_heads

    def best_seconds(dtype: torch.dtype) -> float:
        qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
        times = []
        with torch.inference_mode():
            for _ in range(4):  # the first call (kernel setup) is not counted
                t0 = time.perf_counter()
                F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=gqa)
                times.append(time.perf_counter() - t0)
        return min(times[1:])

    return torch.float32 if best_seconds(torch.float32) < best_seconds(weight_dtype) else weight_dtype
