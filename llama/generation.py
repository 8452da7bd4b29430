"""Batched generation with a KV cache: one prefill over the left-padded prompts, then one-token decode steps.

Prompts of different lengths are left-padded; `Transformer` masks the pad slots and counts RoPE
positions over real tokens only, so each row generates exactly what it would generate alone.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Protocol

import torch

from llama.model import Transformer


class _HasStopTokens(Protocol):
    stop_tokens: list[int]


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row from logits (B, vocab) fp32: greedy when temperature == 0, else nucleus sampling.

    Nucleus sampling keeps the smallest set of most likely tokens whose probability mass reaches
    `top_p` (the token that crosses the threshold included), renormalises, and draws once.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    probs_sorted, idx = probs.sort(dim=-1, descending=True)
    mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
    probs_sorted = probs_sorted.masked_fill(mass_before > top_p, 0.0)
    choice = torch.multinomial(probs_sorted, num_samples=1, generator=generator)  # renormalises itself
    return idx.gather(-1, choice).squeeze(-1)


# Decode steps between two checks of "every row has stopped" (each check waits for the device).
DONE_CHECK_EVERY = 8
# A captured decode step reads the whole cache, so its length is a shape of the captured graph: caches
# made for a captured generation are rounded up to this many slots, so that batches of similar length
# share one compiled step instead of compiling their own.
CAPTURED_CACHE_MULTIPLE = 128


def prefill(model: Transformer, tokens: torch.Tensor, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Run the left-padded prompts (B, T) through the model into the cache; logits (B, vocab) of the last slot.
    token_mask (B, T) bool, True at real tokens; None when no row is padded (decode then needs no mask)."""
    h = model.hidden_states(tokens, 0, token_mask)[:, -1]
    return model.output(h).float()


def decode_one(model: Transformer, token: torch.Tensor, pos: int) -> torch.Tensor:
    """One decode step: token (B,) at cache slot `pos` -> logits (B, vocab) for the next slot."""
    return model(token[:, None], start_pos=pos)[:, -1]


def decode_at_slot(model: Transformer, token: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """`decode_one` with the cache slot a () int64 tensor: the same logits (B, vocab), computed over
    shapes that no step changes (`ForwardMeta.slot`), which is what a captured step needs."""
    return model(token[:, None], slot=slot)[:, -1]


# device type -> `decode_at_slot` compiled for it; a device type whose compiler failed maps to the eager one.
_CAPTURED: dict[str, Callable[[Transformer, torch.Tensor, torch.Tensor], torch.Tensor]] = {}


def captured_decode(device: torch.device) -> Callable[[Transformer, torch.Tensor, torch.Tensor], torch.Tensor]:
    """`decode_at_slot` captured as one graph by torch.compile: on a GPU with CUDA graphs (mode
    "reduce-overhead": the step's hundreds of small kernels replayed by one launch), on a CPU as
    inductor's fused C++ kernels. Compiled at the first call for each model and batch size (seconds
    to a minute), reused by every later step and generation. A compiler that fails (no C++
    toolchain, an unsupported device) switches this device type to the eager step for good, with one
    warning; the failing step is redone eagerly (its cache writes are idempotent)."""
    kind = device.type
    if kind not in _CAPTURED:
        mode = "reduce-overhead" if kind == "cuda" else None
        compiled = torch.compile(decode_at_slot, mode=mode, dynamic=False)

        def run(model: Transformer, token: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
            try:
                return compiled(model, token, slot)
            except Exception as e:  # any compiler failure means eager, which re-raises real errors
                _CAPTURED[kind] = decode_at_slot
                warnings.warn(f"torch.compile of the decode step failed on {kind} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); decoding eagerly",
                              RuntimeWarning, stacklevel=2)
                return decode_at_slot(model, token, slot)
        _CAPTURED[kind] = run
    return _CAPTURED[kind]


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_tokens: list[list[int]],
    max_gen_len: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_tokens: Optional[list[int]] = None,
    *,
    tokenizer: Optional[_HasStopTokens] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callable[[int, torch.Tensor], None]] = None,
    compile_decode: bool = False,
    kv_cache_dtype: Optional[torch.dtype] = None,
) -> list[list[int]]:
    """Generate up to `max_gen_len` new tokens for each prompt; returns the new tokens of each row,
    cut before its first stop token.

    stop_tokens: None means the tokenizer's (`tokenizer.stop_tokens`; none without a tokenizer),
        [] means none. Each row stops on its own; the loop ends once every row has stopped.
    temperature: 0 is greedy; otherwise nucleus sampling with `top_p`, reproducible through `generator`.
    callback(step, tokens): called after each step with the step index and the (B,) tokens just chosen.
    max_gen_len is shortened so that prompt + generation fits the model's `max_seq_len`.
    compile_decode: run the decode steps as one captured graph (`captured_decode`: CUDA graphs on a
        GPU), the same tokens as eager; the prefill stays eager. Pays off over many steps of one
        model and batch size, since the first step compiles.

    kv_cache_dtype: the KV cache's dtype; None: `setup_caches`' default (`llama.hardware.auto_kv_cache_dtype`).

    KV cache: a cache the caller made with `model.setup_caches` is reused (replaced by a larger one
    when it is too small, or by one of `kv_cache_dtype` when that is given and differs) and kept. Without
    one, a cache is made for this call and removed at the end, so that a later plain forward (training,
    scoring) runs without a cache, as before the call.
    """
    if not prompt_tokens:
        return []
    if stop_tokens is None:
        stop_tokens = list(tokenizer.stop_tokens) if tokenizer is not None else []
    max_seq_len = model.args.max_seq_len
    lens = [len(p) for p in prompt_tokens]
    for i, n in enumerate(lens):
        if n == 0:
            raise ValueError(f"prompt {i} is empty")
        if n >= max_seq_len:
            raise ValueError(f"prompt {i} has {n} tokens; max_seq_len {max_seq_len} leaves no room to generate")
    bsz, max_prompt = len(prompt_tokens), max(lens)
    total_len = min(max_seq_len, max_prompt + max_gen_len)
    max_gen_len = total_len - max_prompt

    own_cache = _fit_cache(model, bsz, total_len, max_seq_len, compile_decode, kv_cache_dtype)
    try:
        out, n_steps = _generate_loop(model, prompt_tokens, max_gen_len, temperature, top_p, stop_tokens,
                                      generator, callback, compile_decode)
    finally:
        if own_cache:
            model.clear_caches()
    result = []
    for row in out[:, :n_steps].tolist():
        cut = next((j for j, t in enumerate(row) if t in stop_tokens), len(row))
        result.append(row[:cut])
    return result


def _fit_cache(model: Transformer, bsz: int, total_len: int, max_seq_len: int, compile_decode: bool,
               kv_cache_dtype: Optional[torch.dtype]) -> bool:
    """Make the KV cache fit `bsz` rows of `total_len` tokens (and `kv_cache_dtype`, when given): the
    caller's cache is kept when it fits, replaced when not. True when the model had no cache (the call's
    own cache, removed at its end)."""
    own_cache = model.cache_shape is None
    if (own_cache or model.cache_shape[0] < bsz or model.cache_shape[1] < total_len
            or (kv_cache_dtype is not None and model.layers[0].attention.cache.k.dtype != kv_cache_dtype)):
        model.setup_caches(bsz, _cache_length(total_len, max_seq_len, compile_decode), dtype=kv_cache_dtype)
    return own_cache


def _cache_length(total_len: int, max_seq_len: int, compile_decode: bool) -> int:
    """Slots of a cache made for one call: what it needs, rounded up to `CAPTURED_CACHE_MULTIPLE` (at
    most the model's `max_seq_len`) for a captured step, whose graph has the cache length as a shape."""
    if not compile_decode:
        return total_len
    return min(max_seq_len, -(-total_len // CAPTURED_CACHE_MULTIPLE) * CAPTURED_CACHE_MULTIPLE)


def _generate_loop(model: Transformer, prompt_tokens: list[list[int]], max_gen_len: int, temperature: float,
                   top_p: float, stop_tokens: list[int], generator: Optional[torch.Generator],
                   callback: Optional[Callable[[int, torch.Tensor], None]],
                   compile_decode: bool = False) -> tuple[torch.Tensor, int]:
    """Prefill then decode into the model's (fitting) KV cache -> (new tokens (B, max_gen_len), steps run).

    Whether every row has stopped is read back every `DONE_CHECK_EVERY` steps only (no host sync in
    between), so up to that many steps may run past the last stop; `generate` cuts them off."""
    bsz, max_prompt = len(prompt_tokens), max(map(len, prompt_tokens))
    device = model.tok_embeddings.weight.device
    model.cache_valid.zero_()

    tokens, token_mask = _left_padded(prompt_tokens, device)

    stop = torch.tensor(stop_tokens, dtype=torch.long, device=device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    out = torch.zeros(bsz, max_gen_len, dtype=torch.long, device=device)
    n_steps = 0
    logits = prefill(model, tokens, token_mask)
    if compile_decode:
        step_fn = captured_decode(device)
        slot = torch.tensor(max_prompt, dtype=torch.long, device=device)  # advanced in place: no host value per step
    for step in range(max_gen_len):
        next_token = sample_top_p(logits, temperature, top_p, generator)
        out[:, step] = next_token
        n_steps = step + 1
        if callback is not None:
            callback(step, next_token)
        done |= torch.isin(next_token, stop)
        if step + 1 == max_gen_len or ((step + 1) % DONE_CHECK_EVERY == 0 and bool(done.all())):
            break
        if compile_decode:
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed: reuse its memory
            # Step 0 runs every guard (and compiles when nothing cached fits); the later steps of this
            # call change tensor values only, so they skip guard evaluation (hundreds of microseconds
            # a step with adapters attached).
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=step > 0):
                logits = step_fn(model, next_token, slot)
            slot += 1
        else:
            logits = decode_one(model, next_token, max_prompt + step)
    return out, n_steps


def _left_padded(prompt_tokens: list[list[int]], device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Prompts -> tokens (B, T_max) int64 left-padded with 0, and the (B, T_max) bool mask of real
    tokens (None when every prompt has T_max tokens)."""
    bsz, max_prompt = len(prompt_tokens), max(map(len, prompt_tokens))
    tokens = torch.zeros(bsz, max_prompt, dtype=torch.long, device=device)
    token_mask = torch.zeros(bsz, max_prompt, dtype=torch.bool, device=device)
    for i, p in enumerate(prompt_tokens):
        tokens[i, max_prompt - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        token_mask[i, max_prompt - len(p):] = True
    padded = any(len(p) < max_prompt for p in prompt_tokens)
    return tokens, token_mask if padded else None
