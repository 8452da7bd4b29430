"""The CPU's measured matmul rate, for the printed floors of the benchmarks (bench_train.py).

A benchmark's number only: no choice anywhere (the `--dtype auto` rule is llama/hardware.py's, from the
hardware's declared features, never a timing).
"""
from __future__ import annotations

import time

import torch

PROBE_SHAPE = (1024, 576, 1536)  # (m, k, n): (m, k) @ (k, n), SmolLM2-135M's FFN up-projection of a 4x256 batch


def matmul_gflops(dtype: torch.dtype, shape: tuple[int, int, int] = PROBE_SHAPE, seconds: float = 0.4) -> float:
    """The best rate (GFLOP/s) of `(m, k) @ (k, n)` on the CPU in `dtype` over repeated calls within about
    `seconds`. Two calls on an eighth of the rows come first: the first warms the kernels up (oneDNN's
    kernel creation and weight reorder for AMX can take longer than many real calls, so it is not
    timed); when the second alone takes over a quarter of the budget (emulated bf16), its rate is the
    answer. 0.0 when the dtype's matmul fails."""
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    try:
        a = torch.randn(m, k, generator=g).to(dtype)
        b = torch.randn(k, n, generator=g).to(dtype)
        small = a[: max(1, m // 8)]
        torch.mm(small, b)  # warm-up: kernel selection, JIT, page faults
        t0 = time.perf_counter()
        torch.mm(small, b)
        t_small = max(time.perf_counter() - t0, 1e-9)
        if t_small > seconds / 4:
            return 2.0 * small.shape[0] * k * n / t_small / 1e9
        best = float("inf")
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or best == float("inf"):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
    except RuntimeError:
        return 0.0
    return 2.0 * m * k * n / max(best, 1e-9) / 1e9
