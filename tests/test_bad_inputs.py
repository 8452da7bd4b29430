"""Damaged inputs, unwritable outputs and killed writers, through the real command lines, and stale
temporaries: each case exits with its status and one line on stderr naming the file or flag, never a
traceback, and leaves nothing half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moa.atomic import _HOST, STALE_AFTER_S, atomic_write_json, atomic_write_text
from moa.cli import one_line_errors
from moa.files.adapters import ADAPTER_PARAMS, read_adapter_files
from moa.files.settings import sha256_file as file_sha256
from moa.tasks.selector import load_selector
from tests.helpers import make_lora_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / "tests" / "fixtures" / "legacy"
ROOT_USER = os.geteuid() == 0  # root writes through any permission bits: those cases cannot be shown


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should never run",))


def start(script: str, *args: object, umask: int | None = None) -> subprocess.Popen:
    """Start `python SCRIPT ARGS` from the repository root, one thread."""
    def set_umask() -> None:
        if umask is not None:
            os.umask(umask)

    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=set_umask,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(script: str, *args: object, umask: int | None = None) -> subprocess.CompletedProcess:
    return finish(start(script, *args, umask=umask))


def one_line_error(proc: subprocess.CompletedProcess, status: int, *names: object) -> str:
    """The one stderr line of a failed run, after checking its status and that it names `names`."""
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr and "weights_only=False" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


def generate(base: Path, data: Path, save: Path, *extra: object) -> subprocess.CompletedProcess:
    return run("example.py", "--ckpt_dir", base, "--data_path", data, "--save_path", save, "--max_gen_len", 2,
               "--dtype", "float32", "--progress", "False", *extra)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "test.json"
    path.write_text(json.dumps([{"instruction": "Add 1 and 2.", "input": "", "output": "3", "answer": "3"}]))
    return path


@pytest.fixture
def base(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny base model that a test may damage."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "base"))


@pytest.fixture
def adapter(tiny_model_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "ad" / "adapter.pth"
    make_lora_adapter(tiny_model_dir, path)
    return path


# ---- 3: damaged base models -----------------------------------------------------------------------

@pytest.mark.parametrize("key, value, expected", [("n_layers", "2", "an integer"), ("norm_eps", "1e-5", "a number"),
                                                  ("use_scaled_rope", "yes", "true or false"),
                                                  ("n_heads", 0, "an integer >= 1")])
def test_params_json_value_of_the_wrong_type_is_one_line(base, data, tmp_path, key, value, expected):
    params = json.loads((base / "params.json").read_text())
    (base / "params.json").write_text(json.dumps({**params, key: value}))
    proc = generate(base, data, tmp_path / "pred.jsonl")
    one_line_error(proc, 1, base / "params.json", key, repr(value), expected)
    assert not (tmp_path / "pred.jsonl").exists()


def test_truncated_shard_is_one_line_naming_it_in_training_and_generation(base, data, tmp_path):
    shard = base / "consolidated.00.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    one_line_error(generate(base, data, tmp_path / "pred.jsonl"), 1, shard, "damaged")
    proc = run("main_finetune.py", "--llama_path", base, "--data_path", data, "--output_dir", tmp_path / "out",
               "--lora_layers", "0-2", "--lora_rank", 2, "--epochs", 1, "--batch_size", 1, "--num_workers", 0,
               "--device", "cpu")
    one_line_error(proc, 2, shard, "damaged")


@pytest.mark.parametrize("zip_format", [True, False])
def test_crafted_pickle_shard_is_refused_in_one_line(base, data, tmp_path, zip_format):
    shard = base / "consolidated.00.pth"
    torch.save({"tok_embeddings.weight": _Evil()}, shard, _use_new_zipfile_serialization=zip_format)
    line = one_line_error(generate(base, data, tmp_path / "pred.jsonl"), 1, shard, "other than tensors")
    assert "os.system" in line or "posix.system" in line


def test_a_raw_pickle_shard_names_what_it_would_import(base, data, tmp_path):
    """A plain pickle.dump (not torch.save): torch's message names no class, so the file's opcodes are
    read (without running them) to say what it would have imported."""
    import pickle

    shard = base / "consolidated.00.pth"
    with open(shard, "wb") as f:
        pickle.dump({"tok_embeddings.weight": _Evil()}, f)
    line = one_line_error(generate(base, data, tmp_path / "pred.jsonl"), 1, shard, "other than tensors")
    assert "os.system" in line or "posix.system" in line


def test_a_long_torch_message_is_cut_at_a_sentence_or_a_word():
    from llama.torchfile import _first_line

    miniz = RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory. "
                         "This is an internal miniz error. If you are seeing it, please report it\nmore")
    assert _first_line(miniz) == "PytorchStreamReader failed reading zip archive: failed finding central directory."
    words = RuntimeError(" ".join(["word"] * 40))
    assert _first_line(words, limit=22) == "word word word word ..."


# ---- 4: operating-system errors and unwritable outputs, found before any model loads ----------------

def test_outputs_under_a_file_are_refused_before_loading(tiny_model_dir, data, adapter, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    t0 = time.perf_counter()
    cases = [  # started together: each is mostly the interpreter's start-up
        (start("example.py", "--ckpt_dir", tiny_model_dir, "--data_path", data, "--save_path", afile / "pred.jsonl"),
         1, "--save_path"),
        (start("evaluate_loss.py", "--ckpt_dir", tiny_model_dir, "--data_path", data, "--save_path",
               afile / "loss.jsonl"), 2, "--save_path"),
        (start("main_finetune.py", "--llama_path", tiny_model_dir, "--data_path", data, "--output_dir",
               afile / "out"), 2, "--output_dir"),
        (start("scripts/lora_tools.py", "combine", "--adapters", adapter, "--weights", 1, "--method", "cat",
               "--out", afile / "c" / "adapter.pth"), 1, "--out"),
        (start("scripts/registry.py", "add", "--registry", afile / "reg.json", "--domain", "d", "--task", "t",
               "--adapter", adapter, "--data", data), 2, "--registry"),
        (start("scripts/import_gguf.py", "--out", afile / "m"), 1, "--out"),
    ]
    for proc, status, flag in cases:
        one_line_error(finish(proc), status, flag, afile, "is a file, not a folder")
    print(f"six refusals in {time.perf_counter() - t0:.1f} s")
    assert afile.read_text() == "not a folder"


@pytest.mark.skipif(ROOT_USER, reason="root may write in read-only folders")
def test_read_only_folders_are_refused_before_loading(tiny_model_dir, data, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "AddSub_predict.jsonl").write_text(json.dumps({"generate": "3", "answer": "3"}) + "\n")
    ro.chmod(0o555)
    try:
        one_line_error(generate(tiny_model_dir, data, ro / "pred.jsonl"), 1, "--save_path", ro)
        one_line_error(run("main_finetune.py", "--llama_path", tiny_model_dir, "--data_path", data,
                           "--output_dir", ro / "out"), 2, "--output_dir", ro)
        one_line_error(run("evaluate_math.py", "--predict_file", ro / "AddSub_predict.jsonl"), 1, ro)
        assert sorted(p.name for p in ro.iterdir()) == ["AddSub_predict.jsonl"]
    finally:
        ro.chmod(0o755)


def test_a_read_only_file_system_is_named_as_such_with_the_flag_given(tmp_path, monkeypatch):
    """EROFS is not a permission problem: say so (the statvfs flag is faked: mounting needs privileges),
    and a derived output (the scored file) is reported under the flag's own value."""
    from moa.checks import check_writable

    pred = tmp_path / "AddSub_predict.jsonl"
    real = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda p: type("V", (), {"f_flag": real(p).f_flag | os.ST_RDONLY})())
    with pytest.raises(ValueError) as info:
        check_writable("predict_file", tmp_path / "AddSub_predict_scored.jsonl", given=pred)
    assert str(info.value) == f"--predict_file {pred}: cannot write in folder {tmp_path} (a read-only file system)"


def test_truncated_adapter_given_to_combine_is_one_line(adapter, tmp_path):
    adapter.write_bytes(adapter.read_bytes()[:200])
    out = tmp_path / "c" / "adapter.pth"
    proc = run("scripts/lora_tools.py", "combine", "--adapters", adapter, "--weights", 1, "--method", "cat",
               "--out", out)
    one_line_error(proc, 1, adapter)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_an_os_error_reaching_a_main_is_one_line_naming_the_path(capsys):
    @one_line_errors("prog", status=3)
    def main() -> None:
        raise PermissionError(13, "Permission denied", "/some/place/file.json")

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 3
    assert capsys.readouterr().err == "prog: error: /some/place/file.json: Permission denied\n"


# ---- 5 (first point): stale temporaries ----------------------------------------------------------------

def test_a_write_removes_only_its_own_stale_temporaries(tmp_path):
    target = tmp_path / "scores.json"
    dead = tmp_path / f".scores.json.{_HOST}-{2 ** 22 + 7}-abcdefgh.tmp"  # beyond pid_max: never running
    live = tmp_path / f".scores.json.{_HOST}-{os.getpid()}-abcdefgh.tmp"
    old_legacy, new_legacy = tmp_path / ".scores.json.k2j4h5g6.tmp", tmp_path / ".scores.json.q1w2e3r4.tmp"
    others = [tmp_path / ".scores.json.user-notes.tmp", tmp_path / ".other.json.k2j4h5g6.tmp", tmp_path / "x.tmp"]
    for p in [dead, live, old_legacy, new_legacy, *others]:
        p.write_text("partial")
    old = time.time() - STALE_AFTER_S - 60
    os.utime(old_legacy, (old, old))
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert not dead.exists() and not old_legacy.exists()
    assert live.exists() and new_legacy.exists() and all(p.exists() for p in others)


# ---- 6: scoring ---------------------------------------------------------------------------------------

def test_empty_predict_file_is_an_error_and_appends_nothing(tmp_path):
    (tmp_path / "AddSub_predict.jsonl").write_text("")
    one_line_error(run("evaluate_math.py", "--predict_file", tmp_path / "AddSub_predict.jsonl"), 1,
                   tmp_path / "AddSub_predict.jsonl", "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["AddSub_predict.jsonl"]


def test_malformed_lines_are_counted_in_the_summary_and_reported(tmp_path):
    rows = [json.dumps({"generate": "3", "answer": "3"}), "{not json", json.dumps({"answer": "4"})]
    (tmp_path / "AddSub_predict.jsonl").write_text("\n".join(rows) + "\n")
    proc = run("evaluate_math.py", "--predict_file", tmp_path / "AddSub_predict.jsonl")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert "2 malformed prediction line(s)" in proc.stderr
    (record,) = [json.loads(line) for line in (tmp_path / "acc_score.jsonl").read_text().splitlines()]
    assert record["malformed"] == 2 and record["AddSub"] == pytest.approx(1 / 3)


def test_example_on_an_empty_test_file_is_an_error_without_a_prediction_file(tiny_model_dir, tmp_path):
    (tmp_path / "test.json").write_text("[]")
    one_line_error(generate(tiny_model_dir, tmp_path / "test.json", tmp_path / "pred.jsonl"), 1,
                   tmp_path / "test.json", "no rows")
    assert not list(tmp_path.glob("pred.jsonl*"))


# ---- 7: errors that mislead ---------------------------------------------------------------------------

def test_flags_disagreeing_with_the_tensors_name_both_files_and_the_flag(tiny_model_dir, data, adapter, tmp_path):
    params_path = adapter.parent / ADAPTER_PARAMS
    params = json.loads(params_path.read_text())
    params.pop("files")  # as older code wrote it: no hashes, so the shapes are what disagrees
    params_path.write_text(json.dumps({**params, "lora_rank": 8}))
    line = one_line_error(generate(tiny_model_dir, data, tmp_path / "pred.jsonl", "--adapter_path", adapter), 1,
                          adapter, params_path, "lora_rank 8")
    assert "different base" not in line


def test_other_lora_targets_in_the_flags_name_that_flag(tiny_model_dir, data, adapter, tmp_path):
    params_path = adapter.parent / ADAPTER_PARAMS
    params = json.loads(params_path.read_text())
    params.pop("files")
    params_path.write_text(json.dumps({**params, "lora_targets": "Q,K,V"}))
    line = one_line_error(generate(tiny_model_dir, data, tmp_path / "pred.jsonl", "--adapter_path", adapter), 1,
                          adapter, params_path, "lora_targets")
    assert "missing keys" in line and "unexpected keys" in line and len(line) < 1000


def test_a_training_checkpoint_as_adapter_says_how_to_extract(tiny_model_dir, data, tmp_path):
    ckpt = tmp_path / "run" / "checkpoint-0.pth"
    ckpt.parent.mkdir()
    shutil.copy(LEGACY / "train" / "checkpoint-0.pth", ckpt)
    line = one_line_error(generate(tiny_model_dir, data, tmp_path / "pred.jsonl", "--adapter_path", ckpt), 1,
                          ckpt, "training checkpoint", "extract_adapter_from_checkpoint.py --checkpoint")
    assert len(line) < 400 and "layers." not in line


def test_crafted_pickles_in_adapter_and_selector_files_are_one_line(tiny_model_dir, data, adapter, tmp_path):
    torch.save({"layers.0.attention.wq.lora_A": _Evil()}, adapter)
    one_line_error(generate(tiny_model_dir, data, tmp_path / "pred.jsonl", "--adapter_path", adapter), 1,
                   adapter, "other than tensors")
    selector = tmp_path / "selector.pt"
    torch.save({"kind": _Evil()}, selector)
    with pytest.raises(ValueError) as info:
        load_selector(selector)
    assert str(selector) in str(info.value) and "\n" not in str(info.value)
    assert "weights_only" not in str(info.value)


# ---- 8: file modes, fsync'd renames, the adapter pair all-or-none ------------------------------------------

def test_written_files_honour_the_umask(tiny_model_dir, adapter, tmp_path):
    before = os.umask(0o002)
    try:
        atomic_write_text(tmp_path / "t.txt", "x")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "t.txt").stat().st_mode) == 0o664
    out = tmp_path / "c" / "adapter.pth"
    proc = run("scripts/lora_tools.py", "combine", "--adapters", adapter, "--weights", 1, "--method", "cat",
               "--out", out, umask=0o022)
    assert proc.returncode == 0, proc.stderr
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.parent.iterdir()} == {0o644}
    merged = tmp_path / "merged"
    proc = run("scripts/lora_tools.py", "merge", "--base", tiny_model_dir, "--adapter", adapter, "--out", merged,
               umask=0o027)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(merged.stat().st_mode) == 0o750  # a model folder: mkdir's mode, not mkdtemp's 0700


_KILL_AT_SECOND_RENAME = """
import os, signal, sys
import torch
from moa.files.adapters import read_adapter_files, write_adapter_files
replace, calls = os.replace, []
def killed_after_first(src, dst):
    replace(src, dst)
    calls.append(dst)
    if len(calls) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = killed_after_first
files = read_adapter_files(sys.argv[1])
write_adapter_files(sys.argv[1], files.cfg, {k: v + 1 for k, v in files.state.items()}, files.max_seq_len)
"""


def test_a_writer_killed_between_the_adapter_renames_leaves_a_pair_that_is_refused(tiny_model_dir, data,
                                                                                   adapter, tmp_path):
    old_tensors = file_sha256(adapter)
    proc = subprocess.run([sys.executable, "-c", _KILL_AT_SECOND_RENAME, str(adapter)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert file_sha256(adapter) == old_tensors  # killed after the flags' rename, before the tensors'
    assert list(adapter.parent.glob(".adapter.pth.*.tmp"))  # the killed writer's temporary
    one_line_error(generate(tiny_model_dir, data, tmp_path / "pred.jsonl", "--adapter_path", adapter), 1,
                   adapter, adapter.parent / ADAPTER_PARAMS, "different writes")
    assert not (tmp_path / "pred.jsonl").exists()
    make_lora_adapter(tiny_model_dir, adapter)  # a complete write mends the pair and drops the dead temporary
    assert read_adapter_files(adapter).state and not list(adapter.parent.glob(".*.tmp"))


def test_tensors_of_another_write_are_refused_and_older_pairs_without_hashes_load(tiny_model_dir, adapter,
                                                                                  tmp_path):
    other = tmp_path / "other" / "adapter.pth"
    make_lora_adapter(tiny_model_dir, other, seed=1)
    shutil.copy(other, adapter)
    with pytest.raises(ValueError, match="are from different writes"):
        read_adapter_files(adapter)
    params_path = adapter.parent / ADAPTER_PARAMS
    params = json.loads(params_path.read_text())
    params.pop("files")
    params_path.write_text(json.dumps(params))
    assert read_adapter_files(adapter).state.keys() == read_adapter_files(other).state.keys()


def test_every_model_args_field_has_a_params_rule():
    import dataclasses

    from llama.params import _PARAM_RULES, ModelArgs

    assert {f.name for f in dataclasses.fields(ModelArgs)} == set(_PARAM_RULES)
