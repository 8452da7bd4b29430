"""flash-attn, an optional dependency: the module when it can be imported (`flash_attn_module`), and the
packing of a padded batch's real tokens, row after row, that its varlen kernel reads (`varlen_index`,
`pack_rows`, `unpack_rows`).
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class VarlenIndex:
    """The real tokens of a padded batch packed row after row, as flash-attn's varlen kernels read them.

    indices: (N,) int64 flat positions in the B*T slots of the N real tokens, in row-major order.
    cu_seqlens: (B+1,) int32 cumulative real-token counts: row b is packed[cu_seqlens[b]:cu_seqlens[b+1]].
    max_seqlen: the largest real-token count of a row (a host int).
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int


def varlen_index(token_mask: torch.Tensor) -> VarlenIndex:
    """token_mask (B, T) bool, True at real tokens -> their `VarlenIndex` (one host sync: max_seqlen)."""
    seqlens = token_mask.sum(1, dtype=torch.int32)  # (B,)
    cu_seqlens = F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
    indices = token_mask.reshape(-1).nonzero().squeeze(1)
    return VarlenIndex(indices, cu_seqlens, int(seqlens.max()))


def pack_rows(x: torch.Tensor, idx: VarlenIndex) -> torch.Tensor:
    """x (B, T, ...) -> (N, ...): the real tokens only, row after row."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, idx.indices)


def unpack_rows(packed: torch.Tensor, idx: VarlenIndex, bsz: int, seqlen: int) -> torch.Tensor:
    """packed (N, ...) -> (B, T, ...), zeros at the pad slots (inverse of `pack_rows`)."""
    out = packed.new_zeros(bsz * seqlen, *packed.shape[1:])
    return out.index_copy(0, idx.indices, packed).view(bsz, seqlen, *packed.shape[1:])


@functools.lru_cache(maxsize=1)
def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flash_attn_module():
    """The flash_attn package when it can be imported (one already in `sys.modules` counts), else None."""
    module = sys.modules.get("flash_attn")
    if module is None and _flash_attn_installed():
        import flash_attn as module  # optional dependency, imported only when asked for
    return module
