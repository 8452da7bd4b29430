"""Tokenizers: LLaMA-3 (tiktoken BPE ranks + chat format), LLaMA-2 (sentencepiece), Hugging Face
`tokenizer.json` (the `tokenizers` library), one loader. (Over 400 lines: the three families share
the stop-token, special-token and config logic kept here once.)

`load_tokenizer(path)` reads `tokenizer.model` and picks the class by the file's content, not
its name. A tiktoken model may carry a `tokenizer_config.json` beside it (docs/formats.md, "Tokenizers") that
overrides the LLaMA-3 defaults (see `TokenizerConfig`); this is how a model that is not Meta's
LLaMA-3 (e.g. SmolLM2 imported from GGUF, specials at ids 0..16) gets exactly its own ids.

Text is always encoded as plain text: a user's "<|eot_id|>" becomes ordinary tokens, never the
control token. Control tokens enter only through `bos`/`eos` and `format_dialog`.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import sentencepiece
import tiktoken

from llama.files import read_json_object

# Meta's LLaMA-3 split pattern (tiktoken / fancy-regex syntax).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# LLaMA-3.1 names of the first special tokens (ids 128000..128010); the rest of the 256 are
# `<|reserved_special_token_3|>` ... `<|reserved_special_token_247|>`.
LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]
LLAMA3_NUM_SPECIALS = 256

# The special tokens each chat template writes.
CHAT_TEMPLATES = {
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
}

# tiktoken's Rust core panics above ~400k chars per call and is quadratic on very long runs of
# whitespace or non-whitespace (github.com/openai/tiktoken/issues/195); Meta cuts the text at these sizes.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_RUN_RE = re.compile(r"\s+|\S+")  # `\s` here is exactly `str.isspace`

# A sample every sane split pattern must cover: tiktoken silently drops unmatched text.
_PATTERN_PROBE = "Hello, world! It's 2024-06-01.\n\n  x\t\u00e9t\u00e9 \u4f60\u597d 12345 <|a|>  \n"


def llama3_special_tokens(first_id: int) -> dict[str, int]:
    """Meta's 256 LLaMA-3.1 special tokens numbered from `first_id` (the highest BPE rank + 1,
    which is 128000 = the number of ranks in Meta's file)."""
    n_reserved = LLAMA3_NUM_SPECIALS - len(LLAMA3_NAMED_SPECIALS)
    names = LLAMA3_NAMED_SPECIALS + [f"<|reserved_special_token_{3 + i}|>" for i in range(n_reserved)]
    return {name: first_id + i for i, name in enumerate(names)}


@dataclass
class TokenizerConfig:
    """The schema of `tokenizer_config.json`; every key optional, defaults are Meta's LLaMA-3.

    `special_tokens` maps name -> id (ids may be low, e.g. 0..16, but never a BPE rank);
    None means Meta's 256 numbered from the highest rank + 1. `bos_token` None: no BOS.
    """

    pattern: str = LLAMA3_PATTERN
    special_tokens: Optional[dict[str, int]] = None
    bos_token: Optional[str] = "<|begin_of_text|>"
    eos_token: str = "<|end_of_text|>"
    stop_tokens: list[str] = field(default_factory=lambda: ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"])
    chat_template: str = "llama3"


def _check_messages(messages: list[dict]) -> None:
    for i, message in enumerate(messages):
        for key in ("role", "content"):
            if not isinstance(message, dict) or not isinstance(message.get(key), str):
                raise ValueError(f"format_dialog: message {i} needs a string '{key}', got {message!r}")


class SpecialTokenChat:
    """The "llama3" and "chatml" chat formats of a tokenizer that has `special_tokens` (name -> id),
    `chat_template` (one of CHAT_TEMPLATES' names) and `encode(text, bos, eos)`."""

    special_tokens: dict[str, int]
    chat_template: Optional[str]

    def format_dialog(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a chat, `messages` = [{"role": ..., "content": ...}, ...], in the
        tokenizer's template ("llama3" or "chatml"), ending with the assistant's header when
        `add_generation_prompt`. Text parts are encoded as plain text.
        """
        _check_messages(messages)
        if self.chat_template not in CHAT_TEMPLATES:
            raise ValueError(f"format_dialog: this tokenizer has no supported chat template "
                             f"(got {self.chat_template!r}; supported: {sorted(CHAT_TEMPLATES)})")
        sp = self.special_tokens
        if self.chat_template == "chatml":
            ids: list[int] = []
            for m in messages:
                ids += [sp["<|im_start|>"]] + self.encode(f"{m['role']}\n{m['content']}", False, False)
                ids += [sp["<|im_end|>"]] + self.encode("\n", False, False)
            if add_generation_prompt:
                ids += [sp["<|im_start|>"]] + self.encode("assistant\n", False, False)
            return ids
        ids = [sp["<|begin_of_text|>"]]
        for m in messages:
            ids += self._llama3_header(m["role"]) + self.encode(m["content"].strip(), False, False)
            ids.append(sp["<|eot_id|>"])
        if add_generation_prompt:
            ids += self._llama3_header("assistant")
        return ids

    def _llama3_header(self, role: str) -> list[int]:
        # Meta encodes the role, "\n\n" and the stripped content as separate calls.
        sp = self.special_tokens
        return ([sp["<|start_header_id|>"]] + self.encode(role, False, False) + [sp["<|end_header_id|>"]]
                + self.encode("\n\n", False, False))


class Tiktoken(SpecialTokenChat):
    """A tiktoken BPE tokenizer: Meta's LLaMA-3 by default, anything else via `TokenizerConfig`."""

    def __init__(self, ranks: dict[bytes, int], config: TokenizerConfig, name: str = "tokenizer") -> None:
        """`ranks`: bytes -> rank, as in `tokenizer.model`; `config` must be validated already."""
        self.ranks = ranks
        self.config = config
        specials = config.special_tokens
        if specials is None:  # Meta's 256, after the highest rank
            specials = llama3_special_tokens(max(ranks.values()) + 1)
        self.special_tokens = dict(specials)
        self.model = tiktoken.Encoding(name=name, pat_str=config.pattern, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.n_words: int = max(max(ranks.values()), max(self.special_tokens.values(), default=0)) + 1
        self.bos_id: Optional[int] = None if config.bos_token is None else specials[config.bos_token]
        self.eos_id: int = self.special_tokens[config.eos_token]
        self.stop_tokens: list[int] = [self.special_tokens[t] for t in config.stop_tokens]
        self.chat_template = config.chat_template

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        """Token ids of `text` (special-token text stays plain text), with BOS/EOS if asked.

        BOS is skipped when the tokenizer has none (`bos_id is None`).
        """
        ids: list[int] = [self.bos_id] if bos and self.bos_id is not None else []
        for piece in _split_for_tiktoken(text):
            ids.extend(self.model.encode_ordinary(piece))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special ids become their names, broken UTF-8 becomes U+FFFD."""
        return self.model.decode(list(ids))


class SentencePiece:
    """A sentencepiece tokenizer (LLaMA-2): BOS/EOS from the model, stop tokens = [EOS]."""

    def __init__(self, model_proto: bytes, path: Path) -> None:
        """`model_proto`: the bytes of a sentencepiece `tokenizer.model` read from `path`."""
        self.model = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self.n_words: int = self.model.vocab_size()
        self.bos_id: Optional[int] = self.model.bos_id() if self.model.bos_id() >= 0 else None
        if self.model.eos_id() < 0:
            raise ValueError(f"{path}: sentencepiece model has no EOS piece (eos_id = -1)")
        self.eos_id: int = self.model.eos_id()
        self.stop_tokens: list[int] = [self.eos_id]
        self.chat_template = "llama2"

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        """Token ids of `text` ("<s>" in the text stays plain text), with BOS/EOS if asked."""
        ids: list[int] = [self.bos_id] if bos and self.bos_id is not None else []
        return ids + self.model.encode(text) + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` (control pieces such as BOS/EOS decode to nothing)."""
        return self.model.decode(list(ids))

    def format_dialog(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a chat in Meta's LLaMA-2 format: an optional first "system" message goes
        inside the first user turn as `<<SYS>>\\n...\\n<</SYS>>\\n\\n`; then user/assistant turns
        alternate, each pair `BOS [INST] user [/INST] answer EOS`, a last user turn
        `BOS [INST] user [/INST]`. Its `[/INST]` is the generation prompt, so
        `add_generation_prompt` changes nothing here.
        """
        _check_messages(messages)
        turns = [dict(m) for m in messages]
        if turns and turns[0]["role"] == "system":
            if len(turns) < 2:
                raise ValueError("format_dialog: llama2 template needs a user message after the system message")
            turns[1]["content"] = f"<<SYS>>\n{turns[0]['content']}\n<</SYS>>\n\n{turns[1]['content']}"
            turns = turns[1:]
        for i, m in enumerate(turns):
            if m["role"] != ("user" if i % 2 == 0 else "assistant"):
                raise ValueError(f"format_dialog: llama2 template needs user/assistant turns alternating "
                                 f"from a user turn; turn {i} has role {m['role']!r}")
        ids: list[int] = []
        for i in range(0, len(turns), 2):
            if i + 1 < len(turns):
                text = f"[INST] {turns[i]['content'].strip()} [/INST] {turns[i + 1]['content'].strip()} "
                ids += self.encode(text, bos=True, eos=True)
            else:
                ids += self.encode(f"[INST] {turns[i]['content'].strip()} [/INST]", bos=True, eos=False)
        return ids


class HFTokenizer(SpecialTokenChat):
    """A Hugging Face `tokenizer.json` (the `tokenizers` library), with BOS, EOS, stop tokens and
    chat format from the folder's `tokenizer_config.json` / `generation_config.json`.

    BOS: the token the file's post-processor puts before a text (LLaMA-3: `<|begin_of_text|>`;
    SmolLM2 and Qwen3 add none, so `bos_id` is None). EOS: `eos_token` of tokenizer_config.json,
    else the first `eos_token_id` of generation_config.json. Stop tokens: EOS, then every
    `eos_token_id` of generation_config.json. Chat format: "llama3" or "chatml", whichever control
    tokens the folder's jinja `chat_template` writes (None when it writes neither).
    """

    def __init__(self, backend, tokenizer_config: dict, generation_config: dict, where: str) -> None:
        """backend: a `tokenizers.Tokenizer`; the two dicts: the folder's JSON files ({} if absent);
        where: the folder, for errors."""
        self.model = backend
        self.model.encode_special_tokens = True  # "<|im_end|>" typed in text stays plain text
        self.special_tokens = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
        self.n_words: int = backend.get_vocab_size(with_added_tokens=True)
        leading = _bos_of_post_processor(backend)
        self.bos_id: Optional[int] = leading[0] if leading else None
        self.eos_id: int = self._eos(tokenizer_config, generation_config, where)
        stops = [self.eos_id] + _id_list(generation_config.get("eos_token_id"))
        self.stop_tokens: list[int] = list(dict.fromkeys(stops))
        self.chat_template = _chat_format(tokenizer_config.get("chat_template"), self.special_tokens)

    def _eos(self, tokenizer_config: dict, generation_config: dict, where: str) -> int:
        name = _token_content(tokenizer_config.get("eos_token"))
        if name is not None:
            idx = self.model.token_to_id(name)
            if idx is None:
                raise ValueError(f"{where}/tokenizer_config.json: field 'eos_token' is {name!r}, which is not "
                                 "a token of tokenizer.json")
            return idx
        ids = _id_list(generation_config.get("eos_token_id"))
        if not ids:
            raise ValueError(f"{where}: no EOS token: neither tokenizer_config.json field 'eos_token' nor "
                             "generation_config.json field 'eos_token_id'")
        return ids[0]

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        """Token ids of `text` (special-token text stays plain text), with BOS/EOS if asked."""
        ids: list[int] = [self.bos_id] if bos and self.bos_id is not None else []
        ids += self.model.encode(text, add_special_tokens=False).ids
        return ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special ids become their names."""
        return self.model.decode(list(ids), skip_special_tokens=False)


def _token_content(value: object) -> Optional[str]:
    """A tokenizer_config.json token field: "<|x|>" or {"content": "<|x|>", ...} -> "<|x|>"; None if unset."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: object) -> list[int]:
    """generation_config.json `eos_token_id`: an int, a list of ints or null -> a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _bos_of_post_processor(backend) -> list[int]:
    """Ids the post-processor of `backend` puts before a text when special tokens are added."""
    probe = "a"
    plain = backend.encode(probe, add_special_tokens=False).ids
    full = backend.encode(probe, add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def _chat_format(template: object, specials: dict[str, int]) -> Optional[str]:
    """The name in CHAT_TEMPLATES whose control tokens the jinja `template` writes and the vocabulary has."""
    usable = [name for name, marks in CHAT_TEMPLATES.items() if all(m in specials for m in marks)]
    text = template if isinstance(template, str) else ""
    written = [name for name in usable if CHAT_TEMPLATES[name][-1] in text]
    return (written or usable or [None])[0]


def load_hf_tokenizer(model_dir: Union[str, os.PathLike]) -> HFTokenizer:
    """The `HFTokenizer` of a Hugging Face model folder (`tokenizer.json`, optional
    `tokenizer_config.json` and `generation_config.json`)."""
    import tokenizers

    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception on a malformed file
        raise ValueError(f"{path}: not a tokenizers file ({str(e)[:160]})") from None
    optional = [model_dir / "tokenizer_config.json", model_dir / "generation_config.json"]
    config, generation = (read_json_object(p) if p.is_file() else {} for p in optional)
    return HFTokenizer(backend, config, generation, str(model_dir))


Tokenizer = Union[Tiktoken, SentencePiece, HFTokenizer]


def _split_for_tiktoken(text: str) -> Iterator[str]:
    """Chunks of at most MAX_ENCODE_CHARS chars, cut further so that no run of whitespace or of
    non-whitespace exceeds MAX_RUN_CHARS (cuts at run start + k * MAX_RUN_CHARS, as Meta's)."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[start:start + MAX_ENCODE_CHARS]
        cut = 0
        for run in _RUN_RE.finditer(chunk):
            for pos in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield chunk[cut:pos]
                cut = pos
        yield chunk[cut:]


def _is_tiktoken_text(data: bytes) -> bool:
    """True when `data` is ASCII lines of "base64token rank" (a sentencepiece protobuf is binary)."""
    first = next((line for line in data.splitlines() if line.strip()), b"")
    return data.isascii() and re.fullmatch(rb"[A-Za-z0-9+/]+=*[ \t]+[0-9]+\s*", first) is not None


def _read_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    """Parse a tiktoken ranks file. Not `tiktoken.load.load_tiktoken_bpe`: that caches local files
    by path in a temp folder, so a file replaced at the same path would load stale ranks."""
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            if len(parts) != 2 or rank < 0:
                raise ValueError
        except (ValueError, IndexError, binascii.Error):
            raise ValueError(f"{path}: line {lineno}: expected 'base64token rank', got {line[:80]!r}") from None
        if token in ranks or rank in seen_ranks:
            raise ValueError(f"{path}: line {lineno}: token or rank {rank} appears twice")
        ranks[token] = rank
        seen_ranks.add(rank)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: the ranks must hold all 256 single bytes; missing {missing[:8]} ...")
    return ranks


def _load_config(config_path: Path, ranks: dict[bytes, int]) -> TokenizerConfig:
    """Read and validate `tokenizer_config.json` (LLaMA-3 defaults if the file is absent)."""
    where = str(config_path) if config_path.exists() else f"{config_path} (absent: LLaMA-3 defaults)"
    raw = read_json_object(config_path) if config_path.exists() else {}
    known = [f.name for f in dataclasses.fields(TokenizerConfig)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {known}")
    cfg = TokenizerConfig(**raw)

    if not isinstance(cfg.pattern, str):
        raise ValueError(f"{where}: key 'pattern' must be a string, got {cfg.pattern!r}")
    try:
        probe = tiktoken.Encoding(name="pattern-check", pat_str=cfg.pattern,
                                  mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={})
    except ValueError as e:
        raise ValueError(f"{where}: key 'pattern' is not a valid regex: {e}") from None
    if probe.decode(probe.encode_ordinary(_PATTERN_PROBE)) != _PATTERN_PROBE:
        raise ValueError(f"{where}: key 'pattern' does not match every character of {_PATTERN_PROBE!r} "
                         "(tiktoken drops unmatched text)")

    specials = cfg.special_tokens
    if specials is None:
        specials = llama3_special_tokens(max(ranks.values()) + 1)
    if not isinstance(specials, dict) or not all(
            isinstance(k, str) and type(v) is int and v >= 0 for k, v in specials.items()):
        raise ValueError(f"{where}: key 'special_tokens' must map names to non-negative int ids, "
                         f"got {specials!r}")
    rank_ids = set(ranks.values())
    for name, idx in specials.items():
        if idx in rank_ids:
            raise ValueError(f"{where}: key 'special_tokens': {name!r} has id {idx}, which is a BPE rank")
    if len(set(specials.values())) != len(specials):
        raise ValueError(f"{where}: key 'special_tokens': two names share an id")

    if not isinstance(cfg.chat_template, str) or cfg.chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"{where}: key 'chat_template' must be one of {sorted(CHAT_TEMPLATES)}, "
                         f"got {cfg.chat_template!r}")
    if not isinstance(cfg.stop_tokens, list):
        raise ValueError(f"{where}: key 'stop_tokens' must be a list of names, got {cfg.stop_tokens!r}")
    names = [("bos_token", cfg.bos_token), ("eos_token", cfg.eos_token)]
    names += [("stop_tokens", name) for name in cfg.stop_tokens]
    names += [("chat_template", name) for name in CHAT_TEMPLATES[cfg.chat_template]]
    for key, name in names:
        if key == "bos_token" and name is None:
            continue
        if not isinstance(name, str) or name not in specials:
            raise ValueError(f"{where}: key {key!r} names {name!r}, which is not among the special tokens "
                             f"({len(specials)} of them, e.g. {sorted(specials)[:4]})")
    return cfg


def load_tokenizer(path: Union[str, os.PathLike]) -> Tokenizer:
    """The tokenizer of a model directory (reads `tokenizer.model` in it) or of a model file.

    Tiktoken BPE ranks (ASCII lines "base64token rank") -> `Tiktoken`, configured by a
    `tokenizer_config.json` beside the file if there is one; a sentencepiece protobuf ->
    `SentencePiece`. A directory with a Hugging Face `tokenizer.json` and no `tokenizer.model` ->
    `HFTokenizer`. Raises `FileNotFoundError` naming a missing file and `ValueError` naming the
    file (and key) for anything malformed.
    """
    if Path(path).is_dir() and not (Path(path) / "tokenizer.model").exists() \
            and (Path(path) / "tokenizer.json").is_file():
        return load_hf_tokenizer(path)
    model_path = Path(path) / "tokenizer.model" if Path(path).is_dir() else Path(path)
    if not model_path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {model_path}")
    data = model_path.read_bytes()
    if not data.strip():
        raise ValueError(f"{model_path}: empty tokenizer file")
    config_path = model_path.parent / "tokenizer_config.json"
    if _is_tiktoken_text(data):
        ranks = _read_ranks(data, model_path)
        return Tiktoken(ranks, _load_config(config_path, ranks), name=model_path.name)
    try:
        tokenizer = SentencePiece(data, model_path)
    except RuntimeError as e:
        raise ValueError(f"{model_path}: neither tiktoken BPE ranks (base64 lines) nor a sentencepiece "
                         f"model ({str(e).strip()[:120]})") from None
    if config_path.exists():
        raise ValueError(f"{config_path}: tokenizer_config.json applies to tiktoken BPE ranks only; "
                         f"{model_path} is a sentencepiece model, which carries its own BOS/EOS")
    return tokenizer
