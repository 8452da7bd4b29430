"""The weights' dtype of a run: `float32`, `bfloat16`, or `auto`, which picks bf16 only where it pays.

`auto`:
- CUDA: bfloat16 when the GPU supports it (`torch.cuda.is_bf16_supported()`), else float32.
- CPU: a short probe (under 1 s) times a matmul of the SmolLM2-135M shape (1024x576 @ 576x1536,
  the FFN up-projection of a 4x256 batch) in fp32 and in bf16 with the current intra-op thread count,
  and picks bfloat16 only when it runs at least `BF16_MARGIN` times the fp32 rate (CPUs with AMX or
  fast avx512_bf16 kernels); otherwise float32 (CPUs whose bf16 matmul is emulated, or barely faster:
  bf16 rounds the activations, which is worth it only for a real speed-up).

The CPU probe runs once per process and thread count (cached); the report line says what was chosen
and both measured rates, so a log shows why.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

# The one table of --dtype names (example.py, evaluate_loss.py, scripts and benchmarks); a command line
# that accepts fewer says which (`resolve_dtype(..., names=)`, argparse `choices`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The names `resolve_dtype` accepts unless told otherwise (evaluate_loss.py's --dtype): float16 is not one.
DTYPE_NAMES = ("auto", "float32", "bfloat16")
BF16_MARGIN = 1.3  # bf16 must be at least this many times faster than fp32 to be chosen
PROBE_SHAPE = (1024, 576, 1536)  # (m, k, n): (m, k) @ (k, n)
PROBE_SECONDS = 0.4  # timing budget per dtype (after one warm-up call)

_cache: dict[int, tuple[float, float]] = {}  # thread count -> (fp32 GFLOP/s, bf16 GFLOP/s)


def matmul_gflops(dtype: torch.dtype, shape: tuple[int, int, int] = PROBE_SHAPE,
                  seconds: float = PROBE_SECONDS) -> float:
    """The best rate (GFLOP/s) of `(m, k) @ (k, n)` on the CPU in `dtype` over repeated calls within about
    `seconds`. Two calls on an eighth of the rows come first: the first warms the kernels up (oneDNN's
    kernel creation and weight reorder for AMX can take longer than many real calls, so it is not
    timed); when the second alone takes over a quarter of the budget (bf16 emulated in software runs
    at ~1 GFLOP/s, ~0.25 s for it), its rate is the answer. 0.0 when the dtype's matmul fails."""
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
        if t_small > seconds / 4:  # not the per-row cost scaled up: a call's fixed cost would dominate it
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


def choose_cpu_dtype(fp32_gflops: float, bf16_gflops: float, margin: float = BF16_MARGIN) -> torch.dtype:
    """bfloat16 when its rate is at least `margin` times the fp32 rate, else float32."""
    if fp32_gflops > 0 and bf16_gflops >= margin * fp32_gflops:
        return torch.bfloat16
    return torch.float32


def cpu_probe(measure: Optional[Callable[[torch.dtype], float]] = None) -> tuple[float, float]:
    """(fp32 GFLOP/s, bf16 GFLOP/s) of the probe matmul with the current thread count, measured once per
    process and thread count. `measure` (dtype -> GFLOP/s) replaces `matmul_gflops` (tests)."""
    threads = torch.get_num_threads()
    if threads not in _cache:
        fn = measure or matmul_gflops
        _cache[threads] = (fn(torch.float32), fn(torch.bfloat16))
    return _cache[threads]


def clear_probe_cache() -> None:
    """Forget the cached probe results (the next `auto` on CPU measures again)."""
    _cache.clear()


def resolve_dtype(name: str, device: torch.device | str,
                  names: tuple[str, ...] = DTYPE_NAMES) -> tuple[torch.dtype, str]:
    """The dtype `name` (auto or a key of `DTYPES`) means on `device`, and a one-line report of the choice.

    ValueError for a name not in `names` (default: auto | float32 | bfloat16).
    """
    if name not in names:
        raise ValueError(f"--dtype: expected one of {', '.join(names)}, got {name!r}")
    if name != "auto":
        return DTYPES[name], f"dtype {name} (as asked)"
    dev = torch.device(device)
    if dev.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"dtype auto -> bfloat16 ({torch.cuda.get_device_name(dev)} supports bf16)"
        return torch.float32, "dtype auto -> float32 (this CUDA device has no bf16 support)"
    if dev.type != "cpu":
        return torch.float32, f"dtype auto -> float32 (no probe for device type {dev.type})"
    fp32, bf16 = cpu_probe()
    chosen = choose_cpu_dtype(fp32, bf16)
    m, k, n = PROBE_SHAPE
    verdict = "at least" if chosen == torch.bfloat16 else "less than"
    ratio = f"{bf16 / fp32:.2f}x" if fp32 > 0 else "n/a"
    return chosen, (f"dtype auto -> {'bfloat16' if chosen == torch.bfloat16 else 'float32'}: "
                    f"{m}x{k} @ {k}x{n} matmul on {torch.get_num_threads()} CPU thread(s) runs at "
                    f"{fp32:.0f} GFLOP/s in fp32 and {bf16:.0f} GFLOP/s in bf16 ({ratio}, {verdict} the "
                    f"{BF16_MARGIN}x bf16 needs)")
