"""The block's elementwise chains (RMSNorm, SwiGLU's gate), eager by default and optionally fused by
`torch.compile` into one kernel each, forward and backward (`use_compiled_kernels`).

Eager, RMSNorm is seven passes over the activation (cast, square, mean, rsqrt, two products, cast back)
and SwiGLU two, with as many again in backward; on a CPU those passes, not the matmuls, are most of a
bf16 training step. Compiled, each chain reads its inputs once. The compiled versions compute the same
formulas (fp32 inside RMSNorm, the input dtype outside); a compiler that fails (no C++ toolchain, an
unsupported device) falls back to eager at the first call, with one warning.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F


def rms_norm_eager(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., dim) / rms(x) * weight (dim,): normalised in fp32 (bf16 loses the small variance terms),
    scaled in x's dtype, as Meta's reference."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.type_as(x) * weight


def swiglu_eager(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up, both (..., hidden)."""
    return F.silu(gate) * up


EAGER: dict[str, Callable[..., torch.Tensor]] = {"rms_norm": rms_norm_eager, "swiglu": swiglu_eager}
_active: dict[str, Callable[..., torch.Tensor]] = dict(EAGER)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_eager`, or its compiled kernel after `use_compiled_kernels(True)`."""
    return _active["rms_norm"](x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`swiglu_eager`, or its compiled kernel after `use_compiled_kernels(True)`."""
    return _active["swiglu"](gate, up)


def _with_fallback(name: str, compiled: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`compiled`, switching `name` back to eager for good (one warning) when compiling or running it
    raises; the call is then redone eagerly, so a genuine error in the inputs still surfaces."""
    def run(*args: torch.Tensor | float) -> torch.Tensor:
        try:
            return compiled(*args)
        except Exception as e:  # any compiler failure means eager, which re-raises real errors
            _active[name] = EAGER[name]
            warnings.warn(f"torch.compile of {name} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "running it eagerly", RuntimeWarning, stacklevel=2)
            return EAGER[name](*args)
    return run


def use_compiled_kernels(enabled: bool = True) -> str:
    """Fuse (enabled) or un-fuse the elementwise chains for every model in this process; returns a
    one-line report. Compiling happens at the first call of each kernel (seconds, then cached on disk by
    torch); shapes are dynamic, so new batch sizes and lengths reuse the kernel."""
    if not enabled:
        _active.update(EAGER)
        return "elementwise kernels: eager"
    if not hasattr(torch, "compile"):
        return "elementwise kernels: eager (this torch has no torch.compile)"
    for name, fn in EAGER.items():
        _active[name] = _with_fallback(name, torch.compile(fn, dynamic=True))
    return "elementwise kernels: compiled with torch.compile (RMSNorm, SwiGLU), eager on failure"


def compiled_kernels_active() -> dict[str, bool]:
    """{kernel name: whether the compiled version is the one in use}."""
    return {name: _active[name] is not EAGER[name] for name in EAGER}
