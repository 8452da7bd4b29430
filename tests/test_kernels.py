"""llama/kernels.py: the compiled RMSNorm and SwiGLU compute what the eager formulas compute, forward and
backward, in a whole model too; a compiler that fails falls back to eager with one warning."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import llama.kernels as kernels
from llama.model import ModelArgs, Transformer
from moa import MoAConfig, attach_adapters
from tests.helpers import TINY_PARAMS, rel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def eager_afterwards():
    yield
    kernels.use_compiled_kernels(False)


def _inputs(dtype: torch.dtype, shape=(3, 5, 64)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g).to(dtype).requires_grad_(True) for _ in range(2)]


def _reference_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm written out: x / sqrt(mean(x^2) + eps) in fp64, times w."""
    xd = x.double()
    return (xd / (xd.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w.double()).to(x.dtype)


def test_eager_kernels_match_the_formulas_written_out():
    x, _ = _inputs(torch.float32)
    w = torch.rand(64) + 0.5
    assert rel(kernels.rms_norm(x, w, 1e-5), _reference_rms(x, w, 1e-5)) < 1e-6
    a, b = _inputs(torch.float32)
    assert rel(kernels.swiglu(a, b), a * torch.sigmoid(a) * b) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_equal_eager_forward_and_backward(dtype):
    kernels.use_compiled_kernels(True)
    w = (torch.rand(64) + 0.5).to(dtype).requires_grad_(True)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for name, call in (("rms_norm", lambda f, x, y: f(x, w, 1e-5)), ("swiglu", lambda f, x, y: f(x, y))):
        outs, grads = [], []
        for fn in (getattr(kernels, name), kernels.EAGER[name]):
            x, y = _inputs(dtype)
            w.grad = None
            out = call(fn, x, y)
            out.float().pow(2).sum().backward()
            outs.append(out.float())
            grads.append([t.grad.float() for t in (x, y, w) if t.grad is not None])
        assert kernels.compiled_kernels_active()[name]
        assert rel(outs[0], outs[1]) < tol
        assert len(grads[0]) == len(grads[1]) and all(rel(a, b) < tol for a, b in zip(*grads))


def test_a_model_with_compiled_kernels_equals_eager_logits_and_adapter_grads():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY_PARAMS))
    attach_adapters(model, MoAConfig(lora_layers="0-2", p_adapter_layers="0-2", swi_x=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    tokens = torch.randint(0, TINY_PARAMS["vocab_size"], (2, 9))

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(tokens)
        F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
        return logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    eager = run()
    kernels.use_compiled_kernels(True)
    compiled = run()
    for a, b in zip(compiled, eager):
        assert rel(a, b) < 1e-5


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return call
    monkeypatch.setattr(torch, "compile", broken_compile)
    report = kernels.use_compiled_kernels(True)
    assert "compiled" in report and all(kernels.compiled_kernels_active().values())
    x, _ = _inputs(torch.float32)
    w = torch.rand(64) + 0.5
    with pytest.warns(RuntimeWarning, match="torch.compile of rms_norm failed.*InvalidCxxCompiler"):
        out = kernels.rms_norm(x, w, 1e-5)
    assert torch.equal(out, kernels.rms_norm_eager(x, w, 1e-5))
    assert kernels.compiled_kernels_active() == {"rms_norm": False, "swiglu": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: rms_norm is eager for good
        kernels.rms_norm(x, w, 1e-5)
    assert kernels.use_compiled_kernels(False) == "elementwise kernels: eager"
    assert not any(kernels.compiled_kernels_active().values())


def test_a_genuine_input_error_still_raises():
    kernels.use_compiled_kernels(True)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError):
        kernels.swiglu(torch.randn(2, 3), torch.randn(2, 4))  # shapes that do not broadcast
