"""Rotary position embeddings: the inverse frequencies (with LLaMA-3.1's scaling), the table of a batch's
positions, and the rotation of q / k in Meta's interleaved layout.
"""
from __future__ import annotations

import math

import torch

from llama.params import ModelArgs


def rope_inv_freq(args: ModelArgs, device: torch.device | None = None) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim/2,), fp32, with LLaMA-3.1 scaling when `use_scaled_rope`.

    LLaMA-3.1 scaling (factor `rope_scaling_factor`, 8 for 3.1 and 32 for 3.2 1B/3B, low-frequency
    factor 1, high-frequency factor 4, original context 8192): wavelengths shorter than 8192/4 are
    kept, longer than 8192/1 divided by the factor, and those between interpolated smoothly.
    """
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32)[: hd // 2] / hd))
    if not args.use_scaled_rope:
        return inv_freq
    factor, low_ff, high_ff, old_ctx = args.rope_scaling_factor, 1.0, 4.0, 8192.0
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_ctx / low_ff, inv_freq / factor, interpolated)
    return torch.where(wavelen < old_ctx / high_ff, inv_freq, scaled)


def rope_table(angles: torch.Tensor) -> torch.Tensor:
    """The rotary table of `angles` (..., hd/2) fp32: the unit complex numbers exp(i * angle), complex64.

    Under torch.compile (a captured decode step) the same numbers as real pairs (..., hd/2, 2) =
    (cos, sin) fp32: inductor generates no code for complex tensors (they would fall back to one
    eager kernel each), while real arithmetic fuses into the neighbouring kernels."""
    if torch.compiler.is_compiling():
        return torch.stack([angles.cos(), angles.sin()], dim=-1)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, hd) by the rotary table `rope` (`rope_table`:
    (B, T, hd/2) complex64, or (B, T, hd/2, 2) real (cos, sin)): each pair, read as the complex number
    x[2i] + i x[2i+1], is multiplied by exp(i * angle). Complex, that is one elementwise pass (as Meta's
    reference code); real, the four products that a compiler fuses.

    Meta's checkpoints store wq/wk rows in this interleaved layout (transformers' use a half split).
    Computed in fp32, returned in x's dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
    if rope.is_complex():
        return torch.view_as_real(torch.view_as_complex(pairs) * rope[:, :, None, :]).flatten(-2).type_as(x)
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]  # (B, T, 1, hd/2)
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2).type_as(x)
