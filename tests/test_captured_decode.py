"""The captured decode step (llama/generation.py `decode_at_slot`, `captured_decode`, generate(compile_decode=True)):
the slot-as-tensor step against the eager step, the compiled generation against the eager one, token for
token, with adapters attached; one graph for the whole step; a failing compiler falls back with one warning."""
from __future__ import annotations

import warnings

import pytest
import torch

import llama.generation as generation
from llama.generation import decode_at_slot, decode_one, generate, prefill
from llama.model import ModelArgs, Transformer
from llama.rope import apply_rotary_emb, rope_table
from moa import MoAConfig, attach_adapters
from tests.helpers import rel

ARGS = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=160)
SPAN = f"0-{ARGS['n_layers']}"
PAPER_FLAGS = dict(lora_layers=SPAN, lora_rank=4, lora_alpha=8, lora_targets="Q,K,V,O,FFN_DOWN", hydra_moe=True,
                   p_adapter_layers=SPAN, p_adapter_size=8, p_adapter_hydra=True, swi_x=4)
CONFIGS = {
    "bare": None,
    "soft": dict(PAPER_FLAGS, prompt_layers=SPAN, prompt_len=3),  # the paper's Soft MoA command's 7 types
    "sparse": dict(PAPER_FLAGS, type_router="sparse", max_threshold=0.5),
    "instance": dict(PAPER_FLAGS, prompt_layers=SPAN, prompt_len=3, type_router="instance"),
}


def make_model(kind: str) -> Transformer:
    """A random fp32 model, with non-zero adapters of `kind` (every expert and router really computes)."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**ARGS))
    with torch.no_grad():
        model.output.weight.mul_(8)  # sharp logits: greedy choices far from ties
    if CONFIGS[kind] is not None:
        attach_adapters(model, MoAConfig(**CONFIGS[kind]))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.3)
    return model.eval()


PROMPTS = [[5, 9, 2, 33, 7, 1, 8], [4, 4, 61, 2], [11, 12, 13, 14, 15, 16, 17]]  # left-padded in a batch


def _steps(model: Transformer, prompts: list[list[int]], n: int, at_slot: bool) -> list[torch.Tensor]:
    """Prefill, then n greedy decode steps through `decode_one` (int slot) or `decode_at_slot` (tensor)."""
    tokens, mask = generation._left_padded(prompts, torch.device("cpu"))
    model.setup_caches(len(prompts), 64)
    try:
        logits = [prefill(model, tokens, mask)]
        slot = torch.tensor(tokens.shape[1])
        for i in range(n):
            token = logits[-1].argmax(-1)
            pos = tokens.shape[1] + i
            logits.append(decode_at_slot(model, token, slot) if at_slot else decode_one(model, token, pos))
            slot += 1
        return logits
    finally:
        model.clear_caches()


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("padded", [False, True])
@torch.inference_mode()
def test_slot_step_equals_int_step(kind: str, padded: bool) -> None:
    # The tensor-slot step attends over the whole cache with the unwritten slots masked: the same
    # logits as the int-slot step, which reads only the written slots.
    model = make_model(kind)
    prompts = PROMPTS if padded else [PROMPTS[0], PROMPTS[2]]
    ref, got = _steps(model, prompts, 6, at_slot=False), _steps(model, prompts, 6, at_slot=True)
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-6


def test_rope_real_pairs_equal_complex_table() -> None:
    # Under torch.compile the table is (cos, sin) pairs in real arithmetic: the same rotation.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=g)
    table = rope_table(torch.rand(2, 5, 4, generator=g) * 100)
    assert rel(apply_rotary_emb(x, torch.view_as_real(table)), apply_rotary_emb(x, table)) < 1e-6
    xb = x.bfloat16()
    assert apply_rotary_emb(xb, torch.view_as_real(table)).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["soft", "sparse", "instance"])
@torch.inference_mode()
def test_adapted_decode_step_is_one_graph(kind: str) -> None:
    # Routing reaches the sites through a thread-local attribute, which dynamo traces: no graph break.
    model = make_model(kind)
    model.setup_caches(1, 32)
    logits = prefill(model, torch.tensor([PROMPTS[0]]), None)
    explained = torch._dynamo.explain(decode_at_slot)(model, logits.argmax(-1), torch.tensor(len(PROMPTS[0])))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("kind", ["bare", "soft", "sparse"])
def test_compiled_generation_equals_eager_exact(kind: str) -> None:
    model = make_model(kind)
    eager = generate(model, PROMPTS, 20, stop_tokens=[])
    compiled = generate(model, PROMPTS, 20, stop_tokens=[], compile_decode=True)
    assert compiled == eager
    # Another batch of other lengths (the same rounded cache length) reuses the step: still equal.
    prompts = [p[:3] for p in PROMPTS[:2]]
    assert generate(model, prompts, 11, stop_tokens=[], compile_decode=True) == generate(model, prompts, 11,
                                                                                           stop_tokens=[])
    assert model.cache_shape is None  # the call's own cache is gone, as with the eager step


def test_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_compile(fn, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler found\nsecond line")
        return run

    monkeypatch.setattr(generation, "_CAPTURED", {})
    monkeypatch.setattr(torch, "compile", broken_compile)
    model = make_model("soft")
    eager = generate(model, PROMPTS, 12, stop_tokens=[])
    with pytest.warns(RuntimeWarning, match="decode step failed on cpu .*no C\\+\\+ compiler found\\); decoding eagerly"):
        assert generate(model, PROMPTS, 12, stop_tokens=[], compile_decode=True) == eager
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the device type now decodes eagerly
        assert generate(model, PROMPTS, 12, stop_tokens=[], compile_decode=True) == eager


def test_slot_step_refuses_what_it_cannot_be() -> None:
    model = make_model("bare")
    with pytest.raises(ValueError, match="setup_caches first"):
        model(torch.tensor([[3]]), slot=torch.tensor(0))
    model.setup_caches(1, 16)
    with pytest.raises(ValueError, match="one-token decode step"):
        model(torch.tensor([[3, 4]]), slot=torch.tensor(0))


def test_kv_cache_dtype_policy(monkeypatch) -> None:
    from llama.hardware import auto_kv_cache_dtype

    cpu = torch.device("cpu")
    assert auto_kv_cache_dtype(torch.float32, cpu) == torch.float32  # fp32 weights: never changed
    assert auto_kv_cache_dtype(torch.bfloat16, torch.device("meta")) == torch.bfloat16  # not a CPU
    monkeypatch.setenv("MOA_CPU_FLAGS", "avx512_bf16")  # the rule, by declared CPU flags (no AMX: fp32)
    assert auto_kv_cache_dtype(torch.bfloat16, cpu) == torch.float32
    monkeypatch.setenv("MOA_CPU_FLAGS", "amx_bf16")
    assert auto_kv_cache_dtype(torch.bfloat16, cpu) == torch.bfloat16
    model = make_model("bare")
    model.setup_caches(2, 16)
    assert model.layers[0].attention.cache.k.dtype == torch.float32


@pytest.mark.parametrize("kind", ["bare", "soft"])
@torch.inference_mode()
def test_fp32_cache_under_bf16_weights(kind: str) -> None:
    # A bf16 model decoding over an fp32 cache (what auto_kv_cache_dtype picks on CPUs without AMX):
    # attention runs in fp32 and hands bf16 back; the logits are the bf16 model's within bf16 rounding
    # (the cache-less forward over the whole sequence as the reference), and the captured step's
    # index_copy_ takes the cast keys.
    model = make_model(kind).to(torch.bfloat16)
    seq = torch.tensor([PROMPTS[0] + [3, 8, 21]])
    ref = model(seq)[:, -4:].float()
    for at_slot in (False, True):
        model.setup_caches(1, 32, dtype=torch.float32)
        got = [prefill(model, seq[:, :7], None)]
        for i in range(3):
            token, pos = seq[:, 7 + i], 7 + i
            got.append(decode_at_slot(model, token, torch.tensor(pos)) if at_slot else decode_one(model, token, pos))
        assert model.layers[0].attention.cache.k.dtype == torch.float32
        model.clear_caches()
        assert rel(torch.stack(got, 1), ref) < 2e-2
