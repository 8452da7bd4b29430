"""The expert modules (docs/method.md): LoRA sites (plain, MoLoRA, HydraLoRA), the parallel adapter
(single, MoE, hydra) and the prompt (single, E prompt sets).

Every site reads its `Route` with `current_route(self.slot)` (handed out by its block for the
duration of that block's forward; None, outside a block, means weight 1 on every token). Each
module lists its trainable tensors in `adapter_params()` (the injection seam never guesses them from
names). Adapter tensors have their own dtype (fp32 by default, the master weights AdamW updates),
but an expert computes in its input activations' dtype: the small adapter tensors are cast to it
(a cast whose backward returns fp32 gradients), the activations never are, so a bf16 base costs no
(tokens, dim) copies. Homogeneous experts are stacked tensors (`A: (E, r, in)`) contracted in one
einsum, never a list of modules.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moa.method.config import P_ADAPTER_SLOT, PROMPT_SLOT, MoAConfig, pissa_iterations
from moa.method.routers import ExpertRouter, Route, adapter_linear, as_dtype, current_route

# delta_fn(z (..., in), row_mask (...) bool | None, weight broadcastable to (..., 1) | None[, aux=(..., d_aux)])
#   -> (..., out), in z's dtype
DeltaFn = Callable[..., torch.Tensor]
# An expert whose delta is up(down(z), weight): down (n, in) -> (n, k) with k rank-sized, up (n, k),
# weight (n, 1) | None -> (n, out). Both in z's dtype.
Stages = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]]


def add_routed(out: torch.Tensor, z: torch.Tensor, delta_fn: DeltaFn, route: Optional[Route],
               aux: Optional[torch.Tensor] = None, stages: Optional[Stages] = None) -> torch.Tensor:
    """out (..., d_out) plus the route-weighted expert output delta_fn(z), z (..., d_in).

    aux (..., d_aux), when given, is gathered with z row for row and passed as `delta_fn(..., aux=rows)`
    (DoRA's delta needs the frozen projection of the same tokens).

    Dense route: every token runs the expert. Sparse route (`route.index`): only the selected
    tokens run it and are scatter-added back (an empty selection still runs, with zero rows, so the
    expert's parameters stay in the autograd graph). An expert given as `stages` (plain LoRA, the
    single parallel adapter) runs its rank-sized first stage on every token, one skinny matmul that
    reads z once, and the rest (the output-sized stage and the scatter) on the selected rows only;
    gathering the (n, in) rows of z instead would cost a copy forward, and backward a zero-filled
    (tokens, in) gradient per site, more than the k-wide stage it saves. Others gather the rows of z.

    `out` must be a fresh result that no autograd node saved (a projection's output): it is updated
    in place, which saves a copy of the activation (and CPU's out-of-place `index_add` is a slow
    scatter); autograd's version check would raise, not mis-compute, if that were ever violated.
    """
    d_out = out.shape[-1]
    if route is not None and route.index is not None and stages is not None:
        down, up = stages
        h = down(z.reshape(-1, z.shape[-1])).index_select(0, route.index)  # (n, k) of the selected tokens
        out.view(-1, d_out).index_add_(0, route.index, as_dtype(up(h, route.weight), out.dtype))
        return out
    if route is not None and route.index is not None:
        rows = z.reshape(-1, z.shape[-1]).index_select(0, route.index)  # (n, d_in)
        extra = {} if aux is None else {"aux": aux.reshape(-1, aux.shape[-1]).index_select(0, route.index)}
        delta = delta_fn(rows, None, route.weight, **extra)  # (n, d_out)
        out.view(-1, d_out).index_add_(0, route.index, as_dtype(delta, out.dtype))
        return out
    weight = row_mask = None
    if route is not None:
        weight, row_mask = route.weight, route.token_mask
    extra = {} if aux is None else {"aux": aux}
    return out.add_(as_dtype(delta_fn(z, row_mask, weight, **extra), out.dtype))


def _uniform_(t: torch.Tensor, bound: float) -> None:
    with torch.no_grad():
        t.uniform_(-bound, bound)


class LoRALinear(nn.Module):
    """Replaces a frozen `nn.Linear`, keeping its `weight` (the same tensor, under the same key).

    mixture 'lora': `lora_A (r, in)`, `lora_B (out, r)`; adds `B A z * alpha / r`.
    mixture 'molora': `lora_A (E, r, in)`, `lora_B (E, out, r)`, `router` (Linear(in, E); a bias only
        for --expert_router topk/adamole);
        adds `sum_e p_e B_e A_e z * alpha / r`.
    mixture 'hydra': one `lora_A (r, in)`, `lora_B (E, out, r)`, `router`; adds `sum_e p_e B_e A z * alpha / r`.
    Init: A Kaiming-uniform (bound 1/sqrt(in), as nn.Linear's default), B zero.
    `--use_rslora True`: alpha / sqrt(r) in place of alpha / r (`cfg.lora_scale`).

    `--lora_variant dora` (mixture 'lora' only): also `lora_magnitude (out,)`, initialised to the row
    norms of W, and the site computes `g * (W + s B A) z` with `g = m / ||W + s B A||` per output row,
    the norm detached (as the DoRA paper and PEFT). Written as a delta to the frozen projection,
    `(g - 1) * W z + g * s B A z`, so a type router weighs it like any other expert (weight 1 = PEFT's
    DoRA). In eval mode without autograd, g is cached until A, B or m change (decode steps reuse it).

    `--lora_init pissa` (PiSSA; mixture 'lora' only): A and B start at `A0 = sqrt(S_r / s) V_r^T`,
    `B0 = U_r sqrt(S_r / s)` from the top-r singular triplets of W, kept as buffers `pissa_A0`,
    `pissa_B0`, and the site adds `s (B A - B0 A0) z`: the model starts as the base and trains
    against the residual `W - s B0 A0`, as in PiSSA, while W itself stays untouched. The delta is a
    plain LoRA of rank 2r (`[B, -B0] [A; A0]`), which is what its adapter files hold.
    """

    def __init__(self, base: nn.Linear, cfg: MoAConfig, mixture: str = "lora", dtype: torch.dtype = torch.float32,
                 slot: Optional[str] = None):
        super().__init__()
        self.slot = slot  # e.g. "lora.wq": the name its block's type router uses
        if mixture not in ("lora", "molora", "hydra"):
            raise ValueError(f"LoRALinear: mixture must be 'lora', 'molora' or 'hydra', got {mixture!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # frozen, shared (not copied)
        self.bias = base.bias
        self.mixture = mixture
        self.rank = cfg.lora_rank
        self.scale = cfg.lora_scale
        self.dora = cfg.lora_variant == "dora"
        if self.dora and mixture != "lora":
            raise ValueError(f"LoRALinear: --lora_variant dora needs a plain LoRA site, got mixture {mixture!r}")
        self.n_experts = 1 if mixture == "lora" else cfg.expert_num
        kw = dict(device=base.weight.device, dtype=dtype)
        e, r = self.n_experts, self.rank
        a_shape = (e, r, self.in_features) if mixture == "molora" else (r, self.in_features)
        b_shape = (self.out_features, r) if mixture == "lora" else (e, self.out_features, r)
        self.lora_A = nn.Parameter(torch.empty(a_shape, **kw))
        self.lora_B = nn.Parameter(torch.empty(b_shape, **kw))
        self.router = None if mixture == "lora" else ExpertRouter(self.in_features, e, cfg, False, **kw)
        self.lora_magnitude = nn.Parameter(torch.empty(self.out_features, **kw)) if self.dora else None
        self.pissa_niter = pissa_iterations(cfg.lora_init)
        if self.pissa_niter is not None:
            if mixture != "lora":
                raise ValueError(f"LoRALinear: --lora_init {cfg.lora_init} needs a plain LoRA site, got {mixture!r}")
            self.register_buffer("pissa_A0", torch.zeros(a_shape, **kw), persistent=False)
            self.register_buffer("pissa_B0", torch.zeros(b_shape, **kw), persistent=False)
        self._dora_cache: Optional[tuple[tuple, torch.Tensor]] = None
        self.reset_lora_parameters()

    def adapter_params(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of the trainable tensors: LoRA factors and router, never the frozen weight."""
        return ((n, p) for n, p in self.named_parameters() if n not in ("weight", "bias"))

    def adapter_buffers(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of the fixed tensors an adapter file or checkpoint must carry (PiSSA's start)."""
        return (((n, getattr(self, n)) for n in ("pissa_A0", "pissa_B0")) if self.pissa_niter is not None
                else iter(()))

    def reset_lora_parameters(self) -> None:
        """Re-initialise the adapter tensors only (never the frozen weight)."""
        _uniform_(self.lora_A, 1.0 / math.sqrt(self.in_features))
        nn.init.zeros_(self.lora_B)
        if self.pissa_niter is not None and not self.weight.is_meta:
            with torch.no_grad():
                a0, b0 = pissa_factors(self.weight, self.rank, self.scale, self.pissa_niter)
                for t, v in ((self.lora_A, a0), (self.lora_B, b0), (self.pissa_A0, a0), (self.pissa_B0, b0)):
                    t.copy_(v)
        if self.router is not None:
            self.router.reset_parameters()
        if self.lora_magnitude is not None:
            with torch.no_grad():
                self.lora_magnitude.copy_(self.weight.float().norm(dim=1))  # B = 0: ||W + s B A|| = ||W||

    def lora_weight(self) -> torch.Tensor:
        """dW = s B A, (out, in) fp32 (a plain LoRA site); with PiSSA s (B A - B0 A0)."""
        return (self._factor_b().float() @ self._factor_a().float()) * self.scale

    def _factor_a(self) -> torch.Tensor:
        """A of the site's delta: the trained one, or with PiSSA `[A; A0]` (rank 2r)."""
        return self.lora_A if self.pissa_niter is None else torch.cat([self.lora_A, self.pissa_A0])

    def _factor_b(self) -> torch.Tensor:
        """B of the site's delta: the trained one, or with PiSSA `[B, -B0]` (rank 2r)."""
        return self.lora_B if self.pissa_niter is None else torch.cat([self.lora_B, -self.pissa_B0], dim=1)

    def _coef(self, weight: Optional[torch.Tensor]) -> Optional[torch.Tensor | float]:
        """What multiplies the rank-r intermediate: the route weight times the LoRA scale (None: 1)."""
        return weight if self.scale == 1 else (self.scale if weight is None else weight * self.scale)

    def dora_gain(self) -> torch.Tensor:
        """g = m / ||W + s B A|| per output row, (out,) in the adapter dtype; the norm carries no gradient."""
        key = (self.lora_A._version, self.lora_B._version, self.lora_magnitude._version, self.weight._version,
               self.lora_A.data_ptr(), self.lora_B.data_ptr(), self.lora_magnitude.data_ptr())
        cacheable = not self.training and not torch.is_grad_enabled()
        if cacheable and self._dora_cache is not None and self._dora_cache[0] == key:
            return self._dora_cache[1]
        with torch.no_grad():
            norm = (self.weight.float() + self.lora_weight()).norm(dim=1).to(self.lora_magnitude.dtype)
        gain = self.lora_magnitude / norm
        self._dora_cache = (key, gain) if cacheable else None
        return gain

    def merged_weight(self) -> torch.Tensor:
        """The site's weight with its LoRA folded in, (out, in) fp32: W + s B A, or with DoRA
        g * (W + s B A) (row-scaled)."""
        w = self.weight.float() + self.lora_weight()
        return w * (self.lora_magnitude.float() / w.norm(dim=1))[:, None] if self.dora else w

    def _dora_delta(self, z: torch.Tensor, row_mask: Optional[torch.Tensor] = None,
                    weight: Optional[torch.Tensor] = None, aux: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z (..., in), aux = W z (..., out) -> (g - 1) * W z + g * s B A z (..., out) in z's dtype, times
        weight (..., 1) if given."""
        gain = self.dora_gain()  # fp32: g - 1 is small, so it is formed before any cast
        out = as_dtype(gain - 1, z.dtype) * aux + as_dtype(gain, z.dtype) * self.delta(z)  # delta(z) = s B A z
        return out if weight is None else out * as_dtype(weight, out.dtype)

    def delta(self, z: torch.Tensor, row_mask: Optional[torch.Tensor] = None,
              weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z (..., in) -> LoRA output (..., out) in z's dtype, times weight (..., 1) if given.
        row_mask (...) bool marks the real tokens for the expert router (MoLoRA/HydraLoRA)."""
        if self.mixture == "lora":
            return self._lora_up(self._lora_down(z), weight)
        dt = z.dtype
        coef = self._coef(None if weight is None else as_dtype(weight, dt))
        lead = z.shape[:-1]
        z = z.reshape(-1, self.in_features)  # (n, in)
        p = self.router(z, None if row_mask is None else row_mask.reshape(-1))  # (n, E)
        if coef is not None:
            p = p * (coef.expand(*lead, 1).reshape(-1, 1) if torch.is_tensor(coef) else coef)
        if self.mixture == "hydra":
            h = adapter_linear(z, as_dtype(self.lora_A, dt))[:, None, :]  # (n, 1, r), shared A
        else:
            h = F.linear(z, as_dtype(self.lora_A.flatten(0, 1), dt)).unflatten(-1, (self.n_experts, self.rank))
        return torch.einsum("ner,eor->no", h * p[..., None], as_dtype(self.lora_B, dt)).view(*lead, self.out_features)

    def _lora_down(self, z: torch.Tensor) -> torch.Tensor:
        """Plain LoRA's first stage: z (..., in) -> A z (..., r) in z's dtype."""
        return adapter_linear(z, as_dtype(self._factor_a(), z.dtype))

    def _lora_up(self, h: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
        """Plain LoRA's second stage: h = A z (..., r) -> s B (h * weight) (..., out) in h's dtype.
        The rank-r intermediate is weighted, not the (..., out) result: r << out."""
        coef = self._coef(None if weight is None else as_dtype(weight, h.dtype))
        return adapter_linear(h if coef is None else h * coef, as_dtype(self._factor_b(), h.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) in the base dtype -> (..., out): frozen projection plus the routed LoRA."""
        if not self.dora:
            stages = (self._lora_down, self._lora_up) if self.mixture == "lora" else None
            return add_routed(F.linear(x, self.weight, self.bias), x, self.delta, current_route(self.slot),
                              stages=stages)
        base = F.linear(x, self.weight)  # W z, no bias: DoRA rescales the weight's rows only
        out = base + self.bias if self.bias is not None else base.clone()  # base is saved for the delta's backward
        return add_routed(out, x, self._dora_delta, current_route(self.slot), aux=base)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, mixture={self.mixture}, rank={self.rank}, "
                f"experts={self.n_experts}, scale={self.scale}" + (", dora" if self.dora else ""))


def pissa_factors(weight: torch.Tensor, rank: int, scale: float, niter: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's start for a frozen weight (out, in): `A0 = sqrt(S_r / s) V_r^T` (r, in) and
    `B0 = U_r sqrt(S_r / s)` (out, r), fp32, so that `s B0 A0` is W's best rank-r approximation.
    niter 0: exact SVD; N >= 1: `torch.svd_lowrank` with N subspace iterations (randomised)."""
    w = weight.float()
    if niter == 0:
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        u, sv, vh = u[:, :rank], sv[:rank], vh[:rank]
    else:
        u, sv, v = torch.svd_lowrank(w, q=rank, niter=niter)
        vh = v.t()
    root = (sv / scale).sqrt()
    return root[:, None] * vh, u * root


class ParallelAdapter(nn.Module):
    """`up(SiLU(down(u)))` added to the FFN output, u = ffn_norm(h) (docs/method.md).

    E = 1: `down (size, dim)`, `down_bias (size,)`, `up (dim, size)`, `up_bias (dim,)`.
    E > 1: `up (E, dim, size)`, `up_bias (E, dim)`, `router` (Linear(dim, E) with bias); `down`
    shared (`--p_adapter_hydra True`) or stacked `(E, size, dim)`, `(E, size)`.
    Init: weights Xavier-uniform with gain 1e-4 (per expert), biases zero.
    """

    def __init__(self, dim: int, cfg: MoAConfig, device: torch.device, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dim, self.size, self.n_experts = dim, cfg.p_adapter_size, cfg.expert_num
        e, s = self.n_experts, self.size
        self.shared_down = e == 1 or cfg.p_adapter_hydra
        kw = dict(device=device, dtype=dtype)
        self.down = nn.Parameter(torch.empty((s, dim) if self.shared_down else (e, s, dim), **kw))
        self.down_bias = nn.Parameter(torch.empty((s,) if self.shared_down else (e, s), **kw))
        self.up = nn.Parameter(torch.empty((dim, s) if e == 1 else (e, dim, s), **kw))
        self.up_bias = nn.Parameter(torch.empty((dim,) if e == 1 else (e, dim), **kw))
        self.router = ExpertRouter(dim, e, cfg, True, **kw) if e > 1 else None
        self.slot = P_ADAPTER_SLOT
        self.reset_parameters()

    def adapter_params(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.named_parameters()

    def reset_parameters(self) -> None:
        xavier = 1e-4 * math.sqrt(6.0 / (self.dim + self.size))  # same fans for down and up
        _uniform_(self.down, xavier)
        _uniform_(self.up, xavier)
        nn.init.zeros_(self.down_bias)
        nn.init.zeros_(self.up_bias)
        if self.router is not None:
            self.router.reset_parameters()

    def stages(self) -> Optional[Stages]:
        """(down, up) for `add_routed` when the adapter is a single one (E = 1), else None."""
        return (self.down_stage, self.up_stage) if self.n_experts == 1 else None

    def down_stage(self, u: torch.Tensor) -> torch.Tensor:
        """E = 1: u (..., dim) -> SiLU(down u + down_bias) (..., size) in u's dtype."""
        return F.silu(adapter_linear(u, as_dtype(self.down, u.dtype), as_dtype(self.down_bias, u.dtype)))

    def up_stage(self, h: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
        """E = 1: h (..., size) -> (up h + up_bias) * weight (..., dim) in h's dtype."""
        dt = h.dtype
        up, up_bias = as_dtype(self.up, dt), as_dtype(self.up_bias, dt)
        if weight is None:
            return adapter_linear(h, up, up_bias)
        w = as_dtype(weight, dt)
        if not torch.is_grad_enabled():
            return adapter_linear(h, up, up_bias) * w  # two ops: the least dispatch for a decode step
        # Training weighs the (..., size) activation, which backward then keeps (not a (..., dim)
        # one), and folds the bias into the same matmul: [h w, w] @ [up, up_bias]^T.
        return adapter_linear(torch.cat([h * w, w.expand_as(h[..., :1])], -1), torch.cat([up, up_bias[:, None]], 1))

    def delta(self, u: torch.Tensor, row_mask: Optional[torch.Tensor] = None,
              weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """u (..., dim) -> adapter output (..., dim) in u's dtype, times weight (..., 1) if given."""
        dt = u.dtype
        if self.n_experts == 1:
            return self.up_stage(self.down_stage(u), weight)
        w = None if weight is None else as_dtype(weight, dt)
        up, up_bias = as_dtype(self.up, dt), as_dtype(self.up_bias, dt)
        lead = u.shape[:-1]
        z = u.reshape(-1, self.dim)  # (n, dim)
        p = self.router(z, None if row_mask is None else row_mask.reshape(-1))  # (n, E)
        if w is not None:
            p = p * w.expand(*lead, 1).reshape(-1, 1)
        if self.shared_down:
            h = F.silu(adapter_linear(z, as_dtype(self.down, dt), as_dtype(self.down_bias, dt)))[:, None, :]  # (n, 1, size)
        else:
            h = F.silu(torch.einsum("nd,esd->nes", z, as_dtype(self.down, dt)) + as_dtype(self.down_bias, dt))
        return (torch.einsum("nes,eds->nd", h * p[..., None], up) + p @ up_bias).view(*lead, self.dim)


class PromptExpert(nn.Module):
    """`prompt_len` learned vectors per layer, read through the frozen wk, wv (no RoPE) as extra
    keys/values; the RoPE'd query attends to them with a softmax over the prompt positions only,
    times a per-head `gate (1, n_heads, 1, 1)` (zero init). E > 1: `vectors (E, L, dim)` and the
    per-token mixture `router` (Linear(dim, E) with bias, on the attention-normed x): one softmax
    jointly over all E*L positions, `a_{e,l}`, then `sum_e r_e sum_l a_{e,l} v_{e,l}`.
    Init: vectors N(0, 1) (an embedding's default, the scale of a normed activation); gate zero.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, cfg: MoAConfig, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dim, self.n_heads, self.n_kv_heads = dim, n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.n_experts, self.prompt_len = cfg.expert_num, cfg.prompt_len
        kw = dict(device=device, dtype=dtype)
        shape = (cfg.prompt_len, dim) if self.n_experts == 1 else (self.n_experts, cfg.prompt_len, dim)
        self.vectors = nn.Parameter(torch.empty(shape, **kw))
        self.gate = nn.Parameter(torch.empty(1, n_heads, 1, 1, **kw))
        self.router = ExpertRouter(dim, self.n_experts, cfg, True, **kw) if self.n_experts > 1 else None
        self.slot = PROMPT_SLOT
        self.reset_parameters()

    def adapter_params(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.named_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.vectors.normal_()
        nn.init.zeros_(self.gate)
        if self.router is not None:
            self.router.reset_parameters()

    def prompt_kv(self, wk: nn.Module, wv: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt vectors through the frozen wk, wv -> keys (H, hd, E*L), already divided by sqrt(hd)
        and transposed for `q @ keys`, and gated values (H, E*L, hd), in the base dtype.

        Query head h reads kv head h // (H / KV), as the attention's GQA; the per-head gate multiplies
        the values (the same as gating that head's output, and nothing left to do at decode steps)."""
        e, plen, kv, heads = self.n_experts, self.prompt_len, self.n_kv_heads, self.n_heads
        hd = wk.weight.shape[0] // kv  # the attention's head width
        prompts = self.vectors.reshape(e * plen, self.dim).to(wk.weight.dtype)
        # The frozen projections only (a LoRA on wk/wv does not apply to the prompt).
        k = F.linear(prompts, wk.weight, wk.bias).view(e * plen, kv, hd).repeat_interleave(heads // kv, dim=1)
        v = F.linear(prompts, wv.weight, wv.bias).view(e * plen, kv, hd).repeat_interleave(heads // kv, dim=1)
        return k.permute(1, 2, 0) / math.sqrt(hd), v.transpose(0, 1) * as_dtype(self.gate[0], v.dtype)

    def _cached_prompt_kv(self, wk: nn.Module, wv: nn.Module, cache: Optional[dict[str, torch.Tensor]],
                          continues: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """`prompt_kv`, computed at prefill (the chunk at start_pos 0) and kept in the KV cache's `extra` for the
        decode steps of that generation (the adapters do not change within one)."""
        if cache is None:
            return self.prompt_kv(wk, wv)
        if continues and "prompt_k" in cache:
            return cache["prompt_k"], cache["prompt_v"]
        k, v = self.prompt_kv(wk, wv)
        cache["prompt_k"], cache["prompt_v"] = k.detach(), v.detach()
        return k, v

    def forward(self, x: torch.Tensor, q: torch.Tensor, wk: nn.Module, wv: nn.Module,
                cache: Optional[dict[str, torch.Tensor]] = None, continues: bool = False) -> torch.Tensor:
        """x (B, T, dim) attention input, q (B, H, T, hd) RoPE'd queries -> (B, T, H*hd) in q's dtype,
        already multiplied by the gate and the route weight (add it before `wo`).
        cache: the block's KV cache `extra` during generation (the prompt keys/values kept there)."""
        bsz, n_heads, seqlen, hd = q.shape
        dt = q.dtype
        keys, values = (as_dtype(t, dt) for t in self._cached_prompt_kv(wk, wv, cache, continues))
        route = current_route(self.slot)
        # One softmax jointly over all E*L prompt positions (as the paper's code); plain matmuls, since
        # CPU's flash-attention kernel is slow for so few keys (its backward, ~10x).
        att = (q @ keys).softmax(-1)  # (B, H, T, E*L)
        if self.router is not None:
            # Each set's share is weighed by the prompt router: sum_e r_e sum_l a_{e,l} v_{e,l}.
            row_mask = None if route is None or route.token_mask is None else route.token_mask.reshape(-1)
            p = self.router(x.reshape(-1, self.dim), row_mask).view(bsz, 1, seqlen, self.n_experts, 1)
            att = (att.unflatten(-1, (self.n_experts, self.prompt_len)) * p).flatten(-2)
        out = (att @ values).transpose(1, 2).reshape(bsz, seqlen, n_heads * hd)
        if route is not None and route.weight is not None:
            out = out * as_dtype(route.weight, dt)  # (B, T|1, 1)
        return out
