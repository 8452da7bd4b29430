"""moa/infer/dtype.py: `resolve_dtype` (float32 / bfloat16 as given; auto by the device's declared features:
CUDA's bf16 support, the CPU's flags, never a timing) and `settle_dtype` (a rerun reuses the recorded
choice).

These tests once pinned a matmul timing probe (bf16 chosen when it ran 1.3x faster than fp32). Under load
its choice flipped between processes (identical commands wrote different files; a rerun refused its own
partial file), so the rule is now the declared CPU flags (amx_bf16 or avx512_bf16: bfloat16), and these
tests pin flags -> choice, simulated with MOA_CPU_FLAGS.
"""
from __future__ import annotations

import time

import pytest
import torch

import moa.infer.dtype as dt


def test_explicit_names_as_given_and_unknown_refused():
    assert dt.resolve_dtype("float32", "cpu")[0] == torch.float32
    assert dt.resolve_dtype("bfloat16", "cpu")[0] == torch.bfloat16
    assert "as asked" in dt.resolve_dtype("float32", "cpu")[1]
    with pytest.raises(ValueError, match="--dtype.*float16"):
        dt.resolve_dtype("float16", "cpu")


@pytest.mark.parametrize("flags,want", [
    ("avx512f avx512_bf16 amx_tile amx_bf16", torch.bfloat16),  # AMX
    ("avx512f,avx512_bf16", torch.bfloat16),  # native bf16 dot products
    ("avx2 fma avx512f", torch.float32),  # bf16 emulated: slower than fp32
    ("", torch.float32),
])
def test_auto_on_cpu_chooses_by_declared_flags_and_reports_why(monkeypatch, flags, want):
    monkeypatch.setenv("MOA_CPU_FLAGS", flags)
    dtype, report = dt.resolve_dtype("auto", "cpu")
    assert dtype == want
    assert ("-> bfloat16" if want == torch.bfloat16 else "-> float32") in report and "MOA_CPU_FLAGS" in report


def test_settle_dtype_reuses_the_recorded_choice_and_keeps_explicit_names():
    def never():
        raise AssertionError("chose again although a choice was recorded")

    recorded = ({"dtype": "auto", "dtype_resolved": "bfloat16"}, "pred.jsonl.partial")
    assert dt.settle_dtype("dtype", "auto", never, recorded) == \
        ("bfloat16", "dtype auto: reusing dtype bfloat16 recorded in pred.jsonl.partial")
    assert dt.settle_dtype("dtype", "float32", never, recorded)[0] == "float32"
    assert dt.settle_dtype("dtype", "auto", lambda: (torch.float32, "rule"), None) == ("float32", "rule")


def test_auto_on_cuda_follows_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeGPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dt.resolve_dtype("auto", "cuda")[0] == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert dt.resolve_dtype("auto", "cuda")[0] == torch.float32


def test_auto_on_this_machine_reads_no_clock_and_is_the_same_every_time(monkeypatch):
    monkeypatch.setattr(time, "perf_counter", lambda: pytest.fail("a dtype choice read the clock"))
    first = dt.resolve_dtype("auto", "cpu")
    print(f"\n{first[1]}")
    assert first[0] in (torch.float32, torch.bfloat16)
    assert all(dt.resolve_dtype("auto", "cpu") == first for _ in range(5))
