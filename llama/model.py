"""LLaMA-3/3.1 in one file, with Meta's parameter names so `consolidated.*.pth` loads as is.
(Over 400 lines on purpose: the whole model reads top to bottom in one place, as nanoGPT's and
Meta's reference `model.py` do.)

Padding: every forward may take `token_mask` (B, T), True at real tokens. A row's real tokens get
RoPE positions 0, 1, 2, ... counted over real tokens only, and attention never reads a padded
key. This makes left padding (generation) and right padding (training) both exact: a padded row
computes, at its real positions, the same numbers as the row alone.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.util
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from llama.kernels import rms_norm, swiglu


def _is_int(v: object, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_positive(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


# What each params.json key (and run-time size) must hold: (description, test). JSON strings such as
# "2" or "1e-5" are refused here rather than failing (or computing nonsense) later.
_PARAM_RULES: dict[str, tuple[str, Callable[[object], bool]]] = {
    "dim": ("an integer >= 1", lambda v: _is_int(v, 1)),
    "n_layers": ("an integer >= 1", lambda v: _is_int(v, 1)),
    "n_heads": ("an integer >= 1", lambda v: _is_int(v, 1)),
    "vocab_size": ("an integer >= 1 (-1: from the tokenizer)", lambda v: _is_int(v, 1) or v == -1),
    "n_kv_heads": ("an integer >= 1 or null", lambda v: v is None or _is_int(v, 1)),
    "multiple_of": ("an integer >= 1", lambda v: _is_int(v, 1)),
    "ffn_dim_multiplier": ("a number > 0 or null", lambda v: v is None or _is_positive(v)),
    "norm_eps": ("a number > 0", _is_positive),
    "rope_theta": ("a number > 0", _is_positive),
    "use_scaled_rope": ("true or false", lambda v: isinstance(v, bool)),
    "rope_scaling_factor": ("a number > 0", _is_positive),
    "attn_head_dim": ("an even integer >= 2 or null", lambda v: v is None or (_is_int(v, 2) and v % 2 == 0)),
    "qk_norm": ("true or false", lambda v: isinstance(v, bool)),
    "max_seq_len": ("an integer >= 1", lambda v: _is_int(v, 1)),
    "attn_impl": ("'sdpa' or 'flash_attn'", lambda v: v in ("sdpa", "flash_attn")),
}


def check_params(params: dict) -> None:
    """A ValueError naming the first key whose value has the wrong type or range, its value and what
    it should be (`n_layers: expected an integer >= 1, got '2' (str)`)."""
    for key, value in params.items():
        what, ok = _PARAM_RULES.get(key, ("anything", lambda v: True))  # every field has one (tests check)
        if not ok(value):
            raise ValueError(f"{key}: expected {what}, got {value!r} ({type(value).__name__})")


@dataclass(kw_only=True)
class ModelArgs:
    """Every key of Meta's LLaMA-3/3.1 `params.json`, plus the run-time sizes.

    `ModelArgs.from_params(**params)` raises `ValueError` naming an unknown or missing key.
    """

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: Optional[int] = None
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    rope_scaling_factor: float = 8.0  # LLaMA-3.1's 8; LLaMA-3.2 1B/3B use 32 (with use_scaled_rope)
    attn_head_dim: Optional[int] = None  # per-head width when not dim / n_heads (Qwen3: 128 at any dim)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k (weights (head_dim,)) before RoPE
    max_seq_len: int = 2048
    attn_impl: str = "sdpa"  # "sdpa" or "flash_attn" (optional; padded batches use its varlen kernel)

    @classmethod
    def from_params(cls, **params) -> "ModelArgs":
        """`ModelArgs(**params)` for the keys of a params.json (plus the run-time sizes), checked
        first: an unknown or missing key, or a value of the wrong type or range (`check_params`), is a
        ValueError naming it (the constructor's TypeError would not say which keys params.json may hold)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise ValueError(f"ModelArgs: unknown key(s) {unknown}; expected keys of params.json: {sorted(fields)}")
        missing = [n for n, f in fields.items()
                   if n not in params and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"ModelArgs: missing required key(s) {missing}")
        check_params(params)
        return cls(**params)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.vocab_size <= 0:
            raise ValueError(f"ModelArgs: vocab_size must be positive, got {self.vocab_size} "
                             "(LLaMA-2 params.json stores -1: set it from the tokenizer)")
        if self.attn_head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"ModelArgs: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs: n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.attn_impl not in ("sdpa", "flash_attn"):
            raise ValueError(f"ModelArgs: attn_impl must be 'sdpa' or 'flash_attn', got {self.attn_impl!r}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head: `attn_head_dim`, or dim / n_heads (LLaMA)."""
        return self.attn_head_dim if self.attn_head_dim is not None else self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's SwiGLU width: 2/3 of 4*dim, times `ffn_dim_multiplier`, rounded up to `multiple_of`."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


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
    _varlen: Optional["VarlenIndex"] = None

    @property
    def continues(self) -> bool:
        """Whether the chunk follows tokens already in the KV cache (a decode step, a later prefill chunk)."""
        return self.start_pos > 0 or self.slot is not None

    def varlen_index(self) -> "VarlenIndex":
        """Where the real tokens of this padded chunk sit (computed once per forward, on first use)."""
        if self._varlen is None:
            self._varlen = varlen_index(self.token_mask)
        return self._varlen


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
        if k.dtype != self.k.dtype:  # an fp32 cache under a bf16 model (`kv_cache_dtype`)
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
        computed in k's (an fp32 KV cache under a bf16 model: `kv_cache_dtype`)."""
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
        device, and the dtype `kv_cache_dtype` picks: the weights', or fp32 under half-precision weights
        on a CPU whose fp32 decode attention is faster)."""
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"setup_caches: max_seq_len {max_seq_len} exceeds the model's max_seq_len "
                             f"{self.args.max_seq_len}")
        w = self.tok_embeddings.weight
        device = device or w.device
        dtype = dtype or kv_cache_dtype(w.dtype, torch.device(device), self.args.n_heads, self.args.n_kv_heads,
                                        self.args.head_dim)
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
