"""Plain LoRA adapters <-> PEFT's LoRA format for a transformers `LlamaForCausalLM`.

PEFT's folder: `adapter_model.safetensors` with keys
`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` `(r, in)` / `...lora_B.weight`
`(out, r)`, and `adapter_config.json` (`peft_type: LORA`, `r`, `lora_alpha`, `target_modules`,
`layers_to_transform`). The scaling is `lora_alpha / r` in both, `lora_alpha / sqrt(r)` with
`use_rslora` (ours: `--use_rslora True`). DoRA (`use_dora`, ours `--lora_variant dora`) adds
`...lora_magnitude_vector` `(out,)` per module (ours: `lora_magnitude`).

Rotary layout: Meta's wq/wk rows interleave each head's rotary pairs (x[2i], x[2i+1]), transformers'
rows split each head in halves (x[i], x[i + hd/2]). dW = B A permutes like W's rows, so the rows of
B for wq/wk are permuted (Meta -> halves on export, back on import); A is unchanged.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

from llama.files import check_stored_dtype, read_json_object
from llama.model import ModelArgs
from llama.torchfile import new_temp_dir
from moa.checks import load_tensors
from moa.files.adapters import write_adapter_files
from moa.lora.algebra import check_plain_lora, indices_to_spans, lora_sites, read_plain_lora, site_shape
from moa.method.config import LORA_TARGETS, MoAConfig

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"  # what PEFT writes with safe_serialization=False
PEFT_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model.model."
# our module path inside a block -> transformers' (the PEFT target module name is the last part)
HF_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
            "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
            "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
            "feed_forward.w2": "mlp.down_proj"}
_TARGET_OF_HF = {HF_NAMES[path].rsplit(".", 1)[1]: t for t, (_, path) in LORA_TARGETS.items()}  # 'q_proj' -> 'Q'


def interleaved_to_halves(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows (n_heads*hd, k) in Meta's interleaved rotary order -> transformers' half-split order:
    within a head, row 2i+j goes to row i + j*hd/2."""
    n, k = rows.shape
    return rows.reshape(n_heads, n // n_heads // 2, 2, k).transpose(1, 2).reshape(n, k)


def halves_to_interleaved(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_halves`."""
    n, k = rows.shape
    return rows.reshape(n_heads, 2, n // n_heads // 2, k).transpose(1, 2).reshape(n, k)


def _heads(args: ModelArgs, proj: str) -> int | None:
    return {"wq": args.n_heads, "wk": args.n_kv_heads}.get(proj)


def _hf_key(site: str) -> str:
    layer, inner = site.split(".", 2)[1:]  # 'layers.N.attention.wq' -> N, 'attention.wq'
    return f"{_PREFIX}layers.{layer}.{HF_NAMES[inner]}"


def to_peft_state(cfg: MoAConfig, state: Mapping[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our plain-LoRA state -> PEFT's keys, B rows of wq/wk in transformers' rotary layout (fp32)."""
    out = {}
    for site in lora_sites(cfg):
        a, b = state[f"{site}.lora_A"].float(), state[f"{site}.lora_B"].float()
        heads = _heads(args, site.rsplit(".", 1)[1])
        if heads is not None:
            b = interleaved_to_halves(b, heads)
        key = _hf_key(site)
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = a.contiguous(), b.contiguous()
        if cfg.lora_variant == "dora":  # one magnitude per output row: permuted like B's rows
            m = state[f"{site}.lora_magnitude"].float()[:, None]
            out[f"{key}.lora_magnitude_vector"] = (m if heads is None else interleaved_to_halves(m, heads))[:, 0].contiguous()
    return out


def from_peft_state(cfg: MoAConfig, peft_state: Mapping[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Inverse of `to_peft_state` (keys must be exactly those of `cfg`'s sites)."""
    out = {}
    for site in lora_sites(cfg):
        key = _hf_key(site)
        a, b = peft_state[f"{key}.lora_A.weight"].float(), peft_state[f"{key}.lora_B.weight"].float()
        heads = _heads(args, site.rsplit(".", 1)[1])
        if heads is not None:
            b = halves_to_interleaved(b, heads)
        out[f"{site}.lora_A"], out[f"{site}.lora_B"] = a.contiguous(), b.contiguous()
        if cfg.lora_variant == "dora":
            if f"{key}.lora_magnitude_vector" not in peft_state:
                raise ValueError(f"use_dora: {key}.lora_magnitude_vector is missing (DoRA has one per module)")
            m = peft_state[f"{key}.lora_magnitude_vector"].float()[:, None]
            out[f"{site}.lora_magnitude"] = (m if heads is None else halves_to_interleaved(m, heads))[:, 0].contiguous()
    return out


def _check_shapes(cfg: MoAConfig, state: Mapping[str, torch.Tensor], args: ModelArgs, where: str) -> None:
    cfg.layers("lora_layers", args.n_layers)
    for site in lora_sites(cfg):
        out_f, in_f = site_shape(args, site)
        a, b = state[f"{site}.lora_A"], state[f"{site}.lora_B"]
        if tuple(a.shape) != (cfg.lora_rank, in_f) or tuple(b.shape) != (out_f, cfg.lora_rank):
            raise ValueError(f"{where}: {site} has lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}; the base "
                             f"model expects {(cfg.lora_rank, in_f)}, {(out_f, cfg.lora_rank)}")
        m = state.get(f"{site}.lora_magnitude")
        if cfg.lora_variant == "dora" and (m is None or tuple(m.shape) != (out_f,)):
            raise ValueError(f"{where}: {site} has DoRA magnitude {None if m is None else tuple(m.shape)}; the "
                             f"base model expects {(out_f,)}")


def export_peft(adapter: str | os.PathLike, out_dir: str | os.PathLike, base_params: Mapping) -> Path:
    """Write a plain LoRA (adapter.pth or its folder, adapter_params.json beside it) as a PEFT LoRA
    folder for transformers' LLaMA: `out_dir/adapter_model.safetensors` (fp32) + `adapter_config.json`.

    base_params: the base model's params.json dict (head counts for the rotary permutation, shapes).
    `out_dir` must not exist; it is written to a temporary folder beside it and renamed.
    """
    cfg, state = read_plain_lora(adapter, dora_ok=True)
    args = ModelArgs(**base_params)
    _check_shapes(cfg, state, args, str(adapter))
    layers = sorted(cfg.layers("lora_layers", args.n_layers))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": cfg.use_rslora, "use_dora": cfg.lora_variant == "dora",
        "inference_mode": True,
        "target_modules": sorted(HF_NAMES[LORA_TARGETS[t][1]].rsplit(".", 1)[1] for t in cfg.target_list),
        "layers_to_transform": layers if len(layers) < args.n_layers else None,
    }
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists: remove it or choose another output directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_dir(out_dir)
    try:
        save_file(to_peft_state(cfg, state, args), str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# PEFT initialisations that subtract the initial B A from the base weights (a residual base).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's rule for rank_pattern / alpha_pattern: the first key that matches the end of the
    module's name at a dot boundary (`re.match(rf"(.*\\.)?({key})$", name)`), else `default`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _uniform_rank(pc: Mapping, peft_state: dict[str, torch.Tensor], where: str
                  ) -> tuple[int, float, bool, dict[str, torch.Tensor]]:
    """(rank, alpha, use_rslora, state) with one rank and scaling for every module (our format's shape).

    Without patterns: PEFT's `r`, `lora_alpha` and `use_rslora` as they are. With `rank_pattern` /
    `alpha_pattern`: each module's rank is read from its A, its own scaling folded into its B, and
    A's rows and B's columns padded with zeros to the largest rank, so the file has rank R and alpha
    R (scaling 1, no rsLoRA) and the same delta B A at every module; DoRA magnitudes pass as they are.
    """
    r, alpha = int(pc["r"]), float(pc["lora_alpha"])
    rslora = bool(pc.get("use_rslora", False))
    if not pc.get("rank_pattern") and not pc.get("alpha_pattern"):
        return r, alpha, rslora, peft_state
    ranks = {k: t.shape[0] for k, t in peft_state.items() if k.endswith(".lora_A.weight")}
    big = max(ranks.values())
    out = {k: t for k, t in peft_state.items() if k.endswith(".lora_magnitude_vector")}
    for key_a, r_m in ranks.items():
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        if key_b not in peft_state:
            raise ValueError(f"{where}: {key_a} has no {key_b}")
        module = key_a.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        alpha_m = float(_pattern_value(pc.get("alpha_pattern") or {}, module, alpha))
        scale = alpha_m / (r_m ** 0.5 if rslora else r_m)
        a, b = peft_state[key_a], peft_state[key_b]
        out[key_a] = torch.cat([a, a.new_zeros(big - r_m, a.shape[1])])
        out[key_b] = torch.cat([b * scale, b.new_zeros(b.shape[0], big - r_m)], dim=1)
    return big, float(big), False, out


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_positive(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


# The adapter_config.json fields the import reads: what each must hold (null counts as absent; r and
# lora_alpha must be there).
_PEFT_RULES = {
    "r": ("an integer >= 1", _is_int),
    "lora_alpha": ("a number > 0", _is_positive),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
    "init_lora_weights": ("true, false or an initialisation's name", lambda v: isinstance(v, (bool, str))),
    "target_modules": ("a list of module names or a pattern", lambda v: isinstance(v, str) or (
        isinstance(v, list) and all(isinstance(x, str) for x in v))),
    "rank_pattern": ("an object of module pattern -> integer >= 1", lambda v: isinstance(v, dict) and all(
        _is_int(x) for x in v.values())),
    "alpha_pattern": ("an object of module pattern -> number > 0", lambda v: isinstance(v, dict) and all(
        _is_positive(x) for x in v.values())),
}


def read_peft_config(path: Path) -> dict:
    """The dict of a PEFT `adapter_config.json`, each field the import reads checked: a ValueError
    `PATH: FIELD: expected ..., got VALUE (TYPE)` (or `missing field 'r'`), naming the file."""
    pc = read_json_object(path, PEFT_CONFIG, f"a PEFT LoRA folder holds {PEFT_CONFIG} and {PEFT_WEIGHTS}")
    for field in ("r", "lora_alpha"):
        if pc.get(field) is None:
            raise ValueError(f"{path}: missing field {field!r} ({_PEFT_RULES[field][0]})")
    for field, (what, ok) in _PEFT_RULES.items():
        value = pc.get(field)
        if value is not None and not ok(value):
            raise ValueError(f"{path}: {field}: expected {what}, got {value!r} ({type(value).__name__})")
    return pc


def read_peft_weights(peft_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """(tensors by PEFT's name, the file) of `adapter_model.safetensors`, else `adapter_model.bin`; one-line
    errors naming the file: none there, damaged, not a dict of tensors, or a tensor that is not
    floating-point."""
    path = peft_dir / PEFT_WEIGHTS
    if path.is_file():
        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own error type on a damaged file
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ValueError(f"{path}: not a readable safetensors file ({reason})") from None
    elif (peft_dir / PEFT_WEIGHTS_BIN).is_file():
        path = peft_dir / PEFT_WEIGHTS_BIN
        state = load_tensors(path, "PEFT adapter weights file")
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise ValueError(f"{path}: not PEFT adapter weights (expected a dict of tensors keyed by name, got "
                             f"{type(state).__name__})")
    else:
        raise FileNotFoundError(f"{path} does not exist, nor {PEFT_WEIGHTS_BIN} (a PEFT LoRA folder holds "
                                f"{PEFT_CONFIG} and {PEFT_WEIGHTS})")
    for name, t in state.items():
        check_stored_dtype(t, name, str(path))
    return state, path


def import_peft(peft_dir: str | os.PathLike, out_path: str | os.PathLike, base_params: Mapping) -> Path:
    """Read a PEFT LoRA folder (for transformers' LLaMA) into our format: `out_path` (adapter.pth, or a
    folder that gets one) + adapter_params.json, a plain LoRA (`--type_router none`).

    The adapted (layer, module) pairs must form layers x targets (our config's shape). Per-module
    ranks and alphas (`rank_pattern`, `alpha_pattern`) import exactly: every module is padded to the
    largest rank with zeros and its own `alpha_m / r_m` is folded into its B (the file's scaling is
    then 1). `use_rslora` and DoRA (`use_dora`) import as `--use_rslora True` and `--lora_variant
    dora`. Refused with a `ValueError` naming the field: another peft_type, bias training,
    modules other than the seven projections, and an `init_lora_weights` that changed the base
    (PiSSA, OLoRA, CorDA, LoftQ) in a folder PEFT did not convert back to a plain LoRA.
    """
    peft_dir = Path(peft_dir)
    cfg_path = peft_dir / PEFT_CONFIG
    if not peft_dir.is_dir():
        raise FileNotFoundError(f"{peft_dir}: no such folder (a PEFT LoRA folder holds {PEFT_CONFIG} and {PEFT_WEIGHTS})")
    pc = read_peft_config(cfg_path)
    if pc.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {pc.get('peft_type')!r}, expected 'LORA'")
    for field, plain in (("bias", "none"), ("lora_bias", False), ("modules_to_save", None),
                         ("fan_in_fan_out", False)):
        if pc.get(field, plain) not in (plain, None, [], {}):
            raise ValueError(f"{cfg_path}: {field} = {pc[field]!r} is not supported (expected {plain!r})")
    init = pc.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().split("_")[0] in BASE_CHANGING_INITS:
        raise ValueError(f"{cfg_path}: init_lora_weights = {init!r}: this initialisation also changed the base "
                         "weights (W - scale * B A), which the folder does not hold, so its lora_A/lora_B are "
                         "not a delta to the original base; save it from PEFT converted to a plain LoRA "
                         "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) and import that")
    peft_state, weights_path = read_peft_weights(peft_dir)
    r, alpha, rslora, peft_state = _uniform_rank(pc, peft_state, str(cfg_path))
    dora = bool(pc.get("use_dora", False))
    args = ModelArgs(**base_params)
    pairs = set()
    for key in peft_state:
        parts = key.removeprefix(_PREFIX).split(".")  # layers N self_attn q_proj lora_A weight
        tail = parts[4:]
        if not key.startswith(_PREFIX) or len(parts) not in (5, 6) or parts[0] != "layers" \
                or parts[3] not in _TARGET_OF_HF or (tail not in (["lora_A", "weight"], ["lora_B", "weight"])
                                                     and not (dora and tail == ["lora_magnitude_vector"])):
            raise ValueError(f"{weights_path}: unexpected key {key!r} (expected {_PREFIX}layers.N.<proj>."
                             "lora_A|B.weight" + (", ...lora_magnitude_vector with use_dora" if not dora else
                                                  " or ...lora_magnitude_vector") + ")")
        pairs.add((int(parts[1]), _TARGET_OF_HF[parts[3]]))
    layers = sorted({i for i, _ in pairs})
    targets = [t for t in LORA_TARGETS if any(t == tt for _, tt in pairs)]
    if pairs != {(i, t) for i in layers for t in targets}:
        raise ValueError(f"{weights_path}: the adapted modules are not the same in every layer "
                         f"(layers {layers}, targets {targets}); our format needs layers x targets")
    cfg = MoAConfig(lora_layers=indices_to_spans(layers), lora_rank=r, lora_alpha=alpha, use_rslora=rslora,
                    lora_variant="dora" if dora else "lora", lora_targets=",".join(targets), type_router="none")
    check_plain_lora(cfg, str(peft_dir), dora_ok=True)
    state = from_peft_state(cfg, peft_state, args)
    _check_shapes(cfg, state, args, str(weights_path))
    return write_adapter_files(out_path, cfg, state)
