"""Many task LoRAs on one frozen model: an `AdapterBank` of N plain LoRAs, attached once
(`attach_bank`), then every row of a batch runs with its own adapter or its own weighted set of
adapters (top-1 routing, DLP-LoRA's top-p fusion, LoraHub's constant weights) in one pass.

The per-row path is the one multi-LoRA servers use (Punica's BGMV, S-LoRA): each row's A/B slices
are gathered from the stacked bank and applied with batched matmuls (`BankLinear`), so 8 rows on 8
different adapters cost about what 8 rows on one adapter cost, and a row with K active adapters
costs K LoRAs, whatever the bank's size N.

The N adapters may differ in rank, scaling, layers and targets: the bank pads them to a common
layout, exactly (the union of layers and targets, the largest rank; a site or rank row an adapter
lacks is zero), and folds each adapter's `alpha / r` into its B, so the bank's LoRA has scaling 1.

A bank holds plain LoRAs only (fusion weighs their deltas dW = s B A). A registry's other adapters
(Soft MoA, HydraLoRA, ...) are served top-1 beside it by attaching them for their rows
(`moa.tasks.swap`), with the bank `suspend()`ed meanwhile.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from llama.model import Transformer
from moa.files.adapters import ADAPTER_PARAMS, adapter_file, read_adapter_params
from moa.lora.algebra import indices_to_spans, lora_sites, read_plain_lora
from moa.method.config import LORA_TARGETS, MoAConfig, parse_spans
from moa.method.inject import MoATransformer


@dataclass
class AdapterBank:
    """N plain LoRAs in one layout. `tasks[i]` names adapter i; `cfg`: the common plain-LoRA config
    (union of layers and targets, `lora_rank` = the largest rank, `lora_alpha` = that rank: scaling
    1); `lora_A[site]` (N, r, in) and `lora_B[site]` (N, out, r) fp32, adapter i's own `alpha_i / r_i`
    folded into its B, zeros where it has no such site or rank row."""

    tasks: list[str]
    cfg: MoAConfig
    lora_A: dict[str, torch.Tensor]
    lora_B: dict[str, torch.Tensor]
    sources: list[str] = field(default_factory=list)  # the adapter files (load_bank), for error messages
    max_seq_len: Optional[int] = None  # the smallest training max_seq_len of its adapters (None: none known)
    # DoRA adapters (top-1 routing only): site -> (N, out) magnitudes, NaN for an adapter without DoRA
    # there; empty when no adapter is DoRA.
    lora_magnitude: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.tasks)

    @property
    def dora_tasks(self) -> list[str]:
        """The tasks whose adapter is DoRA at some site."""
        return [t for i, t in enumerate(self.tasks) if any(not m[i].isnan().all() for m in self.lora_magnitude.values())]


def build_bank(tasks: Sequence[str], adapters: Sequence[tuple[MoAConfig, dict[str, torch.Tensor]]]) -> AdapterBank:
    """Stack plain LoRAs (`(cfg, state)` each, as `moa.lora.algebra.read_plain_lora` returns) into a bank."""
    if len(tasks) != len(adapters) or not adapters:
        raise ValueError(f"build_bank: {len(tasks)} task names for {len(adapters)} adapters (need one each, >= 1)")
    layers = sorted({i for cfg, _ in adapters for s, e in parse_spans("lora_layers", cfg.lora_layers)
                     for i in range(s, e)})
    targets = [t for t in LORA_TARGETS if any(t in cfg.target_list for cfg, _ in adapters)]
    rank = max(cfg.lora_rank for cfg, _ in adapters)
    cfg = MoAConfig(lora_layers=indices_to_spans(layers), lora_targets=",".join(targets), lora_rank=rank,
                    lora_alpha=float(rank), type_router="none")
    lora_A, lora_B, magnitude = {}, {}, {}
    any_dora = any(c.lora_variant == "dora" for c, _ in adapters)
    for site in lora_sites(cfg):
        a_list, b_list, m_list = [], [], []
        # (out, in) of this projection; every layer has the same, and some adapter has this target.
        proj = site.split(".", 2)[2]  # e.g. attention.wq
        shape = next((state[k.replace("lora_A", "lora_B")].shape[0], state[k].shape[1])
                     for _, state in adapters for k in state if k.endswith(f".{proj}.lora_A"))
        for c, state in adapters:
            a = torch.zeros(rank, shape[1])
            b = torch.zeros(shape[0], rank)
            m_list.append(state[f"{site}.lora_magnitude"].float() if f"{site}.lora_magnitude" in state
                          else torch.full((shape[0],), float("nan")))
            if f"{site}.lora_A" in state:
                a_i, b_i = state[f"{site}.lora_A"].float(), state[f"{site}.lora_B"].float()
                if (b_i.shape[0], a_i.shape[1]) != tuple(shape):
                    raise ValueError(f"{site}: adapters disagree on its shape ({tuple(shape)} vs "
                                     f"{(b_i.shape[0], a_i.shape[1])}): they were trained on different bases")
                a[: c.lora_rank] = a_i
                b[:, : c.lora_rank] = b_i * c.lora_scale
            a_list.append(a)
            b_list.append(b)
        lora_A[site], lora_B[site] = torch.stack(a_list), torch.stack(b_list)  # (N, r, in), (N, out, r)
        if any_dora:
            magnitude[site] = torch.stack(m_list)  # (N, out)
    return AdapterBank(list(tasks), cfg, lora_A, lora_B, lora_magnitude=magnitude)


def load_bank(tasks: Sequence[str], paths: Sequence[str | os.PathLike], dora_ok: bool = False) -> AdapterBank:
    """Read plain LoRA files (adapter.pth or its folder, adapter_params.json beside it) into a bank;
    the bank runs at the smallest training `max_seq_len` its adapter_params.json files record.
    DoRA adapters only with `dora_ok` (a bank for top-1 routing)."""
    bank = build_bank(tasks, [read_plain_lora(p, dora_ok) for p in paths])
    bank.sources = [str(adapter_file(p)) for p in paths]
    lengths = [n for n in (read_adapter_params(adapter_file(p).parent / ADAPTER_PARAMS)[1] for p in paths)
               if n is not None]
    bank.max_seq_len = min(lengths) if lengths else None
    return bank


@dataclass
class RowAdapters:
    """Which bank adapters each row of a batch runs with, in sparse form: `index` (B, K) int64 into
    the bank and `weight` (B, K) fp32; K is the most adapters any row uses, and a row with fewer
    repeats an index with weight 0 (exact: it adds 0)."""

    index: torch.Tensor
    weight: torch.Tensor
    compose: bool = False  # True: one LoRA (sum_k w_k B_k)(sum_k w_k A_k) per row (LoraHub's A/B averaging)

    @classmethod
    def from_weights(cls, weights: torch.Tensor, compose: bool = False) -> "RowAdapters":
        """Dense per-row weights (B, N) -> the rows' non-zero entries (K = max non-zeros per row, >= 1).
        One-hot rows (top-1 routing) give K = 1; top-p rows give K = the largest kept set."""
        if weights.dim() != 2:
            raise ValueError(f"row weights: expected (B, N), got {tuple(weights.shape)}")
        k = max(int((weights != 0).sum(-1).max()), 1)
        # Non-zero entries first (a stable sort keeps the bank's order among them).
        index = torch.argsort((weights == 0).to(torch.int8), dim=-1, stable=True)[:, :k]
        return cls(index, weights.gather(-1, index).float(), compose)


# The row adapters of the forwards running inside `AttachedBank.rows` (one batch's prefill and decode).
_ROWS: contextvars.ContextVar[Optional[RowAdapters]] = contextvars.ContextVar("moa_bank_rows", default=None)


class BankLinear(nn.Module):
    """A frozen `nn.Linear` plus, for each row b of the batch, `sum_k w_bk B_(i_bk) A_(i_bk) x` over
    the adapters (i_bk, w_bk) that `AttachedBank.rows` gave that row: the per-row ("BGMV") path of
    multi-LoRA servers (Punica, S-LoRA), in plain PyTorch. Each forward gathers the rows' A/B slices
    (B, K*r, in) and (B, out, K*r) and applies them with two batched matmuls, so a batch in which
    every row has its own adapter costs one pass, whatever the bank's size N. Outside `rows` (no
    adapters given) it is the base projection alone.

    `lora_A` (N, r, in), `lora_B` (N, out, r): the bank's stacked factors (scaling folded into B),
    buffers, so the model's state_dict does not change. `lora_magnitude` (N, out), with DoRA adapters
    in the bank (NaN rows: not DoRA): each one's gain g_i = m_i / ||W + B_i A_i|| per output row is
    computed once here, and a row on adapter i adds `(g_i - 1) W x + g_i B_i A_i x` (g = 1 for the
    others); such a bank takes one adapter per row (top-1), since DoRA outputs do not mix linearly.
    """

    def __init__(self, base: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 lora_magnitude: Optional[torch.Tensor] = None):
        super().__init__()
        self.base = base
        device = base.weight.device
        self.register_buffer("lora_A", lora_A.to(device), persistent=False)
        self.register_buffer("lora_B", lora_B.to(device), persistent=False)
        gain = None
        if lora_magnitude is not None:
            with torch.no_grad():
                w = base.weight.float()
                norms = torch.stack([(w + lora_B[i].float().to(device) @ lora_A[i].float().to(device)).norm(dim=1)
                                     for i in range(lora_A.shape[0])])  # (N, out)
                m = lora_magnitude.to(device)
                gain = torch.where(m.isnan(), torch.ones_like(norms), m / norms).to(lora_A.dtype)
        self.register_buffer("dora_gain", gain, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, in) in the base dtype -> (B, T, out)."""
        out = self.base(x)
        rows = _ROWS.get()
        if rows is None:
            return out
        bsz, k = rows.index.shape
        if x.shape[0] != bsz:
            raise ValueError(f"bank adapters were given for {bsz} rows, the forward has {x.shape[0]}: "
                             "give them for exactly the batch being run")
        n, r, d_in = self.lora_A.shape
        flat = rows.index.reshape(-1).to(self.lora_A.device)
        w = rows.weight.to(device=self.lora_A.device, dtype=self.lora_A.dtype)  # (B, K)
        if rows.compose:  # one rank-r LoRA per row: A = sum_k w_k A_k (B, r, in), B = sum_k w_k B_k (B, out, r)
            a = torch.einsum("bk,bkri->bri", w, self.lora_A.index_select(0, flat).view(bsz, k, r, d_in))
            b = torch.einsum("bk,bkor->bor", w, self.lora_B.index_select(0, flat).view(bsz, k, -1, r))
            h = torch.bmm(x.reshape(bsz, -1, d_in).to(a.dtype), a.transpose(1, 2))  # (B, T, r)
        else:
            a = self.lora_A.index_select(0, flat).view(bsz, k * r, d_in)  # (B, K r, in)
            b = self.lora_B.index_select(0, flat).view(bsz, k, -1, r).transpose(1, 2).reshape(bsz, -1, k * r)  # (B, out, K r)
            h = torch.bmm(x.reshape(bsz, -1, d_in).to(a.dtype), a.transpose(1, 2)) * w.repeat_interleave(r, 1)[:, None]
        lora = torch.bmm(h, b.transpose(1, 2))  # (B, T, out)
        if self.dora_gain is not None:
            if k > 1 or rows.compose:
                raise ValueError("this bank holds DoRA adapters, whose outputs do not mix linearly: give each "
                                 "row one adapter (top-1 routing), not a weighted set")
            g = self.dora_gain.index_select(0, flat)[:, None, :]  # (B, 1, out)
            wx = out if self.base.bias is None else out - self.base.bias
            lora = g * lora + (g - 1) * w[:, None, :] * wx.reshape(lora.shape).to(lora.dtype)
        return out.add_(lora.view(out.shape).to(out.dtype))


class AttachedBank:
    """A bank attached to one model (`attach_bank`), held by the caller: `rows(weights)` runs the
    forwards inside it with each row's adapters; `detach()` puts the base projections back, so the
    same model can take another bank (or none) later. `suspend()` puts them back for a while (another
    adapter is attached to the model for some rows: `moa.tasks.swap`) and `resume()` returns the bank's
    sites, unchanged."""

    def __init__(self, model: Transformer, bank: AdapterBank, sites: dict[str, BankLinear]):
        self.model, self.bank, self.sites = model, bank, sites
        self.suspended = False

    @property
    def tasks(self) -> list[str]:
        return self.bank.tasks

    @contextlib.contextmanager
    def rows(self, weights: torch.Tensor, compose: bool = False) -> Iterator[RowAdapters]:
        """Run the forwards inside with per-row adapter weights (B, N) (one-hot: top-1 routing; a
        row's top-p set; LoraHub's weights on every row), for the batch of B rows. Each row adds
        `sum_i w_i B_i A_i x`; with `compose`, `(sum_i w_i B_i)(sum_i w_i A_i) x` instead (LoraHub's
        own composition of the factors, in the bank's layout: each B_i carries its alpha_i / r_i)."""
        if not self.sites:
            raise ValueError("this bank was detached from its model (attach it again)")
        if self.suspended:
            raise ValueError("this bank is suspended while another adapter is attached to its model (resume it)")
        if weights.dim() != 2 or weights.shape[1] != self.bank.n:
            raise ValueError(f"bank rows: expected weights (B, {self.bank.n}) for the bank's "
                             f"{self.bank.n} adapters, got {tuple(weights.shape)}")
        selection = RowAdapters.from_weights(weights.detach(), compose)
        token = _ROWS.set(selection)
        try:
            yield selection
        finally:
            _ROWS.reset(token)

    def _put(self, base: bool) -> None:
        """Put the base projections (`base`) or the bank's sites at the bank's sites of the model."""
        for name, site in self.sites.items():
            parent, attr = name.rsplit(".", 1)
            setattr(self.model.get_submodule(parent), attr, site.base if base else site)

    def suspend(self) -> None:
        """Put the base projections back until `resume()` (the model is then the bare base)."""
        if not self.suspended:
            self._put(base=True)
            self.suspended = True

    def resume(self) -> None:
        """Put the bank's sites back after `suspend()` (nothing to do when not suspended)."""
        if self.suspended:
            self._put(base=False)
            self.suspended = False

    def detach(self) -> Transformer:
        """Restore the base projections in place; returns the bare model."""
        self._put(base=True)
        self.sites, self.suspended = {}, False
        return self.model


def _base_linear(model: Transformer, site: str, bank: AdapterBank) -> nn.Linear:
    """The frozen projection at `site`; `ValueError` naming the bank's files when the model has no
    such layer or another shape (the adapters were trained on another base)."""
    files = ", ".join(bank.sources) or "the bank's adapters"
    layer = int(site.split(".")[1])
    if layer >= len(model.layers):
        raise ValueError(f"{files}: adapters for layer {layer}, but the base model has {len(model.layers)} layers "
                         "(they were trained on another base)")
    base = model.get_submodule(site)
    want = (bank.lora_B[site].shape[1], bank.lora_A[site].shape[2])  # (out, in)
    if tuple(base.weight.shape) != want:
        raise ValueError(f"{files}: {site} is {want[0]}x{want[1]} (out x in) in the adapters, "
                         f"{base.weight.shape[0]}x{base.weight.shape[1]} in the base model "
                         "(they were trained on another base)")
    return base


def attach_bank(model: Transformer, bank: AdapterBank) -> AttachedBank:
    """Put a `BankLinear` at every site of the bank in `model` (a model without adapters), in place;
    returns the handle the caller runs it through (`AttachedBank.rows`). The base is frozen
    (`requires_grad_(False)`): a bank only serves, it never trains."""
    if isinstance(model, MoATransformer) or any(isinstance(m, BankLinear) for m in model.modules()):
        raise ValueError("attach_bank: the model already has adapters attached (detach the other bank, or "
                         "load a bare base)")
    model.requires_grad_(False)
    sites = {}
    dtype = model.tok_embeddings.weight.dtype
    for name in lora_sites(bank.cfg):
        parent, attr = name.rsplit(".", 1)
        base = _base_linear(model, name, bank)
        holder = model.get_submodule(parent)
        # Adapter factors in fp32 (as a trained adapter's own dtype), or the base's when it is lower:
        # per-row gathers then read half the bytes.
        factor_dtype = torch.float32 if dtype == torch.float32 else dtype
        sites[name] = BankLinear(base, bank.lora_A[name].to(factor_dtype), bank.lora_B[name].to(factor_dtype),
                                 bank.lora_magnitude.get(name))
        setattr(holder, attr, sites[name])
    return AttachedBank(model, bank, sites)


def bank_loras(bank: AdapterBank) -> list[tuple[MoAConfig, dict[str, torch.Tensor]]]:
    """The bank's adapters as plain LoRAs of its common layout (`bank.cfg`: the union of sites, the
    largest rank, scaling 1): the same deltas as the files, comparable site by site."""
    return [(bank.cfg, {f"{site}.lora_{m}": (bank.lora_A if m == "A" else bank.lora_B)[site][i]
                        for site in bank.lora_A for m in "AB"}) for i in range(bank.n)]


def compose_ab(bank: AdapterBank, weights: Sequence[float]) -> tuple[MoAConfig, dict[str, torch.Tensor]]:
    """LoraHub's composed LoRA in the bank's layout: A = sum_i w_i A_i, B = sum_i w_i B_i (rank r,
    scaling 1), which `AttachedBank.rows(..., compose=True)` computes."""
    w = torch.tensor(list(weights), dtype=torch.float32)
    state = {}
    for site in bank.lora_A:
        state[f"{site}.lora_A"] = torch.einsum("n,nri->ri", w, bank.lora_A[site])
        state[f"{site}.lora_B"] = torch.einsum("n,nor->or", w, bank.lora_B[site])
    return bank.cfg, state


def top_p_weights(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """DLP-LoRA's fusion weights: per row, the most probable adapters until their probability
    reaches `top_p` (the one that crosses it included), renormalised; the others 0.

    probs (B, N) rows summing to 1 -> (B, N). `top_p` in (0, 1]; a small `top_p` keeps only the
    top-1 adapter (weight 1).
    """
    if not 0 < top_p <= 1:
        raise ValueError(f"--top_p_adapters: expected a value in (0, 1], got {top_p!r}")
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    kept = torch.where(mass_before < top_p, sorted_p, torch.zeros_like(sorted_p))
    kept[:, 0] = sorted_p[:, 0]  # the top-1 always stays, even if rounding pushed mass_before over
    weights = torch.zeros_like(probs).scatter(-1, idx, kept)
    return weights / weights.sum(-1, keepdim=True)
