"""LoRA algebra on adapter files: merge a plain LoRA into a base-model directory, extract a LoRA
from the difference of two base-model directories (truncated SVD) and tabulate the energy it keeps
(`energy_tables`); combining several LoRAs is moa/lora/combine.py.

A *plain LoRA* is an adapter whose only type is LoRA, one per site, applied at weight 1:
`--expert_num 1`, `--type_router none`, no prompt, no parallel adapter. Only such an adapter is a
fixed low-rank change `dW = B A * alpha / r` of the frozen weights; a mixture, a router, a prompt
or a parallel adapter depends on the input and cannot be folded into a matrix.

In memory a LoRA is its `MoAConfig` and its adapter state dict (`layers.N.attention.wq.lora_A`
`(r, in)`, `...lora_B` `(out, r)`), exactly what `adapter.pth` + `adapter_params.json` hold.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from llama.checkpoint import load_model, load_params, load_state_dict, save_model_dir, shard_paths, stored_dtype
from llama.hf import is_hf_dir
from llama.model import ModelArgs
from llama.params import linear_shapes
from moa.files.adapters import (
    ADAPTER_PARAMS,
    BASE_TRAINED,
    adapter_file,
    load_trained_adapter,
    read_adapter_files,
    read_adapter_params,
)
from moa.method.config import LORA_TARGETS, MoAConfig, parse_spans
from moa.method.state import merge_lora

# ---- plain LoRA files ----------------------------------------------------------------------------

def _span_indices(flag: str, text: str) -> list[int]:
    return sorted({i for start, end in parse_spans(flag, text) for i in range(start, end)})


def indices_to_spans(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-3,5-6' (end exclusive); [] -> '0-0'."""
    idx = sorted(set(indices))
    if not idx:
        return "0-0"
    spans, start, prev = [], idx[0], idx[0]
    for i in idx[1:]:
        if i != prev + 1:
            spans.append(f"{start}-{prev + 1}")
            start = i
        prev = i
    spans.append(f"{start}-{prev + 1}")
    return ",".join(spans)


def check_plain_lora(cfg: MoAConfig, where: str, dora_ok: bool = False) -> None:
    """`ValueError` (naming `where` and every offending flag) unless `cfg` describes a plain LoRA.

    A DoRA adapter (`--lora_variant dora`) is one only where `dora_ok` (merging, PEFT export, top-1
    routing): its row normalisation is not linear in B A, so it cannot be mixed or combined."""
    reasons = []
    if cfg.lora_variant == "dora" and not dora_ok:
        reasons.append("--lora_variant dora: DoRA rescales each row of W + B A by its norm, which is not linear "
                       "in B A, so DoRA adapters cannot be mixed with weights (fusion, combine, LoraHub); "
                       "merging, PEFT export and top-1 routing take them")
    if cfg.expert_num != 1:
        reasons.append(f"--expert_num {cfg.expert_num}: a mixture of LoRAs per site whose weights depend on "
                       "the input")
    if cfg.type_router != "none":
        reasons.append(f"--type_router {cfg.type_router}: per-token/per-sequence weights on each type "
                       "(a plain LoRA needs --type_router none)")
    if _span_indices("prompt_layers", cfg.prompt_layers):
        reasons.append(f"--prompt_layers {cfg.prompt_layers}: prompt keys/values are not a weight change")
    if _span_indices("p_adapter_layers", cfg.p_adapter_layers):
        reasons.append(f"--p_adapter_layers {cfg.p_adapter_layers}: a parallel adapter is a nonlinear "
                       "branch, not a weight change")
    if not _span_indices("lora_layers", cfg.lora_layers):
        reasons.append("--lora_layers 0-0: the adapter has no LoRA")
    if reasons:
        raise ValueError(f"{where}: not a plain LoRA, so it cannot be used as a fixed weight change B A * "
                         "alpha / r: " + "; ".join(reasons))


def lora_sites(cfg: MoAConfig) -> list[str]:
    """Module paths of the LoRA sites of `cfg`, layer by layer, targets in canonical order
    (Q, K, V, O, FFN_GATE, FFN_UP, FFN_DOWN), e.g. ['layers.0.attention.wq', ...]."""
    targets = [t for t in LORA_TARGETS if t in cfg.target_list]
    return [f"layers.{i}.{LORA_TARGETS[t][1]}" for i in _span_indices("lora_layers", cfg.lora_layers)
            for t in targets]


def site_shape(args: ModelArgs, site: str) -> tuple[int, int]:
    """(out, in) of the frozen weight at module path `site` in a model with `args`."""
    return linear_shapes(args)[site.rsplit(".", 1)[1]]


def adapter_config(file: Path) -> MoAConfig:
    """The `MoAConfig` of `adapter_params.json` beside adapter file `file`."""
    return read_adapter_params(file.parent / ADAPTER_PARAMS)[0]


def read_plain_lora(path: str | os.PathLike, dora_ok: bool = False) -> tuple[MoAConfig, dict[str, torch.Tensor]]:
    """Read `adapter.pth` (a file or its folder) + `adapter_params.json` of a plain LoRA.

    Returns (cfg, state), state fp32 on the CPU; a DoRA adapter (only with `dora_ok`) also has
    `...lora_magnitude` `(out,)` per site. Not a plain LoRA, keys/ranks that do not match
    the config, or a `base_trained.pth` beside it (training with `--w_bias True` also changed base
    norms/biases, which a LoRA file cannot carry; `merge_into_base` folds them in): `ValueError`
    naming the file.
    """

    file = adapter_file(path)
    cfg = adapter_config(file)
    check_plain_lora(cfg, str(file), dora_ok)
    if (file.parent / BASE_TRAINED).is_file():
        raise ValueError(f"{file}: {file.parent / BASE_TRAINED} beside it holds base tensors that training also "
                         "changed (--w_bias True); a LoRA cannot carry them, so this adapter can only be merged "
                         "into its base (lora_tools merge)")
    state = read_adapter_files(file).state
    expected = {f"{s}.{m}" for s in lora_sites(cfg) for m in plain_lora_keys(cfg)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{file}: keys do not match {ADAPTER_PARAMS}: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}")
    r = cfg.lora_rank
    for site in lora_sites(cfg):
        a, b = state[f"{site}.lora_A"], state[f"{site}.lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ValueError(f"{file}: {site} has lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}; expected "
                             f"(r, in), (out, r) with r = --lora_rank {r}")
    return cfg, {k: v.float() for k, v in state.items()}


def plain_lora_keys(cfg: MoAConfig) -> tuple[str, ...]:
    """The tensor names of one site of a plain LoRA: lora_A, lora_B (and lora_magnitude with DoRA)."""
    return ("lora_A", "lora_B", "lora_magnitude") if cfg.lora_variant == "dora" else ("lora_A", "lora_B")


def lora_delta(cfg: MoAConfig, state: dict[str, torch.Tensor], site: str) -> torch.Tensor:
    """dW = B A * alpha / r (alpha / sqrt(r) with rsLoRA) of `site`, (out, in) fp32."""
    return (state[f"{site}.lora_B"].float() @ state[f"{site}.lora_A"].float()) * cfg.lora_scale


# ---- merge into a base-model directory ------------------------------------------------------------

def _stored_dtype(model_dir: str | os.PathLike) -> torch.dtype:
    return stored_dtype(model_dir)


def _extra_files(model_dir: str | os.PathLike) -> dict[str, bytes]:
    """Every plain file of a base-model directory except params.json and the weight shards."""
    skip = {"params.json"} | {p.name for p in shard_paths(model_dir)}
    return {p.name: p.read_bytes() for p in sorted(Path(model_dir).iterdir()) if p.is_file() and p.name not in skip}


def merge_into_base(base_dir: str | os.PathLike, adapter: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Fold a plain LoRA into a base model and write the result as a new base-model directory.

    base_dir: params.json + consolidated.NN.pth (+ tokenizer files, copied as they are).
    adapter: adapter.pth (or its folder) with adapter_params.json beside it, and `base_trained.pth`
        when training also changed base norms/biases (--w_bias True): those replace the base's too.
    out_dir: must not exist; written atomically by `save_model_dir` (one shard), every weight in the
        base's stored dtype: W + B A * alpha / r, or DoRA's g * (W + B A * alpha / r) (in fp32, see
        `moa.merge_lora`).
    A mixture, router, prompt or parallel adapter: `ValueError` saying why; an adapter made for
    another base (layers, shapes): `ValueError` naming both.
    """
    file = adapter_file(adapter)
    check_plain_lora(adapter_config(file), str(file), dora_ok=True)
    if is_hf_dir(base_dir):
        raise ValueError(f"{base_dir} is a Hugging Face folder: merge into it with scripts/export_hf.py "
                         "--ckpt_dir BASE --adapter_path ADAPTER --out DIR (writes a Hugging Face folder)")
    if Path(out_dir).exists():  # checked before the (long) load and merge, again when renaming into place
        raise FileExistsError(f"{out_dir} already exists: remove it or choose another output directory")
    state, _, _ = merged_base(base_dir, file)
    return save_model_dir(out_dir, load_params(base_dir), state, files=_extra_files(base_dir))


def merged_base(base_dir: str | os.PathLike, adapter: str | os.PathLike):
    """(state, model, tokenizer): the base model of `base_dir` (Meta or Hugging Face folder) in its
    stored dtype with a plain LoRA folded in; `state` holds the base's tensors only (Meta names), the
    merged ones updated. Not a plain LoRA, or made for another base: `ValueError` saying why."""
    file = adapter_file(adapter)
    check_plain_lora(adapter_config(file), str(file), dora_ok=True)
    model, tokenizer = load_model(base_dir, dtype=_stored_dtype(base_dir))
    base_keys = list(model.state_dict())
    try:
        load_trained_adapter(model, file, base_dir)  # strict keys and shapes, + base_trained.pth
    except ValueError as e:
        raise ValueError(f"{file} does not fit the base model {base_dir}: {e}") from None
    merge_lora(model)
    merged = model.state_dict()
    return {k: merged[k].contiguous() for k in base_keys}, model, tokenizer


# ---- extraction by truncated SVD ------------------------------------------------------------------

def kept_energy(singular_values: torch.Tensor, rank: int) -> float:
    """Fraction sum_{i<rank} s_i^2 / sum_i s_i^2 of a matrix's squared Frobenius norm that its best
    rank-`rank` approximation keeps (Eckart-Young); `singular_values` descending; 1.0 for a zero matrix."""
    s2 = singular_values.double() ** 2
    total = float(s2.sum())
    return 1.0 if total == 0.0 else float(s2[:rank].sum()) / total


@dataclasses.dataclass
class ExtractReport:
    """Per site (module path): kept energy sum_{i<=r} s_i^2 / sum_i s_i^2 of dW (1.0 for dW = 0) and
    the singular values (fp32, descending); `other_changed`: non-target tensors that differ between
    the two models (not captured by the LoRA)."""

    kept_energy: dict[str, float]
    singular_values: dict[str, torch.Tensor]
    other_changed: list[str]


def extract_lora_svd(base_dir: str | os.PathLike, tuned_dir: str | os.PathLike, rank: int,
                     targets: str | Sequence[str] = "Q,K,V,O,FFN_DOWN", layers: Optional[str] = None,
                     ) -> tuple[MoAConfig, dict[str, torch.Tensor], ExtractReport]:
    """The rank-`rank` LoRA closest (Frobenius) to dW = W_tuned - W_base at each site.

    dW = U S V^T (fp32); B = U_r S_r `(out, r)`, A = V_r^T `(r, in)`, and `lora_alpha = rank` so that
    the scaling alpha / r is 1 and B A is the truncated dW itself. targets: `--lora_targets` names;
    layers: a `--lora_layers` span (default every layer). Returns (cfg of a plain LoRA, state fp32,
    report). Different params.json or tensor shapes: `ValueError` naming both directories.
    """
    if rank < 1:
        raise ValueError(f"--rank: expected a positive integer, got {rank}")
    params, tuned_params = load_params(base_dir), load_params(tuned_dir)
    if params != tuned_params:
        diff = sorted(k for k in set(params) | set(tuned_params) if params.get(k) != tuned_params.get(k))
        raise ValueError(f"{tuned_dir} is not a fine-tune of {base_dir}: params.json differs in {diff}")
    n_layers = ModelArgs.from_params(**params).n_layers
    cfg = MoAConfig(lora_layers=layers or f"0-{n_layers}", lora_rank=rank, lora_alpha=float(rank),
                    lora_targets=targets, type_router="none")
    cfg.layers("lora_layers", n_layers)  # range check
    # In their stored dtypes (memory-mapped for a single shard); each delta is formed in fp32 on its own,
    # so the peak extra memory is one site's delta and its SVD, not two fp32 copies of the model.
    base = load_state_dict(base_dir, dtype=_stored_dtype(base_dir))
    tuned = load_state_dict(tuned_dir, dtype=_stored_dtype(tuned_dir))
    if set(base) != set(tuned):
        raise ValueError(f"{base_dir} and {tuned_dir} hold different tensors: {sorted(set(base) ^ set(tuned))[:6]}")
    for key in base:
        if base[key].shape != tuned[key].shape:
            raise ValueError(f"{key}: shape {tuple(base[key].shape)} in {base_dir}, {tuple(tuned[key].shape)} "
                             f"in {tuned_dir}")
    state, energy, values = {}, {}, {}
    sites = lora_sites(cfg)
    for site in sites:
        delta = tuned[f"{site}.weight"].float() - base[f"{site}.weight"].float()  # (out, in)
        if rank > min(delta.shape):
            raise ValueError(f"--rank {rank} exceeds min(out, in) = {min(delta.shape)} of {site}")
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        state[f"{site}.lora_A"] = vh[:rank].contiguous()  # (r, in)
        state[f"{site}.lora_B"] = (u[:, :rank] * s[:rank]).contiguous()  # (out, r)
        energy[site], values[site] = kept_energy(s, rank), s
    site_keys = {f"{s}.weight" for s in sites}
    other = [k for k in base if k not in site_keys and not torch.equal(base[k].float(), tuned[k].float())]
    return cfg, state, ExtractReport(energy, values, other)


_TARGET_OF_PATH = {path: t for t, (_, path) in LORA_TARGETS.items()}  # 'attention.wq' -> 'Q'


def energy_tables(report: ExtractReport, rank: int, ranks: Sequence[int]) -> str:
    """Two Markdown tables of an extraction's kept energy: per layer x target at `rank` (the extracted
    LoRA), and per target x each of `ranks`, the mean over layers with the minimum in brackets."""
    grid: dict[int, dict[str, str]] = {}
    for site in report.kept_energy:
        _, layer, path = site.split(".", 2)  # 'layers.N.attention.wq'
        grid.setdefault(int(layer), {})[_TARGET_OF_PATH[path]] = site
    targets = [t for t in LORA_TARGETS if any(t in row for row in grid.values())]
    lines = [f"kept energy at rank {rank}, per layer and target:", "",
             "| layer | " + " | ".join(targets) + " |", "|---" * (len(targets) + 1) + "|"]
    for layer, row in sorted(grid.items()):
        lines.append(f"| {layer} | " + " | ".join(f"{report.kept_energy[row[t]]:.4f}" for t in targets) + " |")
    lines += ["", "kept energy by rank, mean over layers [min]:", "",
              "| target | " + " | ".join(f"r={r}" for r in ranks) + " |", "|---" * (len(ranks) + 1) + "|"]
    for t in targets:
        sites = [row[t] for row in grid.values()]
        cells = []
        for r in ranks:
            values = [kept_energy(report.singular_values[site], r) for site in sites]
            cells.append(f"{sum(values) / len(values):.4f} [{min(values):.4f}]")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
