"""One writer per output, and no result reused or replaced under other settings:
through the real command lines, with real kills at real points (tiny models, a few rows)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moa.files.lock import OutputLock
from moa.files.settings import sidecar_path
from tests import test_example
from tests.helpers import make_lora_adapter
from tests.test_example import tiny_rows, write_rows

tiny_dir = test_example.tiny_dir  # the module-scoped fixture, shared with test_example.py
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Runs example.py after wrapping os.replace so that the process SIGKILLs itself right after renaming
# a file whose name ends with argv[1] into place (a kill at exactly that point of the final write).
KILL_AFTER_RENAME = """
import os, runpy, signal, sys
target, real = sys.argv.pop(1), os.replace
def replace(src, dst, *a, **k):
    real(src, dst, *a, **k)
    if str(dst).endswith(target):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def example_cmd(model: Path, data: Path, save: Path, *extra: str) -> list[str]:
    return [sys.executable, "example.py", "--ckpt_dir", str(model), "--data_path", str(data), "--save_path",
            str(save), "--max_gen_len", "12", "--min_gen_len", "4", "--max_batch_size", "4", "--temperature", "0",
            "--dtype", "float32", "--progress", "False", *extra]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def wait_for_lines(proc: subprocess.Popen, path: Path, n: int, timeout: float = 120) -> None:
    """Wait until `path` has `n` complete lines while `proc` runs; fails when it ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.02)
    pytest.fail(f"{path} did not reach {n} lines while the process ran")


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_two_example_py_on_one_save_path_second_stops_at_once_then_resume_exact(tiny_dir, tmp_path):
    data = write_rows(tmp_path / "test.json", tiny_rows(40))
    save, ref = tmp_path / "pred.jsonl", tmp_path / "ref.jsonl"
    partial = Path(f"{save}.partial")
    slow = example_cmd(tiny_dir, data, save, "--max_gen_len", "48", "--max_batch_size", "1")
    first = subprocess.Popen(slow, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_lines(first, partial, 3)  # settings + 2 rows
        first.send_signal(signal.SIGSTOP)  # holds its lock, mid-run, while the second starts
        second = run(slow, timeout=60)
        assert second.returncode != 0
        assert f"another run (pid {first.pid}) is writing {save}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        kill(first)
    header = partial.read_text().splitlines()[0]
    assert partial.read_text().count(header) == 1  # the second run wrote nothing
    with open(partial, "a") as f:  # a run that started the same file again repeats its header: not poison
        f.write(header + "\n")
    assert run(slow).returncode == 0
    assert run(example_cmd(tiny_dir, data, ref, "--max_gen_len", "48")).returncode == 0
    assert save.read_bytes() == ref.read_bytes()
    assert not partial.exists() and not Path(f"{save}.lock").exists()


def test_rerun_with_other_settings_or_unrelated_file_stops_naming_it_overwrite_replaces(tiny_dir, tmp_path):
    data = write_rows(tmp_path / "test.json", tiny_rows(6))
    save = tmp_path / "pred.jsonl"
    assert run(example_cmd(tiny_dir, data, save)).returncode == 0
    before = save.read_bytes()
    again = run(example_cmd(tiny_dir, data, save))
    assert again.returncode == 0 and "left alone" in again.stdout
    for flags, named in ((["--temperature", "0.7"], "temperature 0.0 -> 0.7"),
                         (["--max_gen_len", "10"], "max_gen_len 12 -> 10"),
                         (["--min_gen_len", "2"], "min_gen_len 4 -> 2")):
        proc = run(example_cmd(tiny_dir, data, save, *flags))
        assert proc.returncode != 0 and named in proc.stderr and "--overwrite True" in proc.stderr, proc.stderr
    adapter = tmp_path / "lora" / "adapter.pth"
    make_lora_adapter(tiny_dir, adapter)
    proc = run(example_cmd(tiny_dir, data, save, "--adapter_path", str(adapter)))
    assert proc.returncode != 0 and "adapter_path None -> " in proc.stderr
    assert save.read_bytes() == before
    replaced = run(example_cmd(tiny_dir, data, save, "--temperature", "0.7", "--overwrite", "True"))
    assert replaced.returncode == 0
    assert json.loads(Path(sidecar_path(save)).read_text())["settings"]["temperature"] == 0.7

    unrelated = tmp_path / "other.jsonl"
    unrelated.write_text("".join(json.dumps({"generate": str(i)}) + "\n" for i in range(6)))
    proc = run(example_cmd(tiny_dir, data, unrelated))
    assert proc.returncode != 0 and "no other.jsonl.settings.json records" in proc.stderr
    assert "left alone" not in proc.stdout


def test_kill_at_the_final_renames_leaves_no_partial_and_rerun_gives_the_uninterrupted_file(tiny_dir, tmp_path):
    data = write_rows(tmp_path / "test.json", tiny_rows(5))
    ref = tmp_path / "ref.jsonl"
    assert run(example_cmd(tiny_dir, data, ref)).returncode == 0
    for killed_after in ("pred.jsonl", "pred.jsonl.settings.json"):  # the file's rename, the sidecar's
        save = tmp_path / killed_after.replace(".", "_") / "pred.jsonl"
        proc = run([sys.executable, "-c", KILL_AFTER_RENAME, killed_after, *example_cmd(tiny_dir, data, save)[1:]])
        assert proc.returncode == -signal.SIGKILL
        assert Path(f"{save}.partial").exists()
        rerun = run(example_cmd(tiny_dir, data, save))
        assert rerun.returncode == 0, rerun.stderr
        assert save.read_bytes() == ref.read_bytes()
        assert not Path(f"{save}.partial").exists()
        assert ("left alone" in rerun.stdout) == (killed_after == "pred.jsonl")


def loss_cmd(model: Path, data: Path, save: Path, *extra: str) -> list[str]:
    return [sys.executable, "evaluate_loss.py", "--ckpt_dir", str(model), "--data_path", str(data),
            "--save_path", str(save), "--max_batch_size", "4", "--progress", "False", *extra]


def test_evaluate_loss_locked_file_and_other_max_seq_len_stop_naming_them(tiny_dir, tmp_path):
    data = write_rows(tmp_path / "test.json", tiny_rows(4))
    save = tmp_path / "loss" / "set_loss.jsonl"
    with OutputLock(save):  # this test process is the other run
        proc = run(loss_cmd(tiny_dir, data, save))
    assert proc.returncode != 0 and f"another run (pid {os.getpid()}) is writing {save}" in proc.stderr
    assert run(loss_cmd(tiny_dir, data, save)).returncode == 0
    assert "left alone" in run(loss_cmd(tiny_dir, data, save)).stdout
    proc = run(loss_cmd(tiny_dir, data, save, "--max_seq_len", "200"))
    assert proc.returncode != 0 and "max_seq_len 0 -> 200" in proc.stderr


def train_cmd(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "main_finetune.py", "--llama_path", str(model), "--data_path", str(data),
            "--output_dir", str(out), "--data_root", str(data.parent), "--max_seq_len", "300", "--batch_size", "2",
            "--epochs", "2", "--warmup_epochs", "0", "--lr", "0.01", "--num_workers", "0", "--log_every", "1",
            "--lora_layers", "0-2", "--lora_rank", "2", "--lora_targets", "Q,V", *extra]


def log_steps(out: Path) -> list[tuple[str, int]]:
    return [(r["kind"], r["step"]) for r in map(json.loads, (out / "log.txt").read_text().splitlines())]


def test_training_output_dir_guard_resume_trims_log_overwrite_replaces(tiny_dir, tmp_path):
    data = write_rows(tmp_path / "train.json", tiny_rows(4))
    out = tmp_path / "out"
    assert run(train_cmd(tiny_dir, data, out)).returncode == 0
    steps = log_steps(out)
    assert steps == [("step", 1), ("step", 2), ("epoch", 2), ("step", 3), ("step", 4), ("epoch", 4)]

    proc = run(train_cmd(tiny_dir, data, out))
    assert proc.returncode != 0 and "checkpoint-0.pth, checkpoint-1.pth" in proc.stderr and "--resume" in proc.stderr
    proc = run(train_cmd(tiny_dir, data, out, "--seed", "1", "--resume", str(out / "checkpoint-0.pth")))
    assert proc.returncode != 0 and "seed 0 -> 1" in proc.stderr
    with OutputLock(out):
        proc = run(train_cmd(tiny_dir, data, out, "--resume", str(out / "checkpoint-0.pth")))
    assert proc.returncode != 0 and f"another run (pid {os.getpid()}) is writing {out}" in proc.stderr
    assert run(train_cmd(tiny_dir, data, out, "--resume", str(out / "checkpoint-0.pth"))).returncode == 0
    assert log_steps(out) == steps  # epoch 1's records rewritten, none twice

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "checkpoint-0.pth").write_bytes((out / "checkpoint-0.pth").read_bytes())
    (foreign / "log.txt").write_text('{"kind": "step", "step": 1}\n')
    proc = run(train_cmd(tiny_dir, data, foreign))
    assert proc.returncode != 0 and "another run's files (checkpoint-0.pth, log.txt)" in proc.stderr
    assert run(train_cmd(tiny_dir, data, foreign, "--overwrite", "True")).returncode == 0
    assert log_steps(foreign) == steps


def test_registry_edit_while_another_holds_it_stops_at_once(tmp_path):
    registry = tmp_path / "tasks.json"
    with OutputLock(registry):
        proc = run([sys.executable, "scripts/registry.py", "add", "--registry", str(registry), "--domain", "d",
                    "--task", "t", "--adapter", str(tmp_path / "a.pth"), "--data", str(tmp_path / "d.json")])
    assert proc.returncode != 0 and f"another run (pid {os.getpid()}) is writing {registry}" in proc.stderr
    assert not registry.exists()


def test_train_selector_while_another_writes_its_file_stops_at_once(tmp_path):
    out = tmp_path / "selector.pt"
    with OutputLock(out):
        proc = run([sys.executable, "scripts/train_selector.py", "--adapter_registry", str(tmp_path / "none.json"),
                    "--ckpt_dir", str(tmp_path), "--out", str(out)])
    assert proc.returncode != 0 and f"another run (pid {os.getpid()}) is writing {out}" in proc.stderr
