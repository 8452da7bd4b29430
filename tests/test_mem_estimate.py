"""The step-memory count (moa/train/memory.py) against the CPU allocator's measured peak.

The estimator runs on fake tensors with the rectangular label step that benchmarks/mem_estimate.py
uses at the 8B shape; the reference is the trainer's own step (`forward_backward` with the boolean
label mask, AdamW) on real CPU tensors, its peak read from the allocator's events by torch.profiler.
"""
from __future__ import annotations

import pytest
import torch
from bench_train import adapter_configs, make_batch
from torch._subclasses import FakeTensorMode

from llama.model import ModelArgs, Transformer
from moa import attach_adapters
from moa.train.memory import (
    ADAPTERS,
    WEIGHTS,
    LiveBytes,
    block_label_step,
    count_step_peak,
    frozen_state,
    measured_cpu_peak,
    storage_bytes,
    trainable_state,
)
from moa.train.schedule import make_adamw
from moa.train.trainer import CausalLMLoss, DistEnv, forward_backward

ARGS = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=64)
BATCH, SEQ, PROMPT = 4, 48, 16


def _model(grad_ckpt: bool) -> Transformer:
    model = Transformer(ARGS)
    attach_adapters(model, adapter_configs(ARGS.n_layers)["ours Soft MoA (paper's command)"])
    model.train()
    model.grad_checkpointing = grad_ckpt
    return model


def _measured_trainer_peak(grad_ckpt: bool) -> int:
    """Peak bytes of the trainer's second step on real tensors, from the allocator's events."""
    torch.manual_seed(0)
    model = _model(grad_ckpt)
    optimizer = make_adamw(model, 1e-4, 0.02)
    loss_module, env = CausalLMLoss(model), DistEnv(device=torch.device("cpu"))
    batch = make_batch(ARGS.vocab_size, BATCH, SEQ, PROMPT)

    def step() -> None:
        forward_backward(loss_module, [batch], env, False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW's state now exists, as in every later step
    live = storage_bytes(frozen_state(model) + trainable_state(model, optimizer) + [model._inv_freq])
    return measured_cpu_peak(step, live)


def _fake_estimate(grad_ckpt: bool) -> LiveBytes:
    with FakeTensorMode():
        model = _model(grad_ckpt)
        optimizer = make_adamw(model, 1e-4, 0.02)
        tokens = torch.randint(0, ARGS.vocab_size, (BATCH, SEQ))
        return count_step_peak(model, optimizer, block_label_step(model, optimizer, tokens, PROMPT, False),
                               ARGS.vocab_size)


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_fake_estimate_matches_measured_cpu_peak(grad_ckpt: bool) -> None:
    measured = _measured_trainer_peak(grad_ckpt)
    estimate = _fake_estimate(grad_ckpt).peak
    assert abs(estimate - measured) <= 0.10 * measured, (estimate, measured)


def test_checkpointing_lowers_the_estimate() -> None:
    assert _fake_estimate(True).peak < _fake_estimate(False).peak


def test_breakdown_counts_weights_and_trainable_state_exactly() -> None:
    counter = _fake_estimate(False)
    with FakeTensorMode():
        model = _model(False)
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counter.at_peak[WEIGHTS] == weights + sum(b.numel() * b.element_size() for b in model.buffers())
    # fp32 parameter + gradient + AdamW's two moments, plus one step counter per parameter tensor
    n_tensors = sum(1 for p in model.parameters() if p.requires_grad)
    assert counter.at_peak[ADAPTERS] <= adapters * 4 * 4 + n_tensors * 4
    assert counter.at_peak[ADAPTERS] >= adapters * 4 * 3 + n_tensors * 4


def test_live_bytes_counts_and_frees_real_storages() -> None:
    counter = LiveBytes(vocab_size=7)
    with counter:
        a = torch.ones(100)  # 400 bytes
        b = a.view(10, 10)  # a view: no new storage
        c = torch.zeros(3, 7)  # last dimension == vocab_size: logits, 84 bytes
        assert counter.breakdown()["activations"] == 400 and counter.breakdown()["logits"] == 84
        del a, b
        d = torch.ones(10)
    assert counter.peak == 484
    assert counter.breakdown()["activations"] == 40
    del c, d

