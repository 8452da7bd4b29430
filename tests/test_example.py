"""example.py / moa/infer/generate.py: prediction files from a base model with or without adapters.

Most tests use a tiny random LLaMA written as a Meta base-model directory (byte tokenizer, fp32,
CPU); greedy comparisons are exact (token ids, whole files byte for byte). References: the same
run at batch size 1 (batching), one process (torchrun), an uninterrupted run (resume), a direct
`llama.generation.generate` call on the Alpaca prompt (SmolLM2).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moa.infer.generate as inference
from example import parse_args
from llama.checkpoint import load_model
from llama.generation import generate
from moa.infer.generate import InferenceConfig, encode_prompt, format_summary, resolve_max_seq_len, run_inference
from moa.train.data import build_prompt
from tests.helpers import TINY_PARAMS, kill_after_rows, random_state_dict, write_meta_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

ROOT = Path(__file__).resolve().parents[1]
ADAPTER_FLAGS = dict(lora_layers="0-2", lora_targets="Q,V,FFN_DOWN", lora_rank=4, p_adapter_layers="1-2",
                     p_adapter_size=8, prompt_layers="0-2", prompt_len=3, swi_x=2)


def tiny_rows(n: int) -> list[dict]:
    """Test rows whose prompts (bytes: ~190 + instruction) differ in length; every third has an input."""
    rows = []
    for i in range(n):
        row = {"instruction": f"Row {i}: add {i} and {2 * i + 1}." + " Think." * (i % 5),
               "input": f"Numbers {i}, {i + 7}." if i % 3 == 0 else "",
               "output": f"The answer is {3 * i + 1}.", "answer": str(3 * i + 1)}
        rows.append(row)
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model; output weights scaled so greedy choices are far from ties."""
    sd = random_state_dict(TINY_PARAMS, seed=3)
    sd["output.weight"] = sd["output.weight"] * 8
    d = tmp_path_factory.mktemp("tiny") / "base"
    write_meta_model_dir(d, sd=sd)
    return d


@pytest.fixture(scope="module")
def adapter_path(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """adapter.pth + adapter_params.json (+ base_trained.pth) of the tiny training run: main_finetune.py
    (2 epochs, 8 rows, --w_bias True, a large lr so that the output moves), then extraction."""
    import extract_adapter_from_checkpoint
    import main_finetune

    d = tmp_path_factory.mktemp("train")
    data = write_rows(d / "train.json", tiny_rows(8))
    out = d / "out"
    argv = ["--llama_path", str(tiny_dir), "--data_path", str(data), "--output_dir", str(out),
            "--data_root", str(d), "--w_bias", "True", "--max_seq_len", "300", "--batch_size", "4",
            "--epochs", "2", "--warmup_epochs", "0", "--lr", "0.05", "--num_workers", "0",
            *[a for k, v in ADAPTER_FLAGS.items() for a in (f"--{k}", str(v))]]
    assert main_finetune.main(argv) == 0
    assert extract_adapter_from_checkpoint.main(["--checkpoint", str(out / "checkpoint-1.pth")]) == 0
    return out / "adapter.pth"


def config(tiny_dir: Path, data: Path, save: Path, **kw) -> InferenceConfig:
    # fp32: the exact comparisons hold on any CPU (--dtype auto picks bf16 where a probe finds it faster)
    flags = dict(ckpt_dir=str(tiny_dir), data_path=str(data), save_path=str(save), max_gen_len=12,
                 min_gen_len=4, max_batch_size=4, temperature=0.0, progress=False, dtype="float32")
    flags.update(kw)
    return InferenceConfig(**flags)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_greedy_max_batch_size_1_and_4_identical_files_exact(tiny_dir, tmp_path):
    # A cap that binds for the longer prompts (~190-250 tokens): rows keep their own limit in any batch.
    data = write_rows(tmp_path / "test.json", tiny_rows(9))
    s1 = run_inference(config(tiny_dir, data, tmp_path / "bs1.jsonl", max_batch_size=1, max_seq_len=240, max_gen_len=30))
    s4 = run_inference(config(tiny_dir, data, tmp_path / "bs4.jsonl", max_batch_size=4, max_seq_len=240, max_gen_len=30))
    assert (tmp_path / "bs1.jsonl").read_bytes() == (tmp_path / "bs4.jsonl").read_bytes()
    out = lines(tmp_path / "bs4.jsonl")
    rows = tiny_rows(9)
    assert [r["instruction"] for r in out] == [r["instruction"] for r in rows]  # test order
    assert list(out[0])[:5] == ["generate", "output", "input", "instruction", "answer"]
    assert all(r["prompt_tokens"] + r["generate_tokens"] <= 240 for r in out)
    assert s4.hit_max_seq_len == sum(r["finish"] == "max_seq_len" for r in out) > 0
    assert s1.hit_max_seq_len == s4.hit_max_seq_len and s4.generated_rows == 9
    assert f"max_seq_len 240 (--max_seq_len): {s4.hit_max_seq_len} rows hit it" in format_summary(s4, 4)
    assert not list(tmp_path.glob("*.partial*"))


def test_torchrun_2_gloo_ranks_equal_one_process_file_exact(tiny_dir, tmp_path):
    data = write_rows(tmp_path / "test.json", tiny_rows(7))
    run_inference(config(tiny_dir, data, tmp_path / "one.jsonl", max_batch_size=2))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "example.py", "--ckpt_dir", str(tiny_dir), "--data_path", str(data),
           "--save_path", str(tmp_path / "two.jsonl"), "--max_gen_len", "12", "--min_gen_len", "4",
           "--max_batch_size", "2", "--temperature", "0", "--progress", "False", "--dtype", "float32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 rank(s)" in proc.stdout and "tokens/s" in proc.stdout and "rows/s" in proc.stdout
    assert proc.stdout.count("wrote ") == 1  # only rank 0 reports
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert not list(tmp_path.glob("*.partial*"))


def test_trained_adapter_loads_changes_output_and_sets_max_seq_len(tiny_dir, adapter_path, tmp_path):
    data = write_rows(tmp_path / "test.json", tiny_rows(3))
    bare = run_inference(config(tiny_dir, data, tmp_path / "bare.jsonl"))
    adapted = run_inference(config(tiny_dir, data, tmp_path / "moa.jsonl", adapter_path=str(adapter_path)))
    a, b = lines(tmp_path / "bare.jsonl"), lines(tmp_path / "moa.jsonl")
    assert [r["generate"] for r in a] != [r["generate"] for r in b]
    assert bare.max_seq_len == 8192 and adapted.max_seq_len == 300  # the adapter's training max_seq_len
    assert bare.base_trained == 0 and adapted.base_trained == 5  # 2 x 2 block norms + final norm (--w_bias)


def test_max_seq_len_0_lifts_the_adapters_training_cap_to_the_context_exact(tiny_dir, adapter_path, tmp_path):
    data = write_rows(tmp_path / "test.json", tiny_rows(1))
    lifted = run_inference(config(tiny_dir, data, tmp_path / "p.jsonl", adapter_path=str(adapter_path), max_seq_len=0))
    assert lifted.max_seq_len == 8192 and "--max_seq_len 0" in lifted.max_seq_len_source
    # The rule by hand: 0 -> context; a flag wins; else the training value (capped by the context).
    assert resolve_max_seq_len(0, 300, 8192)[0] == 8192
    assert resolve_max_seq_len(500, 300, 8192)[0] == 500
    assert resolve_max_seq_len(None, 300, 8192)[0] == 300
    assert resolve_max_seq_len(None, 9000, 8192)[0] == 8192
    assert resolve_max_seq_len(None, None, 8192)[0] == 8192
    with pytest.raises(ValueError, match="--max_seq_len 9000 exceeds the model's context length 8192"):
        resolve_max_seq_len(9000, None, 8192)


def test_adapter_strict_keys_missing_and_unexpected_fail(tiny_dir, adapter_path, tmp_path):
    data = write_rows(tmp_path / "test.json", tiny_rows(1))
    state = torch.load(adapter_path, weights_only=True)
    folder = tmp_path / "bad"
    folder.mkdir()
    params = json.loads((adapter_path.parent / "adapter_params.json").read_text())
    del params["files"]  # as older code wrote it (no hashes): the keys themselves are checked
    (folder / "adapter_params.json").write_text(json.dumps(params))
    dropped = sorted(state)[0]
    torch.save({k: v for k, v in state.items() if k != dropped}, folder / "adapter.pth")
    with pytest.raises(ValueError, match=f"missing keys.*{dropped}"):
        run_inference(config(tiny_dir, data, tmp_path / "p.jsonl", adapter_path=str(folder / "adapter.pth")))
    torch.save({**state, "layers.0.attention.wk.lora_A": state[dropped]}, folder / "adapter.pth")
    with pytest.raises(ValueError, match="unexpected keys.*layers.0.attention.wk.lora_A"):
        run_inference(config(tiny_dir, data, tmp_path / "p.jsonl", adapter_path=str(folder / "adapter.pth")))


def test_adapter_of_a_different_base_fails_naming_tensor_and_shapes(adapter_path, tmp_path):
    other = tmp_path / "wider"
    write_meta_model_dir(other, params={**TINY_PARAMS, "dim": 96, "n_heads": 6, "n_kv_heads": 2})
    data = write_rows(tmp_path / "test.json", tiny_rows(1))
    with pytest.raises(ValueError) as e:
        run_inference(config(other, data, tmp_path / "p.jsonl", adapter_path=str(adapter_path)))
    m = re.search(r"adapter tensor (\S+) has shape (\([\d, ]+\)), but the base model .* needs (\([\d, ]+\))"
                  r".*trained on a different base model", str(e.value))
    assert m is not None, str(e.value)
    assert "64" in m[2] and "96" in m[3]  # the adapter's dim 64, the base's dim 96
    deeper = tmp_path / "shallow"
    write_meta_model_dir(deeper, params={**TINY_PARAMS, "n_layers": 1})
    with pytest.raises(ValueError, match="out of range.*different base model"):
        run_inference(config(deeper, data, tmp_path / "p.jsonl", adapter_path=str(adapter_path)))


def test_resume_after_crash_and_truncated_line_no_duplicate_no_missing_exact(tiny_dir, tmp_path, monkeypatch):
    data = write_rows(tmp_path / "test.json", tiny_rows(7))
    run_inference(config(tiny_dir, data, tmp_path / "ref.jsonl", max_batch_size=2))
    save = tmp_path / "pred.jsonl"
    real_generate, calls = inference.generate, []

    def crash_on_third_batch(model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_generate(model, prompts, *args, **kwargs)

    monkeypatch.setattr(inference, "generate", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run_inference(config(tiny_dir, data, save, max_batch_size=2))
    partial = Path(f"{save}.partial")
    assert not save.exists() and len(partial.read_text().splitlines()) == 1 + 4  # settings + 2 batches
    with open(partial, "a") as f:  # a kill in the middle of a write leaves half a line
        f.write('{"index": 6, "generate": "hal')
    calls.clear()
    summary = run_inference(config(tiny_dir, data, save, max_batch_size=2))
    assert sum(calls) == 3 and summary.generated_rows == 3 and summary.resumed_rows == 4
    assert save.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
    assert not partial.exists()


def test_resume_after_sigkill_of_example_py_exact(tiny_dir, tmp_path):
    rows = tiny_rows(40)
    data = write_rows(tmp_path / "test.json", rows)
    save = tmp_path / "pred.jsonl"
    partial = Path(f"{save}.partial")
    cmd = [sys.executable, "example.py", "--ckpt_dir", str(tiny_dir), "--data_path", str(data),
           "--save_path", str(save), "--max_gen_len", "48", "--min_gen_len", "4", "--max_batch_size", "1",
           "--temperature", "0", "--progress", "False", "--dtype", "float32"]
    kill_after_rows(cmd, ROOT, {**os.environ, "OMP_NUM_THREADS": "1"}, partial, rows=3)
    assert not save.exists()
    done_before = partial.read_text().count("\n") - 1
    summary = run_inference(config(tiny_dir, data, save, max_gen_len=48, max_batch_size=4))
    assert summary.resumed_rows == done_before and summary.generated_rows == 40 - done_before
    out = lines(save)
    assert [r["instruction"] for r in out] == [r["instruction"] for r in rows]  # none missing, none twice
    run_inference(config(tiny_dir, data, tmp_path / "ref.jsonl", max_gen_len=48, max_batch_size=8))
    assert save.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


def test_complete_file_left_alone_overwrite_redoes_and_changed_settings_refused(tiny_dir, tmp_path):
    data = write_rows(tmp_path / "test.json", tiny_rows(3))
    save = tmp_path / "pred.jsonl"
    run_inference(config(tiny_dir, data, save))
    assert run_inference(config(tiny_dir, data, save)).left_alone
    save.write_text(save.read_text().replace('"generate": "', '"generate": "EDITED'))
    with pytest.raises(ValueError, match="no pred.jsonl.settings.json records.*--overwrite True"):
        run_inference(config(tiny_dir, data, save))  # a file its sidecar does not describe is not ours
    assert not run_inference(config(tiny_dir, data, save, overwrite=True)).left_alone
    assert "EDITED" not in save.read_text()
    save.unlink()
    Path(f"{save}.partial").write_text(json.dumps({"partial_of": save.name, "settings": {"seed": 99}}) + "\n")
    with pytest.raises(ValueError, match="other settings.*--overwrite True"):
        run_inference(config(tiny_dir, data, save))


def test_min_gen_len_cuts_long_input_then_prompt_left_and_counts(tiny_dir, tmp_path):
    rows = [{"instruction": "Sum the numbers.", "input": " ".join(str(i) for i in range(200)), "output": "", "answer": "1"},
            {"instruction": "Count the words. " * 30, "input": "", "output": "", "answer": "2"},
            {"instruction": "Short.", "input": "", "output": "", "answer": "3"}]
    data = write_rows(tmp_path / "test.json", rows)
    summary = run_inference(config(tiny_dir, data, tmp_path / "p.jsonl", max_seq_len=300, min_gen_len=40,
                                   max_gen_len=60))
    out = lines(tmp_path / "p.jsonl")
    assert [r["truncated"] for r in out] == ["input", "prompt_left", None]
    assert summary.truncated_input == 1 and summary.truncated_prompt_left == 1
    assert all(r["prompt_tokens"] <= 260 for r in out[:2]) and out[0]["prompt_tokens"] > 240  # as much input as fits
    assert out[0]["input"] == rows[0]["input"]  # the file keeps the row's own fields

    _, tokenizer = load_model(tiny_dir)
    tokens, how = encode_prompt(tokenizer, rows[1], 100)
    full = tokenizer.encode(build_prompt(rows[1]["instruction"]), bos=True, eos=False)
    assert how == "prompt_left" and tokens == [tokenizer.bos_id] + full[-99:]


def test_sampling_reproducible_with_seed_and_differs_with_another_seed(tiny_dir, tmp_path):
    data = write_rows(tmp_path / "test.json", tiny_rows(4))
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run_inference(config(tiny_dir, data, tmp_path / f"{name}.jsonl", temperature=1.0, top_p=0.9, seed=seed))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()


def test_cli_booleans_and_flag_errors(tmp_path):
    base = ["--ckpt_dir", "m", "--data_path", "d.json", "--save_path", "p.jsonl"]
    assert parse_args(base).overwrite is False
    assert parse_args(base + ["--overwrite"]).overwrite is True
    assert parse_args(base + ["--overwrite", "False"]).overwrite is False
    assert parse_args(base + ["--overwrite", "True", "--temperature", "0"]).temperature == 0.0
    for bad in (["--overwrite", "maybe"], ["--top_p", "0"], ["--max_gen_len", "0"]):
        with pytest.raises(SystemExit):
            parse_args(base + bad)


def test_smollm2_prediction_equals_direct_generate_on_alpaca_prompt_exact(smollm2_dir, tmp_path):
    rows = json.loads((ROOT / "data" / "math" / "AddSub" / "test.json").read_text())[:2]
    data = write_rows(tmp_path / "test.json", rows)
    run_inference(config(smollm2_dir, data, tmp_path / "p.jsonl", max_gen_len=10, max_batch_size=2))
    out = lines(tmp_path / "p.jsonl")
    model, tokenizer = load_model(smollm2_dir)
    prompt = tokenizer.encode(build_prompt(rows[1]["instruction"], rows[1]["input"]), bos=True, eos=False)
    expected = generate(model, [prompt], 10, tokenizer=tokenizer)[0]
    assert out[1]["generate"] == tokenizer.decode(expected) and out[1]["prompt_tokens"] == len(prompt)
    assert out[0]["answer"] == rows[0]["answer"] and out[0]["generate"].strip()


def test_compile_decode_writes_the_same_predictions_exact(tiny_dir, adapter_path, tmp_path):
    # The captured decode step (--compile_decode) against the eager one, through example.py's whole path,
    # with the trained adapters (and base_trained.pth) attached: the same file, and the flag recorded.
    data = write_rows(tmp_path / "test.json", tiny_rows(5))
    run_inference(config(tiny_dir, data, tmp_path / "eager.jsonl", adapter_path=str(adapter_path)))
    run_inference(config(tiny_dir, data, tmp_path / "captured.jsonl", adapter_path=str(adapter_path),
                         compile_decode=True))
    assert (tmp_path / "captured.jsonl").read_bytes() == (tmp_path / "eager.jsonl").read_bytes()
    settings = json.loads((tmp_path / "captured.jsonl.settings.json").read_text())["settings"]
    assert settings["compile_decode"] is True
    assert "compile_decode" not in json.loads((tmp_path / "eager.jsonl.settings.json").read_text())["settings"]
    assert parse_args(["--ckpt_dir", "m", "--data_path", "d", "--save_path", "p", "--compile_decode"]).compile_decode
