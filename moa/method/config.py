"""`MoAConfig`: every adapter flag by its command-line name, validated; layer spans; adapter_params.json.

Defaults switch every adapter type off (`*_layers = "0-0"`). A wrong value is a `ValueError`
that names the flag and says what was expected.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from moa.atomic import atomic_write_json
from moa.checks import read_json

if TYPE_CHECKING:
    from llama.params import ModelArgs

# --lora_targets name -> (slot name, path of the projection inside a TransformerBlock).
# The slot name is the key the type router uses for that LoRA type.
LORA_TARGETS: dict[str, tuple[str, str]] = {
    "Q": ("lora.wq", "attention.wq"),
    "K": ("lora.wk", "attention.wk"),
    "V": ("lora.wv", "attention.wv"),
    "O": ("lora.wo", "attention.wo"),
    "FFN_GATE": ("lora.w1", "feed_forward.w1"),
    "FFN_UP": ("lora.w3", "feed_forward.w3"),
    "FFN_DOWN": ("lora.w2", "feed_forward.w2"),
}
# Slot names: how a block's type router, the statistics and the parameter report name each type.
PROMPT_SLOT = "prompt"
P_ADAPTER_SLOT = "p_adapter"
LORA_SLOTS = tuple(slot for slot, _ in LORA_TARGETS.values())  # "lora.wq", ...
LORA_VARIANTS = ("lora", "dora")
TYPE_ROUTERS = ("soft", "sparse", "instance", "unipeft", "none")
EXPERT_ROUTERS = ("soft", "topk", "adamole")
_SPAN = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_spans(flag: str, text: str) -> list[tuple[int, int]]:
    """Parse `a-b[,c-d]` (end exclusive; `0-0` is empty) into [(a, b), ...]; ValueError naming `flag`."""
    if not isinstance(text, str):
        raise ValueError(f"--{flag}: expected layer spans like '0-32' or '0-8,24-32' as a string, got {text!r}")
    spans = []
    for part in text.split(","):
        m = _SPAN.match(part)
        if m is None:
            raise ValueError(f"--{flag}: {part!r} is not a span 'start-end' (end exclusive, e.g. '0-32'; '0-0' = none)")
        start, end = int(m.group(1)), int(m.group(2))
        if end < start:
            raise ValueError(f"--{flag}: span {part.strip()!r} ends before it starts")
        spans.append((start, end))
    return spans


def _as_bool(flag: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("True", "False"):
        return value == "True"
    raise ValueError(f"--{flag}: expected True or False, got {value!r}")


def _flag(default: Any, help: str) -> Any:
    """A MoAConfig field with the help text main_finetune.py shows for its flag."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class MoAConfig:
    """The adapter flags, by their command-line names (see docs/method.md for what each one means).

    Layer spans are strings `a-b[,c-d]` over block indices, end exclusive (`0-32` = blocks 0..31,
    `0-0` = none); their range is checked against the model in `layers()`.
    """

    lora_layers: str = _flag("0-0", "blocks with LoRA: spans a-b[,c-d], end exclusive; 0-0 none")
    lora_rank: int = _flag(8, "LoRA rank r")
    lora_targets: str = _flag("Q,K,V,O,FFN_DOWN", "LoRA sites, a subset of Q,K,V,O,FFN_UP,FFN_GATE,FFN_DOWN")
    lora_alpha: float = _flag(8.0, "LoRA scale alpha (the update is B A z * alpha / r)")
    use_rslora: bool = _flag(False, "rank-stabilised LoRA: scale alpha / sqrt(r) instead of alpha / r")
    lora_variant: str = _flag("lora", "lora | dora: DoRA, a trained magnitude per output row times the "
                                      "row-normalised W + dW (as PEFT's use_dora); plain LoRA sites only")
    lora_init: str = _flag("default", "default (A Kaiming-uniform, B 0) | pissa | pissa_niter_N: A, B from the top-r "
                                      "singular triplets of W (exact SVD, or N subspace iterations), trained "
                                      "against W - s B0 A0 and saved as a plain LoRA of rank 2r (PEFT's conversion)")
    expert_num: int = _flag(1, "E > 1: a homogeneous mixture of E experts inside every type (MoLoRA/HydraLoRA, "
                               "MoE parallel adapter, E prompt sets)")
    hydra_moe: bool = _flag(False, "with E > 1: LoRA shares one A per site, E heads B (HydraLoRA) instead of E "
                                   "full LoRAs (MoLoRA)")
    p_adapter_layers: str = _flag("0-0", "blocks with a parallel adapter beside the FFN (spans as --lora_layers)")
    p_adapter_size: int = _flag(16, "parallel adapter bottleneck width")
    p_adapter_hydra: bool = _flag(False, "with E > 1: the parallel adapters share `down`")
    prompt_layers: str = _flag("0-0", "blocks with learned prompt keys/values (spans as --lora_layers)")
    prompt_len: int = _flag(10, "prompt vectors per block")
    swi_x: int = _flag(0, "type router: 0 = Linear(dim, n_types); k > 0 = SwiGLU of hidden width k * n_types")
    type_router: str = _flag("soft", "per-block type router: soft | sparse | instance | unipeft | none")
    expert_router: str = _flag("soft", "router of the mixtures with E > 1: soft | topk | adamole")
    top_k: int = _flag(2, "experts kept per token by --expert_router topk")
    noisy_router: bool = _flag(False, "topk/adamole: in training add N(0,1) * softplus(Linear(z)) to the expert "
                                      "router logits (a trainable noise layer; no noise in eval mode)")
    max_threshold: float = _flag(0.5, "sparse: threshold = sigmoid(Linear(x)) * max_threshold (or the constant)")
    const_threshold: bool = _flag(False, "sparse: the constant threshold max_threshold instead of a learned one")
    threshold_ste: bool = _flag(False, "sparse, learned threshold: straight-through gradient (off = the paper's code)")
    lb_loss_coeff: float = _flag(0.0, "load-balance loss of the mixtures with E > 1 (0 in the paper's runs)")

    def __post_init__(self) -> None:
        for flag in ("hydra_moe", "p_adapter_hydra", "const_threshold", "threshold_ste", "noisy_router",
                     "use_rslora"):
            setattr(self, flag, _as_bool(flag, getattr(self, flag)))
        for flag in ("lora_layers", "p_adapter_layers", "prompt_layers"):
            parse_spans(flag, getattr(self, flag))
        for flag, low in (("lora_rank", 1), ("expert_num", 1), ("p_adapter_size", 1), ("prompt_len", 1),
                          ("swi_x", 0), ("top_k", 1)):
            value = getattr(self, flag)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{flag}: expected an integer >= {low}, got {value!r}")
        for flag in ("lora_alpha", "max_threshold", "lb_loss_coeff"):
            value = getattr(self, flag)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"--{flag}: expected a number, got {value!r}")
            setattr(self, flag, float(value))
        if not 0.0 <= self.max_threshold <= 1.0:
            raise ValueError(f"--max_threshold: expected a value in [0, 1] (router weights are sigmoids), "
                             f"got {self.max_threshold}")
        if self.lb_loss_coeff < 0:
            raise ValueError(f"--lb_loss_coeff: expected >= 0, got {self.lb_loss_coeff}")
        if isinstance(self.lora_targets, (list, tuple)):
            self.lora_targets = ",".join(self.lora_targets)
        if not isinstance(self.lora_targets, str):
            raise ValueError(f"--lora_targets: expected a comma-separated string, got {self.lora_targets!r}")
        targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        bad = [t for t in targets if t not in LORA_TARGETS]
        if bad or not targets or len(set(targets)) != len(targets):
            raise ValueError(f"--lora_targets: {self.lora_targets!r} must be distinct names from "
                             f"{','.join(LORA_TARGETS)}" + (f" (unknown: {bad})" if bad else ""))
        self.lora_targets = ",".join(targets)
        if self.lora_variant not in LORA_VARIANTS:
            raise ValueError(f"--lora_variant: expected one of {LORA_VARIANTS}, got {self.lora_variant!r}")
        if self.lora_variant == "dora" and self.expert_num > 1 and self.lora_layers != "0-0":
            raise ValueError(f"--lora_variant dora: DoRA normalises one weight W + B A per site, but --expert_num "
                             f"{self.expert_num} mixes {self.expert_num} LoRAs per token (MoLoRA/HydraLoRA); "
                             "use --expert_num 1")
        if pissa_iterations(self.lora_init) == -1:
            raise ValueError(f"--lora_init: expected default, pissa or pissa_niter_N (N >= 1), got {self.lora_init!r}")
        if self.lora_init != "default" and (self.expert_num > 1 or self.lora_variant != "lora") \
                and self.lora_layers != "0-0":
            raise ValueError(f"--lora_init {self.lora_init}: PiSSA starts one LoRA per site from W's principal "
                             f"singular vectors; not with --expert_num {self.expert_num} / --lora_variant "
                             f"{self.lora_variant} (use --expert_num 1 --lora_variant lora)")
        if self.type_router not in TYPE_ROUTERS:
            raise ValueError(f"--type_router: expected one of {TYPE_ROUTERS}, got {self.type_router!r}")
        if self.expert_router not in EXPERT_ROUTERS:
            raise ValueError(f"--expert_router: expected one of {EXPERT_ROUTERS}, got {self.expert_router!r}")
        if self.expert_router == "topk" and self.expert_num > 1 and self.top_k > self.expert_num:
            raise ValueError(f"--top_k: {self.top_k} exceeds --expert_num {self.expert_num}")
        if self.noisy_router and self.expert_router not in ("topk", "adamole"):
            raise ValueError(f"--noisy_router: only for --expert_router topk or adamole, got --expert_router "
                             f"{self.expert_router}")

    # ---- derived views ------------------------------------------------------------------------
    @property
    def lora_scale(self) -> float:
        """The factor on B A z: alpha / r, or alpha / sqrt(r) with --use_rslora."""
        return self.lora_alpha / (self.lora_rank ** 0.5 if self.use_rslora else self.lora_rank)

    @property
    def target_list(self) -> list[str]:
        """`lora_targets` as a list, e.g. ['Q', 'K', 'V', 'O', 'FFN_DOWN']."""
        return self.lora_targets.split(",")

    def layers(self, flag: str, n_layers: int) -> set[int]:
        """Block indices selected by the span flag `flag` (e.g. 'lora_layers') in a model of `n_layers`.

        A span reaching past `n_layers` is a `ValueError` naming the flag.
        """
        if flag not in ("lora_layers", "p_adapter_layers", "prompt_layers"):
            raise ValueError(f"layers(): {flag!r} is not a layer-span flag")
        selected: set[int] = set()
        for start, end in parse_spans(flag, getattr(self, flag)):
            if end > n_layers:
                raise ValueError(f"--{flag}: span {start}-{end} is out of range for a model of {n_layers} "
                                 f"layers (end is exclusive, at most {n_layers})")
            selected.update(range(start, end))
        return selected

    @property
    def has_unused_params(self) -> bool:
        """True when some trainable parameter never receives a gradient (the sparse learned threshold
        without --threshold_ste: a comparison): DDP then needs `find_unused_parameters=True`."""
        return self.type_router == "sparse" and not self.const_threshold and not self.threshold_ste

    # ---- adapter_params.json --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every flag (JSON-serialisable). Flags added after files were first written
        (`noisy_router`) are left out at their default, so such files stay as they were and code that
        predates the flag still reads them; `from_dict` restores the default."""
        params = dataclasses.asdict(self)
        for flag, default in _LATER_FLAGS.items():
            if params[flag] == default:
                del params[flag]
        return params

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "MoAConfig":
        """Inverse of `to_dict`; an unknown key is a `ValueError` naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"adapter params: unknown flag(s) {unknown}; expected a subset of {sorted(names)}")
        return cls(**params)

    def to_json(self, path: str) -> None:
        """Write `adapter_params.json` atomically (temporary file in the same folder, then rename)."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str) -> "MoAConfig":
        """The adapter flags of `adapter_params.json` (a training `max_seq_len` there is not a flag:
        see `parse_adapter_params`)."""
        return parse_adapter_params(read_json(path, "adapter params file"), path)[0]


# Flags newer than the first adapter files, with the default that leaves them out of `to_dict`.
_LATER_FLAGS = {"noisy_router": False, "use_rslora": False, "lora_variant": "lora", "lora_init": "default"}


def check_pissa_rank(cfg: MoAConfig, args: "ModelArgs") -> None:
    """Before the base's weights load: a ValueError unless --lora_rank fits every --lora_targets
    projection that --lora_init pissa* starts from (PiSSA takes the top-r singular triplets of the
    frozen weight (out, in), so r <= min(out, in)). `args`: the base's sizes, read from its params.json
    or config.json alone (`llama.checkpoint.read_model_args`)."""
    from llama.params import linear_shapes  # here: `llama` imports torch, this module does not

    if pissa_iterations(cfg.lora_init) is None or not cfg.layers("lora_layers", args.n_layers):
        return
    shapes = linear_shapes(args)
    names = [LORA_TARGETS[t][1].rsplit(".", 1)[1] for t in cfg.target_list]  # 'K' -> 'wk'
    small = [name for name in names if cfg.lora_rank > min(shapes[name])]
    if small:
        limit = min(min(shapes[name]) for name in names)
        sites = ", ".join(f"{name}: {shapes[name][0]}x{shapes[name][1]}" for name in small)
        raise ValueError(f"--lora_rank {cfg.lora_rank} with --lora_init {cfg.lora_init}: PiSSA takes the top-r "
                         f"singular vectors of each target (out x in), so r can be at most {limit} for "
                         f"--lora_targets {cfg.lora_targets} on this base; too large for {sites}")


def pissa_iterations(init: str) -> Optional[int]:
    """--lora_init -> None (default init), 0 (PiSSA by exact SVD), N (PiSSA by `torch.svd_lowrank` with
    N subspace iterations), -1 (not a known value)."""
    if init == "default":
        return None
    if init == "pissa":
        return 0
    m = re.fullmatch(r"pissa_niter_(\d+)", init) if isinstance(init, str) else None
    return int(m.group(1)) if m and int(m.group(1)) >= 1 else -1


# The key of adapter_params.json that records the content hash of each file written with it.
WRITE_MANIFEST = "files"


def parse_adapter_params(params: Any, path: str | os.PathLike) -> tuple[MoAConfig, Optional[int]]:
    """The parsed content of an `adapter_params.json` -> (the adapter flags, the training `max_seq_len`
    or None); a ValueError naming `path` when it is not an object of known flags.

    extract_adapter_from_checkpoint.py records the training `max_seq_len` beside the flags (example.py
    caps prompt + generation at it by default)."""
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a JSON object of adapter flags")
    params = dict(params)
    params.pop(WRITE_MANIFEST, None)  # a record of the write (moa.files.adapters), not a flag
    max_seq_len = params.pop("max_seq_len", None)
    if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                    or max_seq_len < 2):
        raise ValueError(f"{path}: max_seq_len must be an integer >= 2, got {max_seq_len!r}")
    try:
        return MoAConfig.from_dict(params), max_seq_len
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
