"""moa/infer/dtype.py: `resolve_dtype` (float32 / bfloat16 as given; auto by device, on CPU by a matmul
probe). The choice rule is tested on mocked timings; the real probe only for its form and duration
(its numbers depend on the machine)."""
from __future__ import annotations

import re
import time

import pytest
import torch

import moa.infer.dtype as dt


@pytest.fixture(autouse=True)
def fresh_cache():
    dt.clear_probe_cache()
    yield
    dt.clear_probe_cache()


def mock_rates(monkeypatch, fp32: float, bf16: float) -> list:
    calls = []

    def fake(dtype, *a, **k):
        calls.append(dtype)
        return {torch.float32: fp32, torch.bfloat16: bf16}[dtype]

    monkeypatch.setattr(dt, "matmul_gflops", fake)
    return calls


def test_explicit_names_as_given_and_unknown_refused():
    assert dt.resolve_dtype("float32", "cpu")[0] == torch.float32
    assert dt.resolve_dtype("bfloat16", "cpu")[0] == torch.bfloat16
    assert "as asked" in dt.resolve_dtype("float32", "cpu")[1]
    with pytest.raises(ValueError, match="--dtype.*float16"):
        dt.resolve_dtype("float16", "cpu")


@pytest.mark.parametrize("fp32,bf16,want", [
    (250.0, 1900.0, torch.bfloat16),  # AMX: ~7.6x
    (100.0, 130.0, torch.bfloat16),  # exactly the margin
    (100.0, 129.0, torch.float32),  # faster, but not by the margin
    (78.0, 1.0, torch.float32),  # emulated bf16 (no avx512_bf16)
    (100.0, 0.0, torch.float32),  # bf16 matmul failed
])
def test_auto_on_cpu_chooses_by_mocked_rates_and_reports_both(monkeypatch, fp32, bf16, want):
    mock_rates(monkeypatch, fp32, bf16)
    dtype, report = dt.resolve_dtype("auto", "cpu")
    assert dtype == want
    assert f"{fp32:.0f} GFLOP/s in fp32" in report and f"{bf16:.0f} GFLOP/s in bf16" in report
    assert ("-> bfloat16" if want == torch.bfloat16 else "-> float32") in report
    assert dt.choose_cpu_dtype(fp32, bf16) == want


def test_probe_cached_per_process_and_thread_count(monkeypatch):
    calls = mock_rates(monkeypatch, 100.0, 300.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        dt.resolve_dtype("auto", "cpu")
        dt.resolve_dtype("auto", "cpu")
        assert calls == [torch.float32, torch.bfloat16]  # measured once
        torch.set_num_threads(2)
        dt.resolve_dtype("auto", "cpu")
        assert len(calls) == 4  # another thread count is another measurement
    finally:
        torch.set_num_threads(before)


def test_auto_on_cuda_follows_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeGPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dt.resolve_dtype("auto", "cuda")[0] == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert dt.resolve_dtype("auto", "cuda")[0] == torch.float32


def test_auto_on_this_machine_picks_one_within_seconds_naming_both_rates():
    t0 = time.perf_counter()
    dtype, report = dt.resolve_dtype("auto", "cpu")
    seconds = time.perf_counter() - t0
    print(f"\n{report} ({seconds:.2f} s)")
    assert dtype in (torch.float32, torch.bfloat16)
    m = re.search(r"([\d.]+) GFLOP/s in fp32 and ([\d.]+) GFLOP/s in bf16", report)
    assert m, report
    fp32, bf16 = float(m.group(1)), float(m.group(2))
    assert fp32 > 0
    assert (dtype == torch.bfloat16) == (bf16 >= dt.BF16_MARGIN * fp32) or abs(bf16 - dt.BF16_MARGIN * fp32) < 1
    assert seconds < 4  # ~0.7 s measured; slack for a shared machine
    t0 = time.perf_counter()
    assert dt.resolve_dtype("auto", "cpu") == (dtype, report)  # cached
    assert time.perf_counter() - t0 < 0.05


def _mm_with_costs(monkeypatch, first_s: float, per_call_s: float) -> list:
    """torch.mm replaced by one that sleeps `first_s` on its first call (kernel creation) and
    `per_call_s` on every later one; returns the list of calls' row counts."""
    real_mm, rows = torch.mm, []

    def fake(x, y):
        rows.append(x.shape[0])
        time.sleep(first_s if len(rows) == 1 else per_call_s)
        return real_mm(x, y)

    monkeypatch.setattr(torch, "mm", fake)
    return rows


def test_probe_does_not_time_the_kernel_creation_of_its_first_call(monkeypatch):
    # AMX under oneDNN: the first call creates kernels and reorders weights for far longer than a
    # call takes afterwards; timing it made a fast bf16 look emulated (8 GFLOP/s against ~1,800).
    rows = _mm_with_costs(monkeypatch, first_s=0.5, per_call_s=0.002)
    rate = dt.matmul_gflops(torch.float32, shape=(256, 64, 64), seconds=0.2)
    assert rows[:2] == [32, 32] and 256 in rows  # warm-up, timed small call, then full calls
    assert rate > 2 * 256 * 64 * 64 / 0.05 / 1e9  # a full call timed at well under 50 ms, not the warm-up


def test_probe_of_a_slow_dtype_stops_after_its_small_call(monkeypatch):
    rows = _mm_with_costs(monkeypatch, first_s=0.1, per_call_s=0.1)  # a quarter of the budget or more
    rate = dt.matmul_gflops(torch.float32, shape=(256, 64, 64), seconds=0.2)
    assert rows == [32, 32]  # no full-size call: an emulated bf16 would take seconds
    assert rate < 2 * 32 * 64 * 64 / 0.1 / 1e9
