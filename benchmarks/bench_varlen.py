"""Attention on a padded training batch at the LLaMA-3.1-8B shape (GPU): SDPA with the padding mask
(our fallback) against flash-attn's varlen kernel on the packed real tokens (`--flash_attention2 True`),
forward + backward of one layer's attention, bf16, batch 8 x 300 with row lengths 150..300.

    python benchmarks/bench_varlen.py                 # needs CUDA; flash-attn for the second row
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from llama.flash import flash_attn_module, pack_rows, unpack_rows, varlen_index


def padded_batch(batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int, device: str):
    """q (B, H, T, hd), k, v (B, KV, T, hd) bf16 requiring grad, and the (B, T) right-padding mask."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(seqlen // 2, seqlen + 1, (batch,), generator=g)
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).to(device)
    make = lambda h: torch.randn(batch, h, seqlen, head_dim, device=device, dtype=torch.bfloat16).requires_grad_()
    return make(heads), make(kv_heads), make(kv_heads), mask


def sdpa_masked(q, k, v, mask):
    """Our fallback: SDPA with the causal & padding mask (pads read themselves)."""
    t = q.shape[2]
    m = torch.ones(t, t, dtype=torch.bool, device=q.device).tril() & mask[:, None, :]
    m |= torch.eye(t, dtype=torch.bool, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m[:, None], enable_gqa=True).transpose(1, 2)


def flash_varlen(q, k, v, mask):
    """The model's varlen path: pack the real tokens, one varlen call, unpack."""
    flash, idx = flash_attn_module(), varlen_index(mask)
    pq, pk, pv = (pack_rows(t.transpose(1, 2), idx) for t in (q, k, v))
    out = flash.flash_attn_varlen_func(pq, pk, pv, idx.cu_seqlens, idx.cu_seqlens, idx.max_seqlen,
                                       idx.max_seqlen, causal=True)
    return unpack_rows(out, idx, q.shape[0], q.shape[2])


def time_ms(fn, q, k, v, mask, iters: int) -> float:
    """Median ms of forward + backward over `iters` calls, CUDA events."""
    times = []
    for i in range(iters + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(q, k, v, mask).float().square().mean().backward()
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_varlen.py needs a CUDA device")
    q, k, v, mask = padded_batch(8, 300, 32, 8, 128, "cuda")
    print("| attention fwd+bwd, 8B layer, 8 x 300 padded, bf16 | ms |\n|---|---|")
    print(f"| SDPA + padding mask (fallback) | {time_ms(sdpa_masked, q, k, v, mask, a.iters):.3f} |")
    if flash_attn_module() is None:
        print("| flash-attn varlen | not installed |")
    else:
        print(f"| flash-attn varlen | {time_ms(flash_varlen, q, k, v, mask, a.iters):.3f} |")


if __name__ == "__main__":
    main()
