"""Routers: the per-block type router (soft, sparse, instance, UniPEFT, none) and the expert router of
the homogeneous mixtures (soft, top-k, AdaMoLE), plus the load-balance loss they return.

A block's `BlockRouter` turns the block input into one `Route` per slot (slot names such as
`"lora.wq"`, `"p_adapter"`, `"prompt"`; never a position in a list). A site reads its `Route` when
it runs: a dense weight, or (sparse) the flat indices of the tokens that selected it and their
weights. Padding never reaches a decision: pooled means and selections use the real-token mask.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama.kernels import swiglu
from llama.model import KVCache, is_recomputing
from moa.method.config import PROMPT_SLOT, MoAConfig

# Surrogate slope of the straight-through threshold gradient (--threshold_ste): the mask's
# backward is that of sigmoid((w - t) / STE_TEMPERATURE).
STE_TEMPERATURE = 0.1


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype` (t itself when it already is: no dispatch on the decode path)."""
    return t if t.dtype == dtype else t.to(dtype)


def adapter_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for an adapter's weight (out, in), one side of it rank-sized
    (LoRA factors, routers, the parallel adapter), all in x's dtype.

    Under torch.compile (the captured decode step) it is written as the broadcast product summed over
    `in`: a skinny matmul of a few rows costs its launch, not its arithmetic, and in this form the
    compiler fuses it with the elementwise work around it (the route weight, the add into the frozen
    projection) instead of calling a matmul kernel for it. Eagerly, a matmul."""
    if not torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    out = (x.unsqueeze(-2) * weight).sum(-1)  # (..., 1, in) * (out, in) -> (..., out)
    return out if bias is None else out + bias


def linear(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    """`lin(x)` computed in x's dtype: the (small, fp32 master) router weights are cast, x is not."""
    bias = None if lin.bias is None else as_dtype(lin.bias, x.dtype)
    return adapter_linear(x, as_dtype(lin.weight, x.dtype), bias)


@dataclass
class Route:
    """How one site is gated in one forward.

    weight: None (= 1); dense: broadcastable to (B, T, 1) ((B, 1, 1) per sequence); sparse: (n, 1).
    index: None = dense (every token runs the site); else (n,) int64 indices into the flattened
        B*T tokens that run it (sparse; may be empty).
    token_mask: (B, T) bool real tokens (dense routes), for the expert routers' statistics.
    """

    weight: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None
    token_mask: Optional[torch.Tensor] = None


class _RunningRoutes(threading.local):
    """The routes of the block whose forward is running ({slot: Route}), per thread; set by
    `set_routes` for exactly that forward (activation checkpointing's recomputation re-runs the block
    and sets them again). A thread-local attribute rather than a ContextVar because torch.compile
    traces it, so a captured decode step (`llama.generation`) includes the routing."""

    routes: Optional[dict[str, Route]] = None


_RUNNING = _RunningRoutes()
# The load-balance terms of the model forward that is running (see `collecting_aux_losses`).
_AUX_TERMS: contextvars.ContextVar[Optional[list[torch.Tensor]]] = contextvars.ContextVar("moa_aux", default=None)


def set_routes(routes: Optional[dict[str, Route]]) -> Optional[dict[str, Route]]:
    """Hand `routes` to the sites (None: none); returns the routes they replace, for `set_routes(previous)`.
    A block calls it in a try/finally around its forward (the form torch.compile traces)."""
    previous, _RUNNING.routes = _RUNNING.routes, routes
    return previous


@contextlib.contextmanager
def routing(routes: dict[str, Route]) -> Iterator[None]:
    """Hand `routes` to the sites for the duration of the `with` block (a site run alone, in tests)."""
    previous = set_routes(routes)
    try:
        yield
    finally:
        set_routes(previous)


def current_route(slot: Optional[str]) -> Optional[Route]:
    """The route of `slot` in the running block's forward; None (weight 1) outside any block."""
    routes = _RUNNING.routes
    return None if routes is None else routes.get(slot)


@contextlib.contextmanager
def collecting_aux_losses() -> Iterator[list[torch.Tensor]]:
    """Collect the `lb_loss_coeff * E * sum_i f_i P_i` terms of the forwards run inside the block."""
    terms: list[torch.Tensor] = []
    token = _AUX_TERMS.set(terms)
    try:
        yield terms
    finally:
        _AUX_TERMS.reset(token)


def masked_mean(x: torch.Tensor, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of x (B, T, d) over the real tokens of each row -> (B, d); pads never count."""
    if token_mask is None:
        return x.mean(1)
    m = token_mask.to(x.dtype)[..., None]  # (B, T, 1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class ExpertRouter(nn.Module):
    """Weights (N, E) over the E experts of one homogeneous mixture, from its input z (N, in).

    Logits `l = proj(z)` (`proj` has a bias for `topk` and `adamole`, zero-initialised, and where the
    caller asks for one); with `--noisy_router True` (topk/adamole), in training only,
    `l += N(0, 1) * softplus(noise(z))` (`noise` a trainable Linear(in, E); the draw comes from torch's
    global RNG, so a resume that restores the RNG state draws the same noise). `p = softmax(l)`.
    `soft`: p. `topk`: the top-k entries of p, renormalised. `adamole`: `a = p - tau`,
    `tau = sigmoid(threshold(z)) / E`; the entries with `a >= 0` keep `a`, renormalised.
    With `lb_loss_coeff > 0`, each training forward adds `lb_loss_coeff * E * sum_i f_i P_i` over the
    real rows (pads never count; see `balance_loss`) to the running model forward's terms
    (`collecting_aux_losses`), which `collect_aux_loss` hands out.
    """

    def __init__(self, in_dim: int, n_experts: int, cfg: MoAConfig, bias: bool,
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.n_experts = n_experts
        self.kind = cfg.expert_router
        self.top_k = min(cfg.top_k, n_experts)
        self.lb_loss_coeff = cfg.lb_loss_coeff
        kw = dict(device=device, dtype=dtype)
        self.proj = nn.Linear(in_dim, n_experts, bias=bias or self.kind in ("topk", "adamole"), **kw)
        self.threshold = nn.Linear(in_dim, 1, **kw) if self.kind == "adamole" else None
        self.noise = (nn.Linear(in_dim, n_experts, **kw)
                      if cfg.noisy_router and self.kind in ("topk", "adamole") else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.proj, self.threshold, self.noise):
            if lin is not None:
                lin.reset_parameters()
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    def forward(self, z: torch.Tensor, row_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z (N, in) -> weights (N, E) in z's dtype; row_mask (N,) bool marks real rows (None = all)."""
        logits = linear(z, self.proj)
        if self.noise is not None and self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(linear(z, self.noise))
        p = F.softmax(logits, dim=-1)
        adapted = None
        if self.kind == "topk":
            top, idx = p.topk(self.top_k, dim=-1)
            w = torch.zeros_like(p).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        elif self.kind == "adamole":
            tau = torch.sigmoid(linear(z, self.threshold)) / self.n_experts  # (N, 1), at most 1/E <= max p
            adapted = p - tau
            w = adapted * (adapted >= 0)
            w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        else:
            w = p
        if self.lb_loss_coeff > 0 and torch.is_grad_enabled():
            aux = balance_loss(p, self.kind, self.top_k, row_mask, adapted)
            # Checkpointing's recomputation must save what the forward saved, so it computes the term
            # too, but only the forward's term is handed out.
            terms = _AUX_TERMS.get()
            if terms is not None and not is_recomputing():
                terms.append(self.lb_loss_coeff * aux)
        return w


def balance_loss(p: torch.Tensor, kind: str, top_k: int = 1, row_mask: Optional[torch.Tensor] = None,
                 adapted: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`E * sum_i f_i P_i` over the real rows (row_mask (N,) bool; None = all) of softmax weights p (N, E).

    topk: f_i = (number of (row, slot) top-k selections of expert i) / N (so sum f = k), P_i = mean p_i.
    adamole (`adapted` = p - tau, (N, E)): f_i = share of rows with adapted_i >= 0, P_i = mean adapted_i
    (it can be negative, so the term also trains the threshold layer).
    soft: f_i = share of rows whose largest weight is expert i, P_i = mean p_i.
    f is a count (no gradient); N counts real rows only.
    """
    n_experts = p.shape[-1]
    real = torch.ones_like(p[:, 0]) if row_mask is None else row_mask.to(p.dtype)  # (N,)
    n = real.sum().clamp_min(1.0)
    if kind == "adamole":
        if adapted is None:
            raise ValueError("balance_loss: adamole needs the thresholded weights p - tau")
        chosen, weight = (adapted >= 0).to(p.dtype), adapted
    else:
        k = top_k if kind == "topk" else 1
        chosen, weight = torch.zeros_like(p).scatter(-1, p.topk(k, dim=-1).indices, 1.0), p
    f = (chosen.detach() * real[:, None]).sum(0) / n  # (E,)
    mean_w = (weight * real[:, None]).sum(0) / n  # (E,)
    return n_experts * (f * mean_w).sum()


def collect_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of `lb_loss_coeff * E * sum_i f_i P_i` over every mixture site of the model's last training
    forward: a scalar (0 when `lb_loss_coeff` is 0 or there is no mixture) to add to the loss. Each
    forward's total is handed out once (collecting clears it)."""
    total = getattr(model, "aux_loss", None)
    if total is not None:
        model.aux_loss = None
        return total
    param = next(model.parameters(), None)
    return torch.zeros((), device=None if param is None else param.device)


def slot_group(slot: str) -> str:
    """UniPEFT gate group of a slot: 'lora' for every LoRA site, else the slot itself."""
    return slot.split(".")[0]


class BlockRouter(nn.Module):
    """One block's type router (`--type_router`) over that block's slots.

    soft/sparse/instance: `w = sigmoid(proj(x))` (`--swi_x 0`) or `sigmoid(w2(SiLU(w1 x) * w3 x))`
    with hidden width `swi_x * n_types` (biases zero-initialised). sparse adds the threshold
    `t = sigmoid(threshold(x)) * max_threshold` (or the constant `max_threshold`); a token runs a
    type iff `w >= t` (as the paper's code, torch.ge: `t = 0` keeps every type, `t = 1` only a
    saturated weight), keeping its weight `w`. instance: the router reads the mean of x over each row's real tokens. unipeft:
    three per-sequence gates `sigmoid(Linear(dim, 1)(mean x))` named 'lora', 'prompt', 'p_adapter'.
    none: every site at weight 1.
    """

    def __init__(self, layer_id: int, dim: int, slots: tuple[str, ...], cfg: MoAConfig,
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.layer_id = layer_id
        self.slots = slots
        self.col = {slot: j for j, slot in enumerate(slots)}  # slot name -> router output column
        self.mode = cfg.type_router
        self.max_threshold = cfg.max_threshold
        self.threshold_ste = cfg.threshold_ste
        self.dtype = dtype
        n = len(slots)
        kw = dict(device=device, dtype=dtype)
        if self.mode in ("soft", "sparse", "instance"):
            if cfg.swi_x == 0:
                self.proj = nn.Linear(dim, n, **kw)
            else:
                self.w1 = nn.Linear(dim, cfg.swi_x * n, **kw)
                self.w3 = nn.Linear(dim, cfg.swi_x * n, **kw)
                self.w2 = nn.Linear(cfg.swi_x * n, n, **kw)
        self.threshold = (nn.Linear(dim, 1, **kw) if self.mode == "sparse" and not cfg.const_threshold else None)
        self.gates = (nn.ModuleDict({g: nn.Linear(dim, 1, **kw) for g in dict.fromkeys(map(slot_group, slots))})
                      if self.mode == "unipeft" else None)
        self.stats = None  # a RouterStats collecting while its `with` block runs
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
                nn.init.zeros_(module.bias)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> logits (..., n) in x's dtype."""
        if hasattr(self, "proj"):
            return linear(x, self.proj)
        return linear(swiglu(linear(x, self.w1), linear(x, self.w3)), self.w2)

    def adapter_params(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.named_parameters()

    def _sequence_weights(self, x: torch.Tensor, token_mask: Optional[torch.Tensor], continues: bool,
                          cache: Optional[KVCache]) -> torch.Tensor:
        """(B, n) per-sequence weights; for a chunk that continues the KV cache (`continues`: decode
        steps) the ones stored beside the cache at prefill (they live as long as that cache)."""
        bsz = x.shape[0]
        if continues:
            stored = None if cache is None else cache.extra.get("type_router_weights")
            if stored is None or stored.shape[0] < bsz:
                raise ValueError(f"--type_router {self.mode}: a chunk after the start of the KV cache needs the "
                                 "whole prompt run first in one chunk at start_pos 0 with a KV cache")
            return stored[:bsz]
        pooled = masked_mean(x, token_mask)  # (B, dim)
        if self.mode == "unipeft":
            gate = {g: torch.sigmoid(lin(pooled)) for g, lin in self.gates.items()}  # each (B, 1)
            w = torch.cat([gate[slot_group(s)] for s in self.slots], dim=-1)
        else:
            w = torch.sigmoid(self._logits(pooled))
        if cache is not None:
            cache.extra["type_router_weights"] = w.detach()
        return w

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor], continues: bool = False,
                cache: Optional[KVCache] = None) -> dict[str, Route]:
        """Block input x (B, T, dim), token_mask (B, T) bool or None -> {slot: Route}.

        continues: x follows tokens already in the KV cache (`ForwardMeta.continues`: decode steps).
        cache: the block's KV cache during generation (instance/unipeft keep the prefill weights there).
        """
        if self.mode == "none":
            self._record(None, None, token_mask, x)
            return {slot: Route(None, None, token_mask) for slot in self.slots}
        if self.mode in ("instance", "unipeft"):
            # Pooled in the adapter dtype (a mean over many tokens), once per sequence.
            w = self._sequence_weights(x.to(self.dtype), token_mask, continues, cache)[:, None, :]  # (B, 1, n)
            self._record(w, None, token_mask, x)
            return self._dense_routes(w, token_mask)
        w = torch.sigmoid(self._logits(x))  # (B, T, n), in x's dtype
        if self.mode == "soft":
            self._record(w, None, token_mask, x)
            return self._dense_routes(w, token_mask)
        return self._sparse_routes(x, w, token_mask, dense=continues and x.shape[1] == 1)

    def _dense_routes(self, w: torch.Tensor, token_mask: Optional[torch.Tensor]) -> dict[str, Route]:
        """One dense Route per slot from the weights w (B, T|1, n): column j is slot j's (B, T|1, 1)."""
        return {slot: Route(col, None, token_mask) for slot, col in zip(self.slots, w.split(1, dim=-1))}

    def _sparse_routes(self, x: torch.Tensor, w: torch.Tensor, token_mask: Optional[torch.Tensor],
                       dense: bool = False) -> dict[str, Route]:
        """Sparse MoA routes: kept (token, type) pairs run with weight w, the others not at all.

        dense: a one-token decode step, where gathering the few kept tokens costs more than running
        every type with weight 0 on the skipped ones (the same sums: w * 0 adds exactly 0) and the
        selection sizes would need a host sync per step; every route is then dense and masked."""
        n = w.shape[-1]
        if self.threshold is None:
            t = torch.full_like(w[..., :1], self.max_threshold)
        else:
            t = torch.sigmoid(linear(x, self.threshold)) * self.max_threshold  # (B, T, 1)
        keep = w >= t  # (B, T, n); ties kept, as the paper's code (torch.ge)
        if token_mask is not None:
            keep = keep & token_mask[..., None]
        g = w * keep
        if self.threshold_ste and self.threshold is not None and torch.is_grad_enabled():
            # Straight-through: forward is the hard mask; backward lets t feel d sigmoid((w - t)/temp),
            # on the kept tokens only (a skipped token ran no expert, so it has no output to differentiate).
            s = torch.sigmoid((w.detach() - t) / STE_TEMPERATURE)
            g = g * (1.0 + s - s.detach())
        self._record(w, keep, token_mask, x)
        if dense:
            return self._dense_routes(g, token_mask)
        routes = {}
        if PROMPT_SLOT in self.col:  # attention to the prompt cannot skip a token: dense, masked weight
            j = self.col[PROMPT_SLOT]
            routes[PROMPT_SLOT] = Route(g[..., j:j + 1], None, token_mask)
        cols = [j for s, j in self.col.items() if s != PROMPT_SLOT]
        if cols:
            keep_t = keep.reshape(-1, n)[:, cols].t()  # (n_skippable, B*T)
            counts = keep_t.sum(1).tolist()  # the only host sync: selection sizes
            pairs = keep_t.nonzero()  # (K, 2) = (column among cols, flat token), grouped by column
            flat_g = g.reshape(-1, n)[:, cols].t()  # (n_skippable, B*T)
            rows = pairs[:, 1].split(counts)
            weights = flat_g[pairs[:, 0], pairs[:, 1]].split(counts)
            for i, j in enumerate(cols):
                routes[self.slots[j]] = Route(weights[i][:, None], rows[i], None)
        return routes

    @torch.no_grad()
    def _record(self, w: Optional[torch.Tensor], keep: Optional[torch.Tensor],
                token_mask: Optional[torch.Tensor], x: torch.Tensor) -> None:
        """Add this forward's sums over real tokens to the attached RouterStats (if any)."""
        if self.stats is None or is_recomputing():
            return
        bsz, seqlen, _ = x.shape
        n = len(self.slots)
        real = (torch.ones(bsz, seqlen, device=x.device) if token_mask is None else token_mask.float())  # (B, T)
        tokens = real.sum()
        weight_sum = (tokens.expand(n) if w is None
                      else (w.float().expand(bsz, seqlen, n) * real[..., None]).sum((0, 1)))
        active_sum = tokens.expand(n) if keep is None else keep.float().sum((0, 1))
        self.stats.record(self.layer_id, self.slots, weight_sum, active_sum, tokens)
