"""Checkpoints of the official MoA code (GitHub DCDmllm/MoA, every `LLaMA3_*` folder) -> our adapter files.
(Over 400 lines: one name mapping for all six official folders, which share most of it.)

    import_official(checkpoint, out, flags="", args_path=None, llama_path=None, overwrite=False) -> out/adapter.pth

Input: the `checkpoint-N.pth` of the official `main_finetune.py` (`{"model": the whole state dict, frozen
base included, "args": argparse.Namespace}`) or the adapter tensors alone (its extract script's
`adapter.pth`). Read with `torch.load(mmap=True, weights_only=True)` allowing exactly `argparse.Namespace`;
only adapter tensors are copied out of the map.

Flags: what the tensors show (layers, targets, rank, E, hydra, sizes, swi_x, routers) comes first, then
the run's `args` (the checkpoint's own, or `args_path`'s), then `flags` (our flag names). What the tensors
cannot show (`lora_alpha`, `top_k`, `max_threshold`, `--type_router instance`) comes from args/flags,
else our default (reported as a note).

Names (official -> ours; `P` = `layers.i.`; an official `llama.`/`module.` prefix is dropped):
`P attention.lora_{Q,K,V,O}` -> `P attention.w{q,k,v,o}`, `P feed_forward.lora_{GATE,UP,DOWN}` ->
`P feed_forward.w{1,3,2}`; `.lora_A.weight` (r, in) -> `.lora_A`; MoLoRA `lora_{A,B}_l.e.weight` and
top-k/AdaMoLE `experts.e.lora_{A,B}.weight` stacked (E, ...); HydraLoRA one `lora_A`; expert routers
`router.weight`, `router.topkroute_linear.*`, AdaMoLE `router.*` -> `router.proj.*`, `threshold_fn.*`
-> `router.threshold.*`, noise layers -> `router.noise.*`; `P attention.prompt.weight` (E*L, dim, set-major)
-> `P attention.prompt.vectors` (L, dim) / (E, L, dim), `prompt_gate` -> `gate`, `prompt_router.*` ->
`router.proj.*`; `P p_adapter.{down,up}_proj[_l.e].*` -> `P feed_forward.p_adapter.{down, down_bias, up,
up_bias}`, `p_adapter.router.*` -> `.router.proj.*`; `P adapter_type_router.*` -> `P type_router.{proj,
w1, w3, w2}.*` with the output rows (of `proj`, `w2`) moved from the official type order (Q, K, V, prompt,
O, UP, GATE, DOWN, p_adapter: those present) to the block's slot order, by name; `P adapter_threshold_fn.*`
-> `P type_router.threshold.*`; UniPEFT `P lora_gate.*` -> `P type_router.gates.lora.*`, `P prompt_gate.*`
-> `gates.prompt.*` and `gates.p_adapter.*` (the official scales the adapter with the prompt gate);
`adapter_noise_linear.*` (unused by the official forward) is dropped.
"""
from __future__ import annotations

import argparse
import dataclasses
import pickle
import re
import shlex
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from llama.model import ModelArgs, Transformer
from moa.files.adapters import ADAPTER_FILE, ADAPTER_PARAMS, BASE_TRAINED, load_adapter, write_adapter_files
from moa.method.config import LORA_TARGETS, P_ADAPTER_SLOT, PROMPT_SLOT, MoAConfig
from moa.method.inject import attach_adapters
from moa.method.state import adapter_state_dict

# Official site name -> our --lora_targets name (whose LORA_TARGETS entry gives slot and module path).
OFFICIAL_SITES = {"attention.lora_Q": "Q", "attention.lora_K": "K", "attention.lora_V": "V",
                  "attention.lora_O": "O", "feed_forward.lora_GATE": "FFN_GATE",
                  "feed_forward.lora_UP": "FFN_UP", "feed_forward.lora_DOWN": "FFN_DOWN"}
# The official type router's output order (Q, K, V, prompt, O, UP, GATE, DOWN, p_adapter) as our slots.
OFFICIAL_TYPE_ORDER = ("lora.wq", "lora.wk", "lora.wv", PROMPT_SLOT, "lora.wo", "lora.w3", "lora.w1", "lora.w2",
                       P_ADAPTER_SLOT)
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_BASE = re.compile(r"^(tok_embeddings|norm|output)\.weight$|^layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123]"
                   r"|attention_norm|ffn_norm)\.weight$|(^|\.)freqs_cis$")
# Names only this project's adapter files use.
_OURS = re.compile(r"\.(lora_A|lora_B)$|\.type_router\.|\.prompt\.vectors$|\.p_adapter\.(down|up)(_bias)?$")
_DEFAULTED = ("lora_alpha", "top_k", "max_threshold")

Block = dict[str, torch.Tensor]  # one official block's adapter tensors by name inside the block


class FormatError(ValueError):
    """The checkpoint is not one this tool converts, or the flags do not fit its tensors."""


# ---- reading -----------------------------------------------------------------------------------------
def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True, allowing exactly argparse.Namespace; mmap when the file allows."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # torch's legacy (non-zip) format cannot be mapped
            if "mmap" not in str(e):
                raise FormatError(f"{path}: not a readable torch file ({str(e).splitlines()[0][:160]})") from None
            return torch.load(path, map_location="cpu", weights_only=True)


def load_official(path: str | Path) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]]]:
    """(tensors by name without a `llama.`/`module.` prefix, the run's args as a dict or None) of `path`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found is None:
            raise FormatError(f"{path}: not a torch checkpoint file (torch.load cannot read it)") from None
        raise FormatError(f"{path}: holds a Python object of class {found.group(1)}; an official checkpoint "
                          "holds only tensors, plain containers and the run's argparse.Namespace, and nothing "
                          "else is unpickled; convert the adapter tensors alone (the official extract script's "
                          "adapter.pth) with --flags") from None
    if isinstance(obj, dict) and "adapter_params" in obj:
        raise FormatError(f"{path}: a checkpoint of this project's main_finetune.py, not of the official code: "
                          "extract it with extract_adapter_from_checkpoint.py --checkpoint PATH")
    args = None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        raw = obj.get("args")
        args = vars(raw) if isinstance(raw, argparse.Namespace) else (dict(raw) if isinstance(raw, dict) else None)
        obj = obj["model"]
    if not (isinstance(obj, dict) and obj and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())):
        raise FormatError(f"{path}: neither an official MoA checkpoint (a dict with 'model' and 'args') nor a "
                          "dict of adapter tensors")
    return {re.sub(r"^(module\.)?(llama\.)?", "", k): v for k, v in obj.items()}, args


def args_from(path: str | Path) -> dict[str, Any]:
    """The `args` of an official checkpoint-N.pth, as a dict."""
    _, args = load_official(path)
    if args is None:
        raise FormatError(f"{path}: holds no 'args' (expected the checkpoint-N.pth of the official main_finetune.py)")
    return args


def parse_flags(text: str) -> dict[str, Any]:
    """`--name value ...` in our flag names -> {name: value} typed as MoAConfig's fields."""
    fields = {f.name: f for f in dataclasses.fields(MoAConfig)}
    words = shlex.split(text)
    if len(words) % 2:
        raise ValueError(f"--flags: expected pairs '--name value', got {text!r}")
    out: dict[str, Any] = {}
    for name, value in zip(words[::2], words[1::2]):
        if not name.startswith("--") or name[2:] not in fields:
            raise ValueError(f"--flags: unknown adapter flag {name!r}; expected one of "
                             f"{', '.join('--' + n for n in fields)}")
        kind = type(fields[name[2:]].default)
        try:
            out[name[2:]] = value if kind in (str, bool) else kind(value)
        except ValueError:
            raise ValueError(f"--flags: {name} expects a {kind.__name__}, got {value!r}") from None
    return out


def official_blocks(state: dict[str, torch.Tensor], path: str = "checkpoint") -> dict[int, Block]:
    """{layer: {name inside the block: tensor}} of the official adapter tensors (the frozen base left out).
    A FormatError when the names are ours, when there is no official adapter tensor, or an unknown one."""
    ours = sorted(k for k in state if _OURS.search(k))
    if ours:
        raise FormatError(f"{path}: already in this project's format ({ours[0]}, ...): load it with "
                          "moa.load_adapter, nothing to import")
    blocks: dict[int, Block] = {}
    others = []
    for key, tensor in state.items():
        m = _LAYER.match(key)
        if _BASE.search(key):
            continue
        if m is None:
            others.append(key)
        else:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
    if not blocks:
        raise FormatError(f"{path}: neither an official MoA checkpoint nor ours: no adapter tensor named like "
                          "layers.N.attention.lora_Q.lora_A.weight, layers.N.adapter_type_router.weight, ..."
                          + (f" (found {sorted(others)[:5]})" if others else ""))
    if others:
        raise FormatError(f"{path}: tensors this tool does not know: {sorted(others)[:10]}")
    return blocks


# ---- what the tensors show ---------------------------------------------------------------------------
def _spans(layers: set[int]) -> str:
    """{0, 1, 2, 5} -> '0-3,5-6' (end exclusive); empty -> '0-0'."""
    out: list[str] = []
    for i in sorted(layers):
        if out and out[-1].endswith(f"-{i}"):
            out[-1] = out[-1].rsplit("-", 1)[0] + f"-{i + 1}"
        else:
            out.append(f"{i}-{i + 1}")
    return ",".join(out) or "0-0"


def _count(names: set[str], prefix: str) -> int:
    """Number of experts `prefix.{e}.` among names."""
    return len({m.group(1) for n in names if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", n))})


def _site_flags(block: Block, site: str) -> dict[str, Any]:
    """The flags one official LoRA site shows ({} when the block has no such site)."""
    names = {n for n in block if n.startswith(site + ".")}
    if not names:
        return {}
    if f"{site}.router.topkroute_linear.weight" in names or f"{site}.threshold_fn.weight" in names:
        topk = f"{site}.router.topkroute_linear.weight" in names
        noise = f"{site}.router.noise_linear.weight" if topk else f"{site}.noise_linear.weight"
        return {"expert_router": "topk" if topk else "adamole", "expert_num": _count(names, f"{site}.experts"),
                "lora_rank": block[f"{site}.experts.0.lora_A.weight"].shape[0], "noisy_router": noise in names}
    if f"{site}.lora_B_l.0.weight" in names:
        hydra = f"{site}.lora_A.weight" in names
        a = block[f"{site}.lora_A.weight" if hydra else f"{site}.lora_A_l.0.weight"]
        return {"expert_num": _count(names, f"{site}.lora_B_l"), "hydra_moe": hydra, "lora_rank": a.shape[0]}
    a = block.get(f"{site}.lora_A.weight")
    return {} if a is None else {"lora_rank": a.shape[0]}


def _block_flags(block: Block) -> dict[str, Any]:
    """The prompt, parallel-adapter and type-router flags one official block shows."""
    flags: dict[str, Any] = {}
    if "attention.prompt.weight" in block:
        router = block.get("attention.prompt_router.weight")
        e = 1 if router is None else router.shape[0]
        flags.update(prompt_len=block["attention.prompt.weight"].shape[0] // e, **({"expert_num": e} if e > 1 else {}))
    down = block.get("p_adapter.down_proj.weight", block.get("p_adapter.down_proj_l.0.weight"))
    if down is not None:
        flags["p_adapter_size"] = down.shape[0]
        if "p_adapter.up_proj_l.0.weight" in block:
            flags.update(expert_num=_count(set(block), "p_adapter.up_proj_l"),
                         p_adapter_hydra="p_adapter.down_proj.weight" in block)
    if "adapter_type_router.weight" in block:
        flags.update(swi_x=0, type_router="soft")
    elif "adapter_type_router.w1.weight" in block:
        n_types = block["adapter_type_router.w2.weight"].shape[0]
        flags.update(swi_x=block["adapter_type_router.w1.weight"].shape[0] // n_types, type_router="soft")
    if "adapter_threshold_fn.weight" in block:
        flags["type_router"] = "sparse"
    if "lora_gate.weight" in block or "prompt_gate.weight" in block:
        flags["type_router"] = "unipeft"
    return flags


def infer_flags(blocks: dict[int, Block]) -> dict[str, Any]:
    """The adapter flags the official tensors show (type router 'none' when no block has one)."""
    flags: dict[str, Any] = {"type_router": "none"}
    lora, prompt, p_adapter, targets = set(), set(), set(), set()
    for i, block in blocks.items():
        for site, target in OFFICIAL_SITES.items():
            site_flags = _site_flags(block, site)
            if site_flags:
                lora.add(i)
                targets.add(target)
                flags.update(site_flags)
        flags.update(_block_flags(block))
        if "attention.prompt.weight" in block:
            prompt.add(i)
        if any(n.startswith("p_adapter.") for n in block):
            p_adapter.add(i)
    flags.update(lora_layers=_spans(lora), prompt_layers=_spans(prompt), p_adapter_layers=_spans(p_adapter))
    if targets:
        flags["lora_targets"] = ",".join(t for t in LORA_TARGETS if t in targets)
    return flags


def build_config(blocks: dict[int, Block], args: Optional[dict[str, Any]],
                 flags: dict[str, Any]) -> tuple[MoAConfig, list[str]]:
    """(the flags: the tensors', then the run's args, then `flags`; notes on flags left at our default)."""
    fields = {f.name for f in dataclasses.fields(MoAConfig)}
    params = infer_flags(blocks)
    for name, value in (args or {}).items():
        if name in fields and value is not None:
            params[name] = ",".join(value) if isinstance(value, (list, tuple)) else value
    if params.get("const_threshold") in (True, "True") and params["type_router"] == "soft":
        params["type_router"] = "sparse"  # the official sparse folder with a constant threshold has no layer
    params.update(flags)
    matters = {"lora_alpha": params["lora_layers"] != "0-0", "top_k": params.get("expert_router") == "topk",
               "max_threshold": params["type_router"] == "sparse"}
    notes = [f"--{n} {MoAConfig.__dataclass_fields__[n].default} (our default: neither the tensors, the run's "
             "args nor --flags say)" for n in _DEFAULTED if n not in params and matters[n]]
    if params["type_router"] == "soft" and "type_router" not in flags:
        notes.append("--type_router soft (a run of the official LLaMA3_soft_moa_instance folder has the same "
                     "tensors: import it with --flags \"--type_router instance\")")
    return MoAConfig(**params), notes


# ---- the model the result must load into --------------------------------------------------------------
def _first(tensors: dict[str, torch.Tensor], *patterns: str) -> Optional[torch.Tensor]:
    """The first tensor whose name matches one of `patterns` (tried in order)."""
    for pattern in patterns:
        for key, t in tensors.items():
            if re.search(pattern, key):
                return t
    return None


def model_args(state: dict[str, torch.Tensor], llama_path: Optional[str] = None) -> ModelArgs:
    """ModelArgs of the base: `llama_path`'s params.json, else the shapes in the checkpoint (its frozen base
    when present, else what the adapter tensors show; unshown sizes are any that fit)."""
    if llama_path is not None:
        from llama.checkpoint import load_params

        params = load_params(llama_path)
        if params.get("vocab_size", 0) <= 0:
            params["vocab_size"] = 8  # LLaMA-2's -1: the vocabulary does not shape an adapter
        return ModelArgs.from_params(**params)
    any_a = r"(lora_A|lora_A_l\.0|experts\.0\.lora_A)\.weight$"
    any_b = r"(lora_B|lora_B_l\.0|experts\.0\.lora_B)\.weight$"
    emb = _first(state, r"^tok_embeddings\.weight$")
    dim_src = _first(state, r"^tok_embeddings\.weight$", r"attention\.prompt\.weight$", r"lora_gate\.weight$",
                     r"adapter_type_router\.(w1\.)?weight$", r"p_adapter\.down_proj(_l\.0)?\.weight$",
                     r"attention\.lora_[QKV]\." + any_a)
    if dim_src is None:
        raise FormatError("cannot tell the model width from the checkpoint's tensors; pass --llama_path")
    dim = dim_src.shape[1]
    n_layers = 1 + max(int(m.group(1)) for k in state if (m := _LAYER.match(k)))
    kv = _first(state, r"^layers\.\d+\.attention\.wk\.weight$", r"attention\.lora_K\." + any_b)
    gate = _first(state, r"attention\.prompt_gate$")
    heads = [gate.numel()] if gate is not None else [h for h in (dim // 128, dim // 64, dim // 32, dim // 16, 1) if h]
    n_heads = next(h for h in heads if dim % h == 0 and (kv is None or kv.shape[0] % (dim // h) == 0))
    n_kv = n_heads if kv is None else kv.shape[0] // (dim // n_heads)
    up = _first(state, r"^layers\.\d+\.feed_forward\.w1\.weight$", r"feed_forward\.lora_(GATE|UP)\." + any_b)
    down = _first(state, r"feed_forward\.lora_DOWN\." + any_a)
    hidden = up.shape[0] if up is not None else (down.shape[1] if down is not None else None)
    extra: dict[str, Any] = {}
    if hidden is not None:
        base = int(2 * (4 * dim) / 3)
        extra = dict(multiple_of=hidden, ffn_dim_multiplier=None if hidden >= base else hidden / base)
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                     vocab_size=emb.shape[0] if emb is not None else 8, **extra)
    if hidden is not None and args.ffn_hidden_dim != hidden:
        raise FormatError(f"cannot build a model with FFN width {hidden}; pass --llama_path")
    return args


# ---- the mapping ---------------------------------------------------------------------------------------
class _Source:
    """Takes official tensors of one checkpoint by (layer, name), recording what is missing and what was used."""

    def __init__(self, blocks: dict[int, Block]):
        self.blocks, self.used, self.missing = blocks, set(), []
        self.out: dict[str, torch.Tensor] = {}

    def take(self, i: int, name: str) -> Optional[torch.Tensor]:
        t = self.blocks.get(i, {}).get(name)
        if t is None:
            self.missing.append(f"layers.{i}.{name}")
        else:
            self.used.add((i, name))
        return t

    def put(self, key: str, i: int, name: str, fn: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        """Our `key` <- fn(official `layers.i.name`)."""
        t = self.take(i, name)
        if t is not None:
            self.out[key] = fn(t)

    def put_stack(self, key: str, i: int, names: list[str]) -> None:
        """Our `key` <- the official tensors `names` stacked along a new first (expert) axis."""
        ts = [self.take(i, n) for n in names]
        if all(t is not None for t in ts):
            self.out[key] = torch.stack(ts)

    def drop(self, i: int, prefix: str) -> None:
        """Mark the official tensors `layers.i.prefix*` as knowingly not converted."""
        self.used.update((i, n) for n in self.blocks.get(i, {}) if n.startswith(prefix))

    def left_over(self) -> list[str]:
        return sorted(f"layers.{i}.{n}" for i, b in self.blocks.items() for n in b
                      if (i, n) not in self.used and not n.startswith("adapter_noise_linear."))


def _lora_site(src: _Source, i: int, site: str, q: str, mixture: str, cfg: MoAConfig) -> None:
    """One LoRA site: official `layers.i.<site>.*` -> our `q.*` (q = `layers.i.attention.wq`, ...)."""
    e = range(cfg.expert_num)
    if mixture == "lora":
        src.put(f"{q}.lora_A", i, f"{site}.lora_A.weight")
        src.put(f"{q}.lora_B", i, f"{site}.lora_B.weight")
    elif cfg.expert_router in ("topk", "adamole"):
        for f in ("lora_A", "lora_B"):
            src.put_stack(f"{q}.{f}", i, [f"{site}.experts.{j}.{f}.weight" for j in e])
        topk = cfg.expert_router == "topk"
        router = f"{site}.router.topkroute_linear" if topk else f"{site}.router"
        parts = [(router, "proj")] + ([] if topk else [(f"{site}.threshold_fn", "threshold")])
        if cfg.noisy_router:
            parts.append((f"{site}.router.noise_linear" if topk else f"{site}.noise_linear", "noise"))
        for official, ours in parts:
            for p in ("weight", "bias"):
                src.put(f"{q}.router.{ours}.{p}", i, f"{official}.{p}")
    else:
        if mixture == "hydra":
            src.put(f"{q}.lora_A", i, f"{site}.lora_A.weight")
        else:
            src.put_stack(f"{q}.lora_A", i, [f"{site}.lora_A_l.{j}.weight" for j in e])
        src.put_stack(f"{q}.lora_B", i, [f"{site}.lora_B_l.{j}.weight" for j in e])
        src.put(f"{q}.router.proj.weight", i, f"{site}.router.weight")


def _prompt(src: _Source, i: int, prompt: torch.nn.Module) -> None:
    """The prompt: (E*L, dim) set-major rows -> (L, dim) / (E, L, dim); the gate; the prompt router."""
    q = f"layers.{i}.attention.prompt."
    fit = (lambda shape: lambda t: t.reshape(shape) if t.numel() == shape.numel() else t)
    src.put(q + "vectors", i, "attention.prompt.weight", fit(prompt.vectors.shape))
    src.put(q + "gate", i, "attention.prompt_gate", fit(prompt.gate.shape))
    if prompt.router is not None:
        for p in ("weight", "bias"):
            src.put(f"{q}router.proj.{p}", i, f"attention.prompt_router.{p}")


def _p_adapter(src: _Source, i: int, pa: torch.nn.Module) -> None:
    """The parallel adapter: single, hydra (shared down_proj) or E full adapters, and its router."""
    q = f"layers.{i}.feed_forward.p_adapter."
    e = range(pa.n_experts)
    for ours, official, shared in (("down", "down_proj", pa.shared_down), ("up", "up_proj", pa.n_experts == 1)):
        for p, suffix in (("weight", ""), ("bias", "_bias")):
            if shared:
                src.put(q + ours + suffix, i, f"p_adapter.{official}.{p}")
            else:
                src.put_stack(q + ours + suffix, i, [f"p_adapter.{official}_l.{j}.{p}" for j in e])
    if pa.router is not None:
        for p in ("weight", "bias"):
            src.put(f"{q}router.proj.{p}", i, f"p_adapter.router.{p}")


def _type_router(src: _Source, i: int, router: torch.nn.Module) -> None:
    """The block's type router; output rows permuted from the official type order to ours, by slot name."""
    q = f"layers.{i}.type_router."
    if router.mode == "unipeft":
        for group in router.gates:
            for p in ("weight", "bias"):
                src.put(f"{q}gates.{group}.{p}", i, f"{'lora' if group == 'lora' else 'prompt'}_gate.{p}")
        for gate, groups in (("lora_gate", {"lora"}), ("prompt_gate", {"prompt", "p_adapter"})):
            if not groups & set(router.gates):  # the official keeps both gates; a block without those types
                src.drop(i, gate + ".")       # never reads this one
        return
    order = [s for s in OFFICIAL_TYPE_ORDER if s in router.slots]
    perm = torch.tensor([order.index(s) for s in router.slots])  # our row j <- official row perm[j]

    def rows(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def permute(t: torch.Tensor) -> torch.Tensor:
            if t.shape[0] != len(perm):
                src.missing.append(f"layers.{i}.{name} with {len(perm)} rows (one per type: {', '.join(order)}), "
                                   f"found {t.shape[0]}")
                return t
            return t[perm]
        return permute

    linears = [("proj", "", True)] if hasattr(router, "proj") else [("w1", "w1.", False), ("w3", "w3.", False),
                                                                    ("w2", "w2.", True)]
    for ours, official, permuted in linears:
        for p in ("weight", "bias"):
            name = f"adapter_type_router.{official}{p}"
            src.put(f"{q}{ours}.{p}", i, name, rows(name) if permuted else (lambda t: t))
    if router.threshold is not None:
        for p in ("weight", "bias"):
            src.put(f"{q}threshold.{p}", i, f"adapter_threshold_fn.{p}")


def convert(blocks: dict[int, Block], cfg: MoAConfig, model: Transformer, checkpoint: str = "checkpoint",
            llama_path: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Our adapter state (every adapter tensor of `model`, attached with `cfg`) from the official tensors;
    a one-line FormatError naming `checkpoint` and the tensors missing, left over or of another shape
    (another base's shapes: the first such tensor against the base's, and --llama_path)."""
    src = _Source(blocks)
    mixture = "lora" if cfg.expert_num == 1 else ("hydra" if cfg.hydra_moe else "molora")
    for i, block in enumerate(model.layers):
        sites = getattr(block, "moa_sites", {})
        for site, target in OFFICIAL_SITES.items():
            slot, path = LORA_TARGETS[target]
            if slot in sites:
                _lora_site(src, i, site, f"layers.{i}.{path}", mixture, cfg)
        if PROMPT_SLOT in sites:
            _prompt(src, i, sites[PROMPT_SLOT])
        if P_ADAPTER_SLOT in sites:
            _p_adapter(src, i, sites[P_ADAPTER_SLOT])
        if sites and block.type_router.mode != "none":
            _type_router(src, i, block.type_router)
    expected = {k: tuple(v.shape) for k, v in adapter_state_dict(model).items()}
    wrong = [(k, tuple(src.out[k].shape), s) for k, s in expected.items()
             if k in src.out and tuple(src.out[k].shape) != s]
    left = src.left_over()
    if src.missing or left:  # names the flags did not expect: a flag problem, whatever the shapes
        problems = [f"missing {_cut(src.missing)}" if src.missing else "",
                    f"not used by these flags {_cut(left)}" if left else "",
                    f"{len(wrong)} tensors of other shapes" if wrong else ""]
        given = {k: v for k, v in cfg.to_dict().items() if v != _DEFAULTS.get(k)}
        raise FormatError(f"{checkpoint}: the flags do not match the checkpoint's tensors ("
                          + "; ".join(filter(None, problems)) + f"); flags other than the defaults: {given}")
    if wrong:
        _refuse_shapes(checkpoint, wrong, model.args, llama_path)
    return {k: src.out[k].detach().clone().contiguous() for k in expected}


_DEFAULTS = MoAConfig().to_dict()


def _cut(names: list[str], keep: int = 2) -> str:
    """The first `keep` names, and how many more there are."""
    more = f" and {len(names) - keep} more" if len(names) > keep else ""
    return f"{names[:keep]}{more}"


def _refuse_shapes(checkpoint: str, wrong: list[tuple[str, tuple, tuple]], args: ModelArgs,
                   llama_path: Optional[str]) -> None:
    """The one-line FormatError for adapter tensors whose shapes are not what the base needs: the first
    one (its shape against the base's), and, when a differing size is one of the base's sizes (width,
    attention or FFN width), that the checkpoint was probably trained on another base."""
    key, found, needed = wrong[0]
    base_sizes = {args.dim, args.ffn_hidden_dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim}
    other_base = any(a != b and b in base_sizes for k, f, n in wrong if len(f) == len(n) for a, b in zip(f, n))
    base = f"--llama_path {llama_path}" if llama_path else "the base its shapes imply (no --llama_path)"
    more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
    why = ("the checkpoint was probably trained on another base (give that one as --llama_path)" if other_base
           else "the flags do not match the checkpoint's tensors")
    raise FormatError(f"{checkpoint}: tensor {key} has shape {list(found)} but {base} needs {list(needed)}{more}; "
                      f"{why}")


def import_official(checkpoint: str | Path, out: str | Path, flags: str = "", args_path: Optional[str] = None,
                    llama_path: Optional[str] = None, log: Callable[[str], None] = print,
                    overwrite: bool = False) -> Path:
    """Convert `checkpoint` into `out/adapter.pth` + `out/adapter_params.json`, check that they load strictly
    into a model of the base's shape (built on the meta device), and return the adapter path. A ValueError
    naming `out` when it holds another adapter's files, unless `overwrite`."""
    held = [n for n in (ADAPTER_FILE, ADAPTER_PARAMS, BASE_TRAINED) if (Path(out) / n).exists()]
    if held and not overwrite:
        raise ValueError(f"--out {out}: holds another adapter ({', '.join(held)}); give another --out, or "
                         "--overwrite True to replace it")
    state, args = load_official(checkpoint)
    if args_path is not None:
        args = args_from(args_path)
    blocks = official_blocks(state, str(checkpoint))
    cfg, notes = build_config(blocks, args, parse_flags(flags) if flags else {})
    margs = model_args(state, llama_path)
    with torch.device("meta"):
        model = Transformer(margs)
    converted = convert(blocks, cfg, attach_adapters(model, cfg), str(checkpoint), llama_path)
    for note in notes:
        log(f"note: {note}")
    path = write_adapter_files(Path(out) / "adapter.pth", cfg, converted)
    with torch.device("meta"):
        check = Transformer(margs)
    load_adapter(check, path)  # strict: every key, every shape
    log(f"wrote {path} ({len(converted)} tensors, {sum(t.numel() for t in converted.values()):,} values; "
        f"type_router {cfg.type_router}, expert_router {cfg.expert_router}) and adapter_params.json")
    return path
