"""Nothing that changes numbers depends on a timing (docs/formats.md, "Determinism"): `--dtype auto`
and the KV cache's dtype follow the hardware's declared features (`MOA_CPU_FLAGS` simulates another
CPU), explicit flags override them, the settings record requested and resolved values, and a rerun
reuses the recorded choice, so that a killed `--dtype auto` run resumed on a machine whose rule would
choose otherwise still writes the uninterrupted run's file byte for byte."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

import moa.infer.generate as inference
from example import parse_args
from llama.hardware import auto_dtype, auto_kv_cache_dtype, cpu_flags
from moa.files.settings import sidecar_path
from moa.infer.dtype import resolve_dtype
from moa.infer.generate import InferenceConfig, run_inference
from tests import test_example
from tests.helpers import kill_after_rows
from tests.test_example import tiny_rows, write_rows

pytestmark = pytest.mark.usefixtures("one_thread")
tiny_dir = test_example.tiny_dir  # the module-scoped fixture of test_example.py
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flags,want", [
    ("fpu sse avx2 fma", torch.float32),  # no native bf16: emulated, slower than fp32
    ("", torch.float32),
    ("avx2,avx512f,avx512_bf16", torch.bfloat16),
    ("avx512_bf16 amx_tile amx_bf16", torch.bfloat16),
    ("amx_bf16", torch.bfloat16),
])
def test_cpu_flags_decide_dtype_auto(monkeypatch, flags, want):
    monkeypatch.setenv("MOA_CPU_FLAGS", flags)
    assert cpu_flags() == frozenset(f for f in flags.replace(",", " ").split())
    assert auto_dtype("cpu")[0] == want
    dtype, report = resolve_dtype("auto", "cpu")
    assert dtype == want and "MOA_CPU_FLAGS" in report
    # the same answer every time, and no clock read: a timing can never flip it
    monkeypatch.setattr(time, "perf_counter", lambda: pytest.fail("a dtype choice read the clock"))
    assert [resolve_dtype("auto", "cpu")[0] for _ in range(5)] == [want] * 5


@pytest.mark.parametrize("flags,weights,want", [
    ("avx512_bf16", torch.bfloat16, torch.float32),  # no AMX: half-precision decode attention is ~6x slower
    ("", torch.float16, torch.float32),
    ("avx512_bf16 amx_bf16", torch.bfloat16, torch.bfloat16),
    ("", torch.float32, torch.float32),  # fp32 weights: never changed
])
def test_cpu_flags_decide_the_kv_cache_dtype(monkeypatch, flags, weights, want):
    monkeypatch.setenv("MOA_CPU_FLAGS", flags)
    assert auto_kv_cache_dtype(weights, "cpu") == want
    assert auto_kv_cache_dtype(weights, torch.device("meta")) == weights  # not a CPU: the weights'
    from tests.test_captured_decode import make_model

    model = make_model("bare").to(weights)
    model.setup_caches(1, 8)
    assert model.layers[0].attention.cache.k.dtype == want


def test_cuda_auto_follows_declared_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert auto_dtype("cuda")[0] == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert auto_dtype("cuda")[0] == torch.float32


def auto_config(tiny_dir: Path, data: Path, save: Path, **kw) -> InferenceConfig:
    flags = dict(ckpt_dir=str(tiny_dir), data_path=str(data), save_path=str(save), max_gen_len=48,
                 min_gen_len=4, max_batch_size=1, temperature=0.0, progress=False, dtype="auto")
    flags.update(kw)
    return InferenceConfig(**flags)


def test_killed_auto_run_resumed_on_a_machine_that_would_choose_fp32_reuses_bf16_exact(
        tiny_dir, tmp_path, monkeypatch, capsys):
    rows = tiny_rows(24)
    data = write_rows(tmp_path / "test.json", rows)
    save = tmp_path / "pred.jsonl"
    partial = Path(f"{save}.partial")
    cmd = [sys.executable, "example.py", "--ckpt_dir", str(tiny_dir), "--data_path", str(data),
           "--save_path", str(save), "--max_gen_len", "48", "--min_gen_len", "4", "--max_batch_size", "1",
           "--temperature", "0", "--progress", "False", "--dtype", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOA_CPU_FLAGS": "avx512_bf16"}
    kill_after_rows(cmd, ROOT, env, partial, rows=2)
    header = json.loads(partial.read_text().splitlines()[0])["settings"]
    assert (header["dtype"], header["dtype_resolved"]) == ("auto", "bfloat16")
    assert (header["kv_cache_dtype"], header["kv_cache_dtype_resolved"]) == ("auto", "float32")
    done_before = partial.read_text().count("\n") - 1

    monkeypatch.setenv("MOA_CPU_FLAGS", "")  # this machine's rule would choose float32
    assert resolve_dtype("auto", "cpu")[0] == torch.float32
    summary = run_inference(auto_config(tiny_dir, data, save))
    assert f"reusing dtype bfloat16 recorded in {partial}" in capsys.readouterr().out
    assert summary.resumed_rows == done_before and summary.generated_rows == 24 - done_before
    recorded = json.loads(Path(sidecar_path(save)).read_text())["settings"]
    assert (recorded["dtype"], recorded["dtype_resolved"]) == ("auto", "bfloat16")
    assert (recorded["kv_cache_dtype"], recorded["kv_cache_dtype_resolved"]) == ("auto", "float32")

    # A rerun of the complete file is left alone; an explicit other dtype is a real difference.
    assert run_inference(auto_config(tiny_dir, data, save)).left_alone
    with pytest.raises(ValueError, match="dtype 'auto' -> 'float32'"):
        run_inference(auto_config(tiny_dir, data, save, dtype="float32"))

    monkeypatch.setenv("MOA_CPU_FLAGS", "avx512_bf16")  # the uninterrupted run on the first machine
    ref = tmp_path / "ref.jsonl"
    run_inference(auto_config(tiny_dir, data, ref))
    assert "dtype auto -> bfloat16" in capsys.readouterr().out
    assert save.read_bytes() == ref.read_bytes()


def test_kv_cache_dtype_flag_overrides_the_rule_and_is_recorded(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOA_CPU_FLAGS", "amx_bf16")  # auto: bf16 weights over a bf16 cache
    data = write_rows(tmp_path / "test.json", tiny_rows(2))
    real_generate, seen = inference.generate, []

    def spy(model, prompts, *args, **kwargs):
        seen.append(kwargs["kv_cache_dtype"])
        return real_generate(model, prompts, *args, **kwargs)

    monkeypatch.setattr(inference, "generate", spy)
    cfg = auto_config(tiny_dir, data, tmp_path / "auto.jsonl", max_gen_len=4, max_batch_size=2)
    run_inference(cfg)
    assert seen == [torch.bfloat16]
    args = parse_args(["--ckpt_dir", str(tiny_dir), "--data_path", str(data), "--save_path",
                       str(tmp_path / "f32.jsonl"), "--kv_cache_dtype", "float32"])
    assert args.kv_cache_dtype == "float32"
    seen.clear()
    run_inference(auto_config(tiny_dir, data, tmp_path / "f32.jsonl", max_gen_len=4, max_batch_size=2,
                              kv_cache_dtype="float32"))
    assert seen == [torch.float32]
    recorded = json.loads(Path(sidecar_path(tmp_path / "f32.jsonl")).read_text())["settings"]
    assert (recorded["dtype_resolved"], recorded["kv_cache_dtype"], recorded["kv_cache_dtype_resolved"]) == \
        ("bfloat16", "float32", "float32")
    with pytest.raises(ValueError, match="--kv_cache_dtype"):
        auto_config(tiny_dir, data, tmp_path / "x.jsonl", kv_cache_dtype="float8")


def test_training_bf16_auto_recorded_and_reused_on_resume(tiny_dir, tmp_path, monkeypatch, capsys):
    import main_finetune

    data = write_rows(tmp_path / "train.json", tiny_rows(4))
    out = tmp_path / "out"
    argv = ["--llama_path", str(tiny_dir), "--data_path", str(data), "--output_dir", str(out), "--data_root",
            str(tmp_path), "--max_seq_len", "300", "--batch_size", "4", "--warmup_epochs", "0", "--num_workers",
            "0", "--lora_layers", "0-1", "--lora_targets", "Q,V", "--lora_rank", "2", "--bf16", "auto"]
    monkeypatch.setenv("MOA_CPU_FLAGS", "avx512_bf16")
    assert main_finetune.main([*argv, "--epochs", "2"]) == 0
    assert "--bf16 auto -> True" in capsys.readouterr().out
    recorded = json.loads((out / "train_settings.json").read_text())
    assert (recorded["bf16"], recorded["bf16_resolved"]) == ("auto", True)
    uninterrupted = torch.load(out / "checkpoint-1.pth", weights_only=False)
    assert (uninterrupted["args"]["bf16"], uninterrupted["args"]["bf16_resolved"]) == ("auto", True)
    (out / "checkpoint-1.pth").unlink()  # as if killed during the second epoch

    monkeypatch.setenv("MOA_CPU_FLAGS", "")  # this machine's rule would train in fp32
    assert main_finetune.main([*argv, "--epochs", "2", "--resume", str(out / "checkpoint-0.pth")]) == 0
    assert f"reusing bf16 True recorded in {out / 'train_settings.json'}" in capsys.readouterr().out
    resumed = torch.load(out / "checkpoint-1.pth", weights_only=False)
    assert (resumed["args"]["bf16"], resumed["args"]["bf16_resolved"]) == ("auto", True)
    for name, tensor in uninterrupted["model"].items():  # resumed = uninterrupted, in the same dtype
        assert torch.equal(resumed["model"][name], tensor), name
