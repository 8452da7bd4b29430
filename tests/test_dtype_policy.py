"""Adapters compute in the activations' dtype (docs/formats.md): on a bf16 base with fp32 adapters, the
adapters add no cast of a (tokens, dim)-sized activation, forward or backward; their gradients
arrive in fp32; and the result follows the fp32 model within bf16's precision."""
from __future__ import annotations

import collections
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llama.model import ModelArgs, Transformer
from moa import MoAConfig, attach_adapters
from moa.method.inject import reset_adapter_parameters
from tests.helpers import TINY_PARAMS, rel

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]

BSZ, SEQ = 2, 24
SPAN = f"0-{TINY_PARAMS['n_layers']}"
# The paper's Soft MoA command's 7 types (LoRA Q,K,V,O,FFN_DOWN, parallel adapter, prompt, SwiGLU router), the
# E-expert mixtures, and Sparse MoA (gathered tokens).
FLAGS = {
    "soft": dict(lora_layers=SPAN, lora_rank=8, lora_alpha=16, lora_targets="Q,K,V,O,FFN_DOWN",
                 p_adapter_layers=SPAN, p_adapter_size=8, prompt_layers=SPAN, prompt_len=5, swi_x=4),
    # E = 3 experts in every type: HydraLoRA sites, a hydra parallel adapter, three prompt sets.
    "mixtures": dict(lora_layers=SPAN, lora_rank=4, lora_targets="Q,V", expert_num=3, hydra_moe=True,
                     p_adapter_layers=SPAN, p_adapter_size=8, p_adapter_hydra=True, prompt_layers=SPAN,
                     prompt_len=5),
    "sparse": dict(lora_layers=SPAN, lora_rank=8, lora_targets="Q,K,V,O,FFN_DOWN", p_adapter_layers=SPAN,
                   p_adapter_size=8, type_router="sparse", max_threshold=0.5),
}


class ActivationCasts(TorchDispatchMode):
    """Counts dtype conversions (`_to_copy`) of activations: tensors laid out (B, T, ...) or (B*T, ...)
    (parameters, whatever their size, are not counted: casting those is the policy)."""

    def __init__(self):
        super().__init__()
        self.count = collections.Counter()
        self.from_moa: list[str] = []  # forward casts made by moa/ code (its backward casts follow from those)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shape = tuple(args[0].shape) if func.overloadpacket == torch.ops.aten._to_copy else ()
        if shape[:2] == (BSZ, SEQ) or shape[:1] == (BSZ * SEQ,):
            self.count[(args[0].dtype, (kwargs or {}).get("dtype"))] += 1
            ours = [f for f in traceback.extract_stack() if f.filename.startswith(str(ROOT))
                    and not f.filename.startswith(str(ROOT / "tests"))]
            if ours and ours[-1].filename.startswith(str(ROOT / "moa")):
                self.from_moa.append(f"{ours[-1].filename}:{ours[-1].lineno} {shape}")
        return func(*args, **(kwargs or {}))


def _model(flags: dict | None, dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY_PARAMS))
    if flags is not None:
        attach_adapters(model, MoAConfig(**flags))
        reset_adapter_parameters(model)
        with torch.no_grad():  # every expert and router computes something non-zero
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1)
    # Only the frozen base goes to `dtype`; adapters stay fp32 (as main_finetune.py with --bf16 True).
    with torch.no_grad():
        for p in model.parameters():
            if flags is None or not p.requires_grad:
                p.data = p.data.to(dtype)
    return model.train()


def _step(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.roll(-1, 1).flatten())
    loss.backward()
    return logits.detach().float()


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_adapters_add_no_activation_sized_casts_on_a_bf16_base(name):
    tokens = torch.randint(0, TINY_PARAMS["vocab_size"], (BSZ, SEQ), generator=torch.Generator().manual_seed(1))
    casts = {}
    for label, flags in (("bare", None), ("adapters", FLAGS[name])):
        model = _model(flags, torch.bfloat16)
        if flags is None:
            model.tok_embeddings.weight.requires_grad_(True)  # a backward through every block, as with adapters
        with ActivationCasts() as mode:
            _step(model, tokens)
        casts[label] = mode.count
        if flags is not None:
            assert mode.from_moa == []
    # The bare model's own fp32 passes (RMSNorm, RoPE, the loss) are all there is; the adapted model may
    # make fewer (its backward stops at the lowest adapter, the bare one runs down to the embedding).
    assert casts["adapters"] and all(n <= casts["bare"][k] for k, n in casts["adapters"].items()), casts


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_fp32_adapters_get_fp32_grads_and_follow_the_fp32_model(name):
    tokens = torch.randint(0, TINY_PARAMS["vocab_size"], (BSZ, SEQ), generator=torch.Generator().manual_seed(2))
    ref, half = _model(FLAGS[name], torch.float32), _model(FLAGS[name], torch.bfloat16)
    logits_ref, logits_half = _step(ref, tokens), _step(half, tokens)
    assert rel(logits_half, logits_ref) < 3e-2
    trained = {n: p for n, p in half.named_parameters() if p.requires_grad}
    grads = {n: p.grad for n, p in trained.items() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    # Only a sparse router's learned threshold gets no gradient (a comparison, without --threshold_ste).
    assert grads and all(".threshold." in n for n in set(trained) - set(grads))
    assert all(g.dtype == torch.float32 for g in grads.values())
    flat = torch.cat([g.flatten() for g in grads.values()])
    flat_ref = torch.cat([ref_grads[n].flatten() for n in grads])
    assert rel(flat, flat_ref) < 0.15  # bf16 activations through every layer, both ways
