"""`params.json` <-> `ModelArgs`: every key of Meta's LLaMA-3/3.1 file (plus the optional architecture
keys and the run-time sizes), the type and range each must hold (`check_params`), and the
(`multiple_of`, `ffn_dim_multiplier`) pair that gives a wanted FFN width (`ffn_params`, for configs
that state the width itself: Hugging Face's config.json, GGUF metadata).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional


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


def check_value(key: str, value: object, field: Optional[str] = None) -> None:
    """A ValueError unless `value` holds what params key `key` must hold: `FIELD: expected WHAT, got
    VALUE (TYPE)`. field: the name the value has in the file it was read from (default `key`; a
    Hugging Face config.json's `num_attention_heads` is checked by the rule of `n_heads`)."""
    what, ok = _PARAM_RULES.get(key, ("anything", lambda v: True))  # every field has one (tests check)
    if not ok(value):
        raise ValueError(f"{field or key}: expected {what}, got {value!r} ({type(value).__name__})")


def check_params(params: dict) -> None:
    """A ValueError naming the first key whose value has the wrong type or range, its value and what
    it should be (`n_layers: expected an integer >= 1, got '2' (str)`)."""
    for key, value in params.items():
        check_value(key, value)


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


def linear_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection weight of a block, by its name (wq wk wv wo of the attention, w1 w3
    w2 of the FFN), as `llama.model` builds them from `args`."""
    q, kv, hidden = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.ffn_hidden_dim
    return {"wq": (q, args.dim), "wk": (kv, args.dim), "wv": (kv, args.dim), "wo": (args.dim, q),
            "w1": (hidden, args.dim), "w3": (hidden, args.dim), "w2": (args.dim, hidden)}


def ffn_params(dim: int, hidden: int) -> tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) for which Meta's SwiGLU rule gives exactly `hidden`.

    Round values first (LLaMA-3.1-8B: 1024, 1.3; SmolLM2: 256, None); the last resort, multiple_of 1
    with a multiplier a half unit above the exact ratio, gives any width.
    """
    base = int(2 * (4 * dim) / 3)
    sizes = (256, 1024, 512, 128, 64, 32, 16, 8, 4, 2, 1)  # ModelArgs' default first
    candidates = [(m, None) for m in sizes] + [(m, round(hidden / base, 4)) for m in sizes]
    candidates += [(m, hidden / base) for m in sizes] + [(1, (hidden + 0.5) / base)]
    for multiple_of, mult in candidates:
        args = ModelArgs(dim=dim, n_layers=1, n_heads=1, vocab_size=1, multiple_of=multiple_of,
                         ffn_dim_multiplier=mult)
        if args.ffn_hidden_dim == hidden:
            return multiple_of, mult
    raise ValueError(f"no multiple_of / ffn_dim_multiplier gives FFN width {hidden} for dim {dim}")
