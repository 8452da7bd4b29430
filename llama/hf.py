"""Hugging Face model folders <-> our `Transformer` (Meta's parameter names and rotary layout).

A Hugging Face folder holds `config.json`, the weights as `model.safetensors` or as shards
`model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`, `tokenizer.json` (+
`tokenizer_config.json`, `generation_config.json`). Loading maps the config keys to Meta's
params.json keys, renames the tensors to Meta's names and undoes transformers' rotary layout of
`q_proj` / `k_proj`: transformers rotates halves (x[i], x[i + hd/2]) where Meta's checkpoints,
and our model, rotate interleaved pairs (x[2i], x[2i+1]); within each head, row i + j*hd/2 of
transformers' layout is row 2i + j of Meta's. Shards are read one tensor at a time
(`safetensors.safe_open`), each converted to the target dtype/device before the next is read.

Writing is the inverse: `save_hf_dir` writes a folder that transformers' `from_pretrained` loads.
Tied embeddings: our model always has its own `output` weight; a tied folder fills it with the
embedding tensor itself (shared, no copy), and the export ties when the two are equal.
(Over 400 lines: reading and writing are one mapping, its two directions kept side by side.)
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch

from llama.files import check_stored_dtype, read_json_object
from llama.params import ModelArgs, check_value, ffn_params
from llama.torchfile import new_temp_dir

CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"

SUPPORTED_MODEL_TYPES = ("llama", "qwen3")

# transformers' LLaMA names -> Meta's, per layer and global.
_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attention.q_norm",
    "self_attn.k_norm": "attention.k_norm",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                 "lm_head.weight": "output.weight"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
# Buffers some older transformers versions saved; the model recomputes them.
_IGNORED_RE = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

# LLaMA-3.1 / 3.2 RoPE scaling: the only `rope_type` besides "default" our model computes; every
# field but `factor` is fixed in `llama.rope.rope_inv_freq`.
_LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# The config.json fields the mapping reads -> the params.json key whose rule (`llama.params.check_value`)
# each must pass: intermediate_size and vocab_size are widths (as `dim`), max_position_embeddings a
# length (as `max_seq_len`), tie_word_embeddings a flag (as `qk_norm`). null counts as absent.
_CONFIG_RULES = {
    "hidden_size": "dim", "intermediate_size": "dim", "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "vocab_size": "dim",
    "head_dim": "attn_head_dim", "rms_norm_eps": "norm_eps", "rope_theta": "rope_theta",
    "max_position_embeddings": "max_seq_len", "tie_word_embeddings": "qk_norm",
}


# ---- the folder ---------------------------------------------------------------------------------

def is_hf_dir(model_dir: str | os.PathLike) -> bool:
    """True when `model_dir` is a Hugging Face folder: a `config.json` and no Meta `params.json`."""
    model_dir = Path(model_dir)
    return (model_dir / CONFIG).is_file() and not (model_dir / "params.json").exists()


def read_config(model_dir: str | os.PathLike) -> dict:
    """The dict of `model_dir/config.json`; FileNotFoundError / ValueError naming the file."""
    return read_json_object(Path(model_dir) / CONFIG, CONFIG, "a Hugging Face model folder holds config.json, "
                            "model.safetensors and tokenizer.json")


def _field(config: Mapping, name: str, where: str):
    if name not in config or config[name] is None:
        raise ValueError(f"{where}: field {name!r} is missing")
    return config[name]


def _check(where: str, field: str, value, key: str) -> None:
    """ValueError `WHERE: FIELD: expected ..., got VALUE (TYPE)` unless `value` passes params key `key`'s rule."""
    try:
        check_value(key, value, field)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def check_config(config: Mapping, where: str) -> None:
    """Every field of a config.json dict that the mapping reads (`_CONFIG_RULES`), when present and not
    null, of the right type and range: else a ValueError naming `where` (the file) and the field
    (`PATH/config.json: num_attention_heads: expected an integer >= 1, got 'four' (str)`)."""
    for field, key in _CONFIG_RULES.items():
        if config.get(field) is not None:
            _check(where, field, config[field], key)


def _require(config: Mapping, name: str, expected, where: str, why: str) -> None:
    """ValueError unless config[name] (when present) equals `expected`."""
    if name in config and config[name] is not None and config[name] != expected:
        raise ValueError(f"{where}: field {name!r} is {config[name]!r}; only {expected!r} is supported ({why})")


def _rope_params(config: Mapping, where: str) -> dict:
    """rope_theta, use_scaled_rope (+ rope_scaling_factor when not 8) from `rope_theta` and
    `rope_scaling` (transformers 4.x) or `rope_parameters` (transformers 5)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    field = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    if not isinstance(rope, dict):
        raise ValueError(f"{where}: field {field!r} must be an object, got {rope!r}")
    if config.get("rope_theta") is None and rope.get("rope_theta") is not None:
        _check(where, f"{field}.rope_theta", rope["rope_theta"], "rope_theta")
    theta = float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {"rope_theta": theta, "use_scaled_rope": False}
    if kind != "llama3":
        raise ValueError(f"{where}: field {field!r} has rope_type {kind!r}; supported: 'default', 'llama3'")
    for key, value in _LLAMA3_ROPE_FIXED.items():
        _check(where, f"{field}.{key}", rope.get(key, value), "rope_scaling_factor")
        if float(rope.get(key, value)) != value:
            raise ValueError(f"{where}: field {field!r}: {key} is {rope[key]!r}; LLaMA-3's RoPE scaling "
                             f"here supports only {value}")
    params = {"rope_theta": theta, "use_scaled_rope": True}
    factor = _field(rope, "factor", f"{where}: field {field!r}")
    _check(where, f"{field}.factor", factor, "rope_scaling_factor")
    factor = float(factor)
    if factor != 8.0:
        params["rope_scaling_factor"] = factor
    return params


def params_from_config(config: Mapping, where: str) -> dict:
    """Meta's params.json keys of a transformers `config.json` dict (`where`: its path, for errors).

    model_type 'llama' (LLaMA-3 / 3.1 / 3.2, SmolLM2): SiLU, no biases, head_dim = hidden_size /
    num_attention_heads. 'qwen3' (dense Qwen3): the same plus `qk_norm` and its own `head_dim`, no
    sliding window. Anything else: ValueError naming the file and the field.
    """
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{where}: field 'model_type' is {model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}")
    _require(config, "hidden_act", "silu", where, "SwiGLU with SiLU")
    _require(config, "attention_bias", False, where, "no biases in the attention projections")
    _require(config, "mlp_bias", False, where, "no biases in the MLP")
    check_config(config, where)
    dim, n_heads = int(_field(config, "hidden_size", where)), int(_field(config, "num_attention_heads", where))
    qwen3 = {}
    if model_type == "qwen3":
        _require(config, "use_sliding_window", False, where, "full attention in every layer")
        qwen3 = {"qk_norm": True, "attn_head_dim": int(config.get("head_dim") or dim // n_heads)}
    else:
        _require(config, "head_dim", dim // n_heads, where, "head_dim = hidden_size / num_attention_heads")
    multiple_of, ffn_mult = ffn_params(dim, int(_field(config, "intermediate_size", where)))
    return {**qwen3,
        "dim": dim,
        "n_layers": int(_field(config, "num_hidden_layers", where)),
        "n_heads": n_heads,
        "n_kv_heads": int(config.get("num_key_value_heads") or n_heads),
        "vocab_size": int(_field(config, "vocab_size", where)),
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": ffn_mult,
        "norm_eps": float(config.get("rms_norm_eps") or 1e-6),
        **_rope_params(config, where),
    }


def load_hf_params(model_dir: str | os.PathLike) -> dict:
    """Meta's params.json keys of the Hugging Face folder `model_dir` (from its config.json)."""
    return params_from_config(read_config(model_dir), str(Path(model_dir) / CONFIG))


def context_length(config: Mapping, where: str) -> int:
    """`max_position_embeddings` of a config.json dict: the context the model was trained for."""
    value = _field(config, "max_position_embeddings", where)
    _check(where, "max_position_embeddings", value, "max_seq_len")
    return value


def tied_embeddings(config: Mapping) -> bool:
    """`tie_word_embeddings` of a config.json dict (transformers' default for LLaMA: false)."""
    return bool(config.get("tie_word_embeddings", False))


# ---- tensors in -----------------------------------------------------------------------------------

def half_split_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a transformers q_proj / k_proj weight (n_heads*hd, in) -> Meta's interleaved rotary layout."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def interleaved_to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a Meta wq / wk weight (n_heads*hd, in) -> transformers' half-split rotary layout."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a Hugging Face folder, in the index's order (or the single file)."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
        names = list(dict.fromkeys(weight_map.values()))
        for name in names:
            if not (model_dir / name).is_file():
                raise FileNotFoundError(f"{model_dir / name}: shard named by {index} is missing")
        return [model_dir / name for name in names]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    raise FileNotFoundError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE}")


def meta_name(hf_name: str, where: str) -> Optional[str]:
    """Meta's name of a transformers LLaMA tensor name; None for a buffer we recompute."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    if _IGNORED_RE.match(hf_name):
        return None
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}.weight"
    raise ValueError(f"{where}: unexpected tensor {hf_name!r} for a LLaMA model")


def _hf_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(name, tensor, file) of every tensor of the folder, read one at a time."""
    from safetensors import safe_open

    for path in weight_files(model_dir):
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error type on a damaged header
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        with handle as f:
            for name in f.keys():
                yield name, f.get_tensor(name), path


def _to_meta_layout(key: str, t: torch.Tensor, params: Mapping) -> torch.Tensor:
    """Undo transformers' rotary row permutation of wq / wk (and of the per-head q/k norm weights,
    which scale the same head dims); other tensors unchanged."""
    if key.endswith(("attention.q_norm.weight", "attention.k_norm.weight")):
        return half_split_to_interleaved(t, 1)
    if key.endswith("attention.wq.weight"):
        return half_split_to_interleaved(t, params["n_heads"])
    if key.endswith("attention.wk.weight"):
        return half_split_to_interleaved(t, params.get("n_kv_heads") or params["n_heads"])
    return t


def load_hf_state_dict(model_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu", params: Optional[Mapping] = None,
                       ) -> dict[str, torch.Tensor]:
    """Meta-named state dict of a Hugging Face folder, wq/wk in Meta's rotary layout, each tensor in
    `dtype` on `device` (converted one at a time). Tied embeddings without `lm_head.weight` give
    `output.weight` = the embedding tensor itself. params: `load_hf_params(model_dir)` if None."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    params = params if params is not None else params_from_config(config, str(model_dir / CONFIG))
    out: dict[str, torch.Tensor] = {}
    for name, t, path in _hf_tensors(model_dir):
        key = meta_name(name, str(path))
        if key is None:
            continue
        if key in out:
            raise ValueError(f"{path}: tensor {name!r} appears in two shards")
        check_stored_dtype(t, name, str(path))
        t = t.to(device=device, dtype=dtype)
        out[key] = _to_meta_layout(key, t, params).contiguous()
        del t
    if "output.weight" not in out and tied_embeddings(config) and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def stored_dtype(model_dir: str | os.PathLike) -> torch.dtype:
    """The dtype of the first floating-point tensor of a Hugging Face folder (read from the header only)."""
    from safetensors import safe_open

    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                code = f.get_slice(name).get_dtype()
                if code in _SAFETENSORS_DTYPES:
                    return _SAFETENSORS_DTYPES[code]
    raise ValueError(f"{model_dir}: no floating-point tensor in its safetensors files")


# ---- tensors and config out ---------------------------------------------------------------------

def hf_name(key: str) -> str:
    """transformers' LLaMA name of a Meta tensor name (inverse of `meta_name`)."""
    for theirs, ours in _GLOBAL_NAMES.items():
        if key == ours:
            return theirs
    m = re.match(r"^layers\.(\d+)\.(.+)\.weight$", key)
    inverse = {ours: theirs for theirs, ours in _LAYER_NAMES.items()}
    if m and m.group(2) in inverse:
        return f"model.layers.{m.group(1)}.{inverse[m.group(2)]}.weight"
    raise ValueError(f"no transformers name for tensor {key!r}")


def to_hf_state_dict(sd: Mapping[str, torch.Tensor], args: ModelArgs, tie: bool) -> dict[str, torch.Tensor]:
    """Meta-named state dict -> transformers names and rotary layout; `lm_head.weight` left out when `tie`."""
    out = {}
    for key, t in sd.items():
        if tie and key == "output.weight":
            continue
        if key.endswith(("attention.q_norm.weight", "attention.k_norm.weight")):
            t = interleaved_to_half_split(t, 1)
        elif key.endswith("attention.wq.weight"):
            t = interleaved_to_half_split(t, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            t = interleaved_to_half_split(t, args.n_kv_heads)
        out[hf_name(key)] = t.detach().contiguous()
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def hf_config(args: ModelArgs, *, tie: bool, context: int, dtype: torch.dtype,
              bos_id: Optional[int], eos_ids: list[int]) -> dict:
    """A transformers `config.json` dict for `args` (LlamaForCausalLM; Qwen3ForCausalLM with `qk_norm`)."""
    rope_scaling = None
    if args.use_scaled_rope:
        rope_scaling = {"rope_type": "llama3", "factor": args.rope_scaling_factor, **_LLAMA3_ROPE_FIXED}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "rope_scaling": rope_scaling,
        "vocab_size": args.vocab_size, "max_position_embeddings": context, "tie_word_embeddings": tie,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
        "pretraining_tp": 1, "use_cache": True, "bos_token_id": bos_id,
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids, "torch_dtype": _dtype_name(dtype),
        **(_qwen3_config(args) if args.qk_norm else {}),
    }


def _qwen3_config(args: ModelArgs) -> dict:
    """The config.json keys that make a Qwen3ForCausalLM of `args` (full attention in every layer)."""
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": args.n_layers,
            "layer_types": ["full_attention"] * args.n_layers}


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '200KB', '1.5GiB', or bytes as an int (transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"--max_shard_size: expected a size such as 5GB, 200MB or 1GiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


def shard_groups(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Names split into consecutive groups of at most `max_bytes` (a larger tensor alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def _write_weights(tmp: Path, tensors: Mapping[str, torch.Tensor], max_bytes: int) -> None:
    """`model.safetensors`, or shards + `model.safetensors.index.json` when they exceed `max_bytes`."""
    from safetensors.torch import save_file

    groups = shard_groups(tensors, max_bytes)
    if len(groups) == 1:
        save_file(dict(tensors), str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, names in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(tmp / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def save_hf_dir(out_dir: str | os.PathLike, config: Mapping, tensors: Mapping[str, torch.Tensor],
                files: Mapping[str, bytes | str], max_shard_size: str | int = "5GB") -> Path:
    """Write a Hugging Face folder atomically (all of it appears at `out_dir`, or nothing does).

    config: the config.json dict; tensors: transformers-named (see `to_hf_state_dict`); files: the
    other files by name (tokenizer.json, tokenizer_config.json, generation_config.json, ...).
    `out_dir` must not exist (FileExistsError); its parent is created if needed.
    """
    out_dir = Path(out_dir)
    max_bytes = parse_size(max_shard_size)
    if max_bytes < 1:
        raise ValueError(f"--max_shard_size: must be positive, got {max_shard_size!r}")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists: remove it or choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_dir(out_dir)
    try:
        (tmp / CONFIG).write_text(json.dumps(dict(config), indent=2) + "\n")
        _write_weights(tmp, tensors, max_bytes)
        for name, content in files.items():
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---- tokenizer files out --------------------------------------------------------------------------

# Jinja versions of the chat formats of `llama.tokenizer.SpecialTokenChat` (transformers' apply_chat_template).
CHAT_JINJA = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
               "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}"),
    "llama3": ("{{ '<|begin_of_text|>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
               "+ '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
}
# Files of a Hugging Face folder that `save_hf_dir` writes itself (never copied from a source folder).
_WEIGHT_FILE_RE = re.compile(r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|config\.json)$")


def gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte -> a printable character (printable Latin-1 bytes map to
    themselves, the others to U+0100 onwards in byte order)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def onig_pattern(pattern: str) -> str:
    """A tiktoken (Rust regex) split pattern in the Oniguruma syntax of `tokenizers` (`\\U0004abcd` -> `\\x{4abcd}`)."""
    return re.sub(r"\\U([0-9a-fA-F]{8})", lambda m: "\\x{" + m.group(1).lstrip("0").lower() + "}", pattern)


def bpe_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges of a BPE whose priorities reproduce tiktoken's ranks: every split (left, right) of each
    multi-byte token into two tokens, ordered by the merged token's rank, then the parts' ranks."""
    found = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                found.append((rank, ranks[left], ranks[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def tiktoken_to_tokenizer_json(tok, vocab_size: int) -> str:
    """The `tokenizer.json` text of a `llama.tokenizer.Tiktoken`: byte-level BPE with the same ids,
    merges and split pattern (ranks >= vocab_size, bytes no text can produce, are left out), its
    special tokens, and a post-processor that adds BOS when the tokenizer has one."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = gpt2_byte_to_unicode()
    ranks = {b: r for b, r in tok.ranks.items() if r < vocab_size}
    spell = lambda b: "".join(alphabet[x] for x in b)  # noqa: E731
    vocab = {spell(b): r for b, r in ranks.items()}
    vocab.update({name: idx for name, idx in tok.special_tokens.items() if idx < vocab_size})
    merges = [(spell(a), spell(b)) for a, b in bpe_merges(ranks)]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(onig_pattern(tok.config.pattern)), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    specials = sorted((idx, name) for name, idx in tok.special_tokens.items() if idx < vocab_size)
    backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for _, name in specials])
    if tok.bos_id is not None:
        bos = tok.decode([tok.bos_id])
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.bos_id)])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend.to_str(pretty=True)


def _generation_config(bos_id: Optional[int], stop_tokens: list[int]) -> dict:
    return {"bos_token_id": bos_id, "eos_token_id": stop_tokens[0] if len(stop_tokens) == 1 else stop_tokens}


def converted_tokenizer_files(tok, vocab_size: int, context: int) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and generation_config.json of a tiktoken tokenizer."""
    name = lambda idx: None if idx is None else tok.decode([idx])  # noqa: E731
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(tok.bos_id),
              "eos_token": name(tok.eos_id), "model_max_length": context,
              "clean_up_tokenization_spaces": False, "chat_template": CHAT_JINJA[tok.chat_template]}
    return {"tokenizer.json": tiktoken_to_tokenizer_json(tok, vocab_size),
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            GENERATION_CONFIG: json.dumps(_generation_config(tok.bos_id, tok.stop_tokens), indent=2) + "\n"}


def copied_tokenizer_files(model_dir: str | os.PathLike) -> dict[str, bytes]:
    """Every plain file of a Hugging Face folder except config.json and the weights (tokenizer files,
    generation_config.json, chat_template.jinja, ...), as bytes."""
    return {p.name: p.read_bytes() for p in sorted(Path(model_dir).iterdir())
            if p.is_file() and not _WEIGHT_FILE_RE.match(p.name)}
