"""LLaMA-3/3.1 (and dense Qwen3), with Meta's parameter names so `consolidated.*.pth` loads as is: the
whole model reads top to bottom here, as nanoGPT's and Meta's reference `model.py` do. Beside it:
`ModelArgs` and the checks of params.json (`llama/params.py`), RoPE (`llama/rope.py`), flash-attn and its
varlen packing (`llama/flash.py`), the KV cache's dtype by the hardware's declared features (`llama/hardware.py`).

Padding: every forward may take `token_mask` (B, T), True at real tokens. A row's real tokens get
RoPE positions 0, 1, 2, ... counted over real tokens only, and attention never reads a padded
key. This makes left padding (generation) and right padding (training) both exact: a padded row
computes, at its real positions, the same numbers as the row alone.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from llama.flash import VarlenIndex, flash_attn_module, pack_rows, unpack_rows, varlen_index
from llama.hardware import auto_kv_cache_dtype
from llama.kernels import rms_norm, swiglu
from llama.params import ModelArgs
from llama.rope import apply_rotary_emb, rope_inv_freq, rope_table

_RECOMPUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("llama_recomputing", default=False)


def is_recomputing() -> bool:
    """True while activation checkpointing recomputes a block during backward: code that records
    something per forward (statistics, auxiliary losses) must not record it a second time then."""
    return _RECOMPUTING.get()


@contextlib.contextmanager
def _recomputation():
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def _checkpoint_contexts():
    """`context_fn` of torch.utils.checkpoint: nothing around the forward, the flag around recomputation."""
    return contextlib.nullcontext(), _recomputation()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # fp32 inside, the input dtype outside


@dataclass
class ForwardMeta:
    """What every block needs besides its input, built once per forward by `Transformer`.

    rope: (B, T, head_dim/2) complex64 rotary table at each token's position (`rope_table`; real
        (cos, sin) pairs (B, T, head_dim/2, 2) under torch.compile).
    attn_mask: (B, 1, T, S) bool, True where a query may read a key; None means plain causal
        attention over this chunk (no cache, no padding).
    token_mask: (B, T) bool, True at real tokens; None when every token is real.
    start_pos: the KV-cache slot of the chunk's first token; -1 in a captured decode step, whose slot
        is the tensor `slot`.
    is_causal: with attn_mask None, whether attention is causal (False for a one-token decode step
        that reads every cached slot).
    slot: () int64 on the model's device, the cache slot of a one-token decode step given as a tensor
        (`Transformer.forward(..., slot=)`), so that every step runs the same shapes and one
        captured graph (torch.compile, CUDA graphs) serves them all: the step writes its key and
        value at `slot` and attends over the whole cache, the slots not yet written masked. None otherwise.
    """

    start_pos: int
    rope: torch.Tensor
    attn_mask: Optional[torch.Tensor]
    token_mask: Optional[torch.Tensor]
    is_causal: bool = True
    slot: Optional[torch.Tensor] = None
    _varlen: Optional[VarlenIndex] = None

    @property
    def continues(self) -> bool:
        """Whether the chunk follows tokens already in the KV cache (a decode step, a later prefill chunk)."""
        return self.start_pos > 0 or self.slot is not None

    def varlen_index(self) -> VarlenIndex:
        """Where the real tokens of this padded chunk sit (computed once per forward, on first use)."""
        if self._varlen is None:
            self._varlen = varlen_index(self.token_mask)
        return self._varlen


class KVCache(nn.Module):
    """Keys and values of past tokens, (B, n_kv_heads, S, head_dim), made by `Transformer.setup_caches`."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # Per-sequence state that a subclass of the block keeps for as long as this cache lives
        # (e.g. weights computed once from the prompt and reused at every decode step).
        self.extra: dict[str, torch.Tensor] = {}

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor,
               slot: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) at slots [start_pos, start_pos+T); return all slots up to there.
        With `slot` (a () int64 tensor; T = 1): write at that slot and return every slot (static shapes)."""
        bsz, _, seqlen, _ = k.shape
        if k.dtype != self.k.dtype:  # an fp32 cache under a bf16 model (`auto_kv_cache_dtype`)
            k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if slot is not None:
            index = slot.view(1)
            return self.k[:bsz].index_copy_(2, index, k), self.v[:bsz].index_copy_(2, index, v)
        end = start_pos + seqlen
        self.k[:bsz, :, start_pos:end] = k
        self.v[:bsz, :, start_pos:end] = v
        return self.k[:bsz, :, :end], self.v[:bsz, :, :end]


class Attention(nn.Module):
    """Grouped-query attention. `forward` is split into `qkv` and `attend` so that a subclass can
    add to the attention output before `wo` without repeating the rest."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.attn_impl = args.attn_impl
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        # Qwen3's per-head RMSNorm of q and k, before RoPE (None for LLaMA).
        self.q_norm = RMSNorm(self.head_dim, eps=args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=args.norm_eps) if args.qk_norm else None
        self.cache: Optional[KVCache] = None

    def qkv(self, x: torch.Tensor, meta: ForwardMeta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, dim) -> q (B, H, T, hd) rotated; k, v (B, KV, S, hd) including cached slots."""
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary_emb(q, meta.rope).transpose(1, 2)
        k = apply_rotary_emb(k, meta.rope).transpose(1, 2)
        v = v.transpose(1, 2)
        if self.cache is not None:
            cached_k, cached_v = self.cache.update(meta.start_pos, k, v, meta.slot)
            if meta.continues:  # a chunk at start_pos 0 reads only its own keys: those just computed
                k, v = cached_k, cached_v
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: ForwardMeta) -> torch.Tensor:
        """Softmax attention of q (B, H, T, hd) over k, v (B, KV, S, hd) -> (B, T, H*hd) in q's dtype,
        computed in k's (an fp32 KV cache under a bf16 model: `auto_kv_cache_dtype`)."""
        if q.dtype != k.dtype:
            return self.attend(q.to(k.dtype), k, v, meta).to(q.dtype)
        flash = flash_attn_module() if self.attn_impl == "flash_attn" else None
        if flash is not None and meta.attn_mask is None and meta.is_causal:
            out = flash.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        elif flash is not None and self.cache is None and meta.token_mask is not None:
            return self._flash_varlen(flash, q, k, v, meta)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=meta.attn_mask, is_causal=meta.attn_mask is None and meta.is_causal,
                enable_gqa=self.n_kv_heads != self.n_heads,
            ).transpose(1, 2)
        return out.flatten(2)

    def _flash_varlen(self, flash, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      meta: ForwardMeta) -> torch.Tensor:
        """Causal attention of a padded batch without a cache through flash-attn's varlen kernel:
        q (B, H, T, hd), k, v (B, KV, T, hd) -> (B, T, H*hd), zeros at the pad slots."""
        idx = meta.varlen_index()
        bsz, _, seqlen, _ = q.shape
        pq, pk, pv = (pack_rows(t.transpose(1, 2), idx) for t in (q, k, v))  # (N, H|KV, hd)
        out = flash.flash_attn_varlen_func(pq, pk, pv, idx.cu_seqlens, idx.cu_seqlens, idx.max_seqlen,
                                           idx.max_seqlen, causal=True)
        return unpack_rows(out, idx, bsz, seqlen).flatten(2)

    def forward(self, x: torch.Tensor, meta: ForwardMeta) -> torch.Tensor:
        q, k, v = self.qkv(x, meta)
        return self.wo(self.attend(q, k, v, meta))


class FeedForward(nn.Module):
    """SwiGLU: w2(SiLU(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, meta: ForwardMeta) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), meta)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.grad_checkpointing = False  # recompute each block in backward (training memory)
        # (B, S) bool: which cache slots hold real tokens. A (non-persistent) buffer, as the caches' k and v:
        # a captured decode step updates it in place, which CUDA graphs allow for buffers only.
        self.register_buffer("cache_valid", None, persistent=False)
        self._inv_freq: Optional[torch.Tensor] = None
        self._cache_padded = True  # whether a cache slot before the newest may hold a pad (host flag)

    # ---- KV cache -------------------------------------------------------------------------
    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> None:
        """Allocate a KV cache of (max_batch_size, max_seq_len) in every layer (default: the weights'
        device, and the dtype `llama.hardware.auto_kv_cache_dtype` picks: the weights', or fp32 under
        half-precision weights on a CPU without amx_bf16)."""
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"setup_caches: max_seq_len {max_seq_len} exceeds the model's max_seq_len "
                             f"{self.args.max_seq_len}")
        w = self.tok_embeddings.weight
        device = device or w.device
        dtype = dtype or auto_kv_cache_dtype(w.dtype, device)
        for layer in self.layers:
            layer.attention.cache = KVCache(max_batch_size, max_seq_len, self.args.n_kv_heads,
                                            self.args.head_dim, dtype, device)
        self.cache_valid = torch.zeros(max_batch_size, max_seq_len, dtype=torch.bool, device=device)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None
        self.cache_valid = None

    @property
    def cache_shape(self) -> Optional[tuple[int, int]]:
        """(max_batch_size, max_seq_len) of the current KV cache, or None."""
        return None if self.cache_valid is None else tuple(self.cache_valid.shape)

    # ---- forward --------------------------------------------------------------------------
    def _meta(self, tokens: torch.Tensor, start_pos: int, token_mask: Optional[torch.Tensor],
              slot: Optional[torch.Tensor] = None) -> ForwardMeta:
        bsz, seqlen = tokens.shape
        device = tokens.device
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = rope_inv_freq(self.args, device)
        if slot is not None:
            if self.cache_valid is None or seqlen != 1 or token_mask is not None or start_pos != 0:
                raise ValueError("slot= is a one-token decode step of unpadded rows into a KV cache "
                                 "(setup_caches first; no start_pos, no token_mask)")
            return self._slot_decode_meta(bsz, slot)
        if token_mask is not None and token_mask.shape != tokens.shape:
            raise ValueError(f"token_mask shape {tuple(token_mask.shape)} != tokens shape {tuple(tokens.shape)}")
        end = start_pos + seqlen
        if end > self.args.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds max_seq_len {self.args.max_seq_len}")

        if self.cache_valid is None:
            if start_pos != 0:
                raise ValueError("start_pos > 0 needs a KV cache: call setup_caches first")
            if token_mask is None:
                positions = torch.arange(seqlen, device=device).expand(bsz, seqlen)
                attn_mask = None
            else:
                positions = (token_mask.long().cumsum(1) - 1).clamp(min=0)
                causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril()
                attn_mask = causal & token_mask[:, None, :]
        else:
            cache_bsz, cache_len = self.cache_valid.shape
            if bsz > cache_bsz or end > cache_len:
                raise ValueError(f"batch {bsz} x {end} tokens does not fit the KV cache {cache_bsz} x {cache_len}")
            if start_pos == 0 or token_mask is not None:
                self._cache_padded = start_pos > 0 or token_mask is not None
            if seqlen == 1 and token_mask is None:
                return self._decode_meta(bsz, start_pos)
            valid = self.cache_valid[:bsz]
            valid[:, start_pos:end] = True if token_mask is None else token_mask
            # Position of each new token = number of real tokens before it in its row.
            positions = valid[:, :end].long().cumsum(1)[:, start_pos:end] - 1
            positions = positions.clamp(min=0)
            causal = torch.ones(seqlen, end, dtype=torch.bool, device=device).tril(diagonal=start_pos)
            attn_mask = causal & valid[:, None, :end]
        if attn_mask is not None:
            # A padded query with no readable key would give NaN; let it read itself (its output is unused).
            diag = torch.zeros_like(attn_mask[0])
            diag[torch.arange(seqlen, device=device), torch.arange(start_pos, end, device=device)] = True
            attn_mask = (attn_mask | diag)[:, None]  # (B, 1, T, S)

        angles = positions[..., None].float() * self._inv_freq  # (B, T, hd/2)
        return ForwardMeta(start_pos, rope_table(angles), attn_mask, token_mask)

    def _decode_meta(self, bsz: int, start_pos: int) -> ForwardMeta:
        """The metadata of a one-token decode step at cache slot `start_pos`, rows all real: no mask
        built. The token reads every slot up to itself that holds a real token, which is all of
        them unless the prompts were padded (`_cache_padded`, a host flag set at prefill); its
        position is the number of real tokens before it."""
        valid = self.cache_valid[:bsz, :start_pos + 1]
        valid[:, start_pos] = True
        if self._cache_padded:
            attn_mask = valid[:, None, None, :]  # (B, 1, 1, S): a view of the cache's own flags
            positions = valid.sum(1, keepdim=True) - 1  # (B, 1)
        else:
            attn_mask = None
            positions = torch.full((bsz, 1), start_pos, dtype=torch.long, device=valid.device)
        angles = positions[..., None].float() * self._inv_freq  # (B, 1, hd/2)
        return ForwardMeta(start_pos, rope_table(angles), attn_mask, None, is_causal=False)

    def _slot_decode_meta(self, bsz: int, slot: torch.Tensor) -> ForwardMeta:
        """`_decode_meta` with the slot a () int64 tensor and shapes that do not depend on it: the
        token reads every cache slot through the cache's own flags (slots past it are not yet valid:
        generation clears the flags at prefill), so no host value changes from one step to the next.
        Its position is the number of real tokens before it, padded prompts or not."""
        valid = self.cache_valid[:bsz]
        valid.index_fill_(1, slot.view(1), True)
        positions = valid.sum(1, keepdim=True) - 1  # (B, 1)
        angles = positions[..., None].float() * self._inv_freq  # (B, 1, hd/2)
        return ForwardMeta(-1, rope_table(angles), valid[:, None, None, :], None, is_causal=False, slot=slot)

    def hidden_states(self, tokens: torch.Tensor, start_pos: int = 0, token_mask: Optional[torch.Tensor] = None,
                      *, slot: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final normed hidden states (B, T, dim), without the vocabulary projection.

        Training computes logits from these only at label positions.
        """
        meta = self._meta(tokens, start_pos, token_mask, slot)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, meta, use_reentrant=False,
                                                      context_fn=_checkpoint_contexts)
            else:
                h = layer(h, meta)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, token_mask: Optional[torch.Tensor] = None,
                *, slot: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, T) int64 -> logits (B, T, vocab_size) fp32.

        start_pos: cache slot of tokens[:, 0] (0 without a KV cache).
        token_mask: (B, T) bool, True at real tokens (left or right padding), None if all real.
        slot: for a one-token decode step (T = 1) instead of start_pos, its cache slot as a () int64
            tensor: the same computation with shapes that do not change from step to step (`ForwardMeta.slot`).
        """
        return self.output(self.hidden_states(tokens, start_pos, token_mask, slot=slot)).float()
