"""evaluate_loss.py / moa/infer/loss.py: the held-out loss of reference outputs.

Tiny random base model (tests/conftest.py `tiny_model_dir`, byte tokenizer), fp32 on CPU. The
reference is a hand computation per row: the whole sequence's logits from `model(tokens)`,
log_softmax, the log-probabilities of the output tokens (+ EOS) gathered and averaged.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moa.infer.loss as loss_mod
from evaluate_loss import main, parse_args
from llama.checkpoint import load_model
from moa.infer.loss import LossConfig, evaluate_loss, loss_examples, row_nll_sums
from moa.train.data import InstructionDataset, build_prompt, collate
from tests.helpers import make_lora_adapter

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"set", "nll_per_token", "rows", "tokens", "adapter", "data_path", "save_path", "reference"}


def tiny_rows(n: int) -> list[dict]:
    """Rows with prompts and outputs of different lengths; every third has an input."""
    return [{"instruction": f"Row {i}: add {i} and {2 * i + 1}." + " Think." * (i % 4),
             "input": f"Numbers {i}, {i + 7}." if i % 3 == 0 else "",
             "output": f"The answer is {3 * i + 1}." + " Because." * (i % 5), "answer": str(3 * i + 1)}
            for i in range(n)]


def write_set(root: Path, rows: list[dict], name: str = "tinyset") -> Path:
    path = root / "data" / name / "test.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(model_dir: Path, data: Path, save: Path, **kw):
    cfg = LossConfig(ckpt_dir=str(model_dir), data_path=str(data), save_path=str(save), progress=False, **kw)
    return evaluate_loss(cfg)


def hand_nll(model, tokenizer, row: dict, max_seq_len: int | None = None) -> tuple[float, int]:
    """Mean NLL of the row's output (+ EOS) from full logits, and the number of scored tokens."""
    prompt = tokenizer.encode(build_prompt(row["instruction"], row.get("input")), bos=True, eos=False)
    response = tokenizer.encode(row["output"], bos=False, eos=True)
    tokens = prompt + response
    if max_seq_len is not None:
        tokens = tokens[:max_seq_len]
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0].double()  # (T, vocab)
    logp = torch.log_softmax(logits, dim=-1)
    positions = torch.arange(len(prompt) - 1, len(tokens) - 1)  # predict tokens[len(prompt):]
    targets = torch.tensor(tokens[len(prompt):])
    nll = -logp[positions, targets]
    return float(nll.mean()), len(targets)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loss_data")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return tiny_rows(7)


@pytest.fixture(scope="module")
def test_file(data_dir, rows) -> Path:
    return write_set(data_dir, rows)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, test_file, tmp_path_factory) -> Path:
    """The loss file of one uninterrupted run at batch size 4."""
    save = tmp_path_factory.mktemp("ref") / "loss.jsonl"
    run(tiny_model_dir, test_file, save, max_batch_size=4)
    return save


def test_nll_equals_hand_computation_from_full_logits(tiny_model_dir, rows, reference):
    model, tok = load_model(tiny_model_dir)
    lines = read_jsonl(reference)
    assert len(lines) == len(rows)
    for row, line in zip(rows, lines):
        want, n = hand_nll(model, tok, row)
        assert line["tokens"] == n
        assert line["instruction"] == row["instruction"] and line["input"] == row["input"]
        assert abs(line["nll"] - want) <= 1e-5 * abs(want), (line, want)
        assert line["cut_tokens"] == 0


def test_adapter_nll_equals_hand_computation_and_differs_from_bare(tiny_model_dir, rows, test_file, reference,
                                                                    tmp_path):
    adapter = tmp_path / "adapter" / "adapter.pth"
    adapter.parent.mkdir()
    model = make_lora_adapter(tiny_model_dir, adapter, scale=0.3)
    model.eval()
    tok = load_model(tiny_model_dir)[1]
    save = tmp_path / "out" / "loss_lora.jsonl"
    summary = run(tiny_model_dir, test_file, save, adapter_path=str(adapter), max_batch_size=3)
    lines, bare = read_jsonl(save), read_jsonl(reference)
    for row, line, b in zip(rows, lines, bare):
        want, n = hand_nll(model, tok, row)
        assert line["tokens"] == n
        assert abs(line["nll"] - want) <= 1e-5 * abs(want)
        assert abs(line["nll"] - b["nll"]) > 1e-4  # the adapter is not a no-op
    score = read_jsonl(save.parent / "loss_score.jsonl")
    assert score[-1]["adapter"] == str(adapter) and summary.adapter == str(adapter)


def test_batch_size_1_and_4_give_the_same_file(tiny_model_dir, test_file, reference, tmp_path):
    save = tmp_path / "loss_b1.jsonl"
    run(tiny_model_dir, test_file, save, max_batch_size=1)
    one, four = read_jsonl(save), read_jsonl(reference)
    for a, b in zip(one, four):
        assert {k: v for k, v in a.items() if not k.startswith("nll")} == \
            {k: v for k, v in b.items() if not k.startswith("nll")}
        assert abs(a["nll"] - b["nll"]) <= 1e-6 * abs(b["nll"])
        assert abs(a["nll_sum"] - b["nll_sum"]) <= 1e-6 * abs(b["nll_sum"])


def test_padded_rows_equal_rows_alone(tiny_model_dir, rows):
    model, tok = load_model(tiny_model_dir)
    items = loss_examples(tok, rows, list(range(len(rows))), 512, "test.json")
    lengths = {len(ex.tokens) for _, ex, _ in items}
    assert len(lengths) > 1  # the batch really is padded
    batch = collate([InstructionDataset([ex])[0] for _, ex, _ in items])
    assert not bool(batch["token_mask"].all())
    sums, counts = row_nll_sums(model, batch, "cpu")
    for (i, ex, _), s, n in zip(items, sums, counts):
        alone_s, alone_n = row_nll_sums(model, collate([InstructionDataset([ex])[0]]), "cpu")
        assert n == alone_n[0] == len(ex.tokens) - ex.n_prompt
        assert abs(s - alone_s[0]) <= 1e-5 * abs(alone_s[0])


def test_summary_line_fields(tiny_model_dir, test_file, reference):
    lines = read_jsonl(reference)
    score = read_jsonl(reference.parent / "loss_score.jsonl")
    assert len(score) == 1
    s = score[0]
    assert set(s) == SUMMARY_KEYS
    assert s["set"] == "tinyset" and s["adapter"] is None and s["data_path"] == str(test_file)
    assert s["reference"] == "answer"
    assert s["rows"] == len(lines) and s["tokens"] == sum(line["tokens"] for line in lines)
    want = sum(line["nll"] * line["tokens"] for line in lines) / s["tokens"]
    assert abs(s["nll_per_token"] - want) <= 1e-9 * want


def test_output_cut_at_max_seq_len_scores_only_kept_tokens_and_long_prompt_refused(tiny_model_dir, rows, tmp_path):
    model, tok = load_model(tiny_model_dir)
    lengths = [len(tok.encode(build_prompt(r["instruction"], r.get("input")), bos=True, eos=False)) for r in rows]
    cap = max(lengths) + 5
    data = write_set(tmp_path, rows)
    save = tmp_path / "cut.jsonl"
    summary = run(tiny_model_dir, data, save, max_seq_len=cap, max_batch_size=4)
    lines = read_jsonl(save)
    assert summary.cut_rows == sum(1 for line in lines if line["cut_tokens"] > 0) > 0
    for row, line, n_prompt in zip(rows, lines, lengths):
        want, n = hand_nll(model, tok, row, max_seq_len=cap)
        full = len(tok.encode(row["output"], bos=False, eos=True))
        assert line["tokens"] == n == min(full, cap - n_prompt)
        assert line["cut_tokens"] == full - n
        assert abs(line["nll"] - want) <= 1e-5 * abs(want)
    with pytest.raises(ValueError, match=r"row \d+: its prompt .* fills --max_seq_len"):
        run(tiny_model_dir, data, tmp_path / "short.jsonl", max_seq_len=min(lengths))


@pytest.mark.parametrize("bad", ["empty", "missing"])
def test_empty_or_missing_output_is_one_line_error_naming_file_row_field(tiny_model_dir, tmp_path, capsys, bad):
    rows = tiny_rows(4)
    if bad == "empty":
        rows[2]["output"] = ""
    else:
        del rows[2]["output"]
    data = write_set(tmp_path, rows)
    with pytest.raises(SystemExit) as e:
        main(["--ckpt_dir", str(tiny_model_dir), "--data_path", str(data), "--save_path",
              str(tmp_path / "x.jsonl"), "--progress", "False"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("evaluate_loss.py: error: ")
    assert str(data) in err and "row 2" in err and "'output'" in err
    assert not (tmp_path / "x.jsonl").exists()


def test_flag_errors_one_line_exit_2(tiny_model_dir, tmp_path, capsys):
    base = ["--ckpt_dir", str(tiny_model_dir), "--data_path", "d.json", "--save_path", "s.jsonl"]
    for extra, text in ((["--dtype", "float16"], "--dtype"), (["--max_batch_size", "0"], "max_batch_size"),
                        (["--max_seq_len", "1"], "--max_seq_len")):
        with pytest.raises(SystemExit) as e:
            parse_args(base + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("evaluate_loss.py: error: ") and text in err


def test_resume_after_crash_and_truncated_line_gives_the_same_file(tiny_model_dir, test_file, reference, tmp_path,
                                                                     monkeypatch):
    save = tmp_path / "loss.jsonl"
    real = loss_mod.row_nll_sums
    calls = {"n": 0}

    def crash_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **k)

    monkeypatch.setattr(loss_mod, "row_nll_sums", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, test_file, save, max_batch_size=2)
    monkeypatch.setattr(loss_mod, "row_nll_sums", real)
    partial = Path(f"{save}.partial")
    assert partial.is_file() and not save.exists()
    assert len(partial.read_text().splitlines()) == 1 + 4  # header + two batches of 2
    with open(partial, "a") as f:
        f.write('{"index": 6, "nll": 1.')  # a line a kill interrupted
    summary = run(tiny_model_dir, test_file, save, max_batch_size=2)
    assert summary.resumed_rows == 4 and summary.evaluated_rows == 3
    assert not partial.exists()
    got, want = read_jsonl(save), read_jsonl(reference)
    for a, b in zip(got, want):
        assert a["tokens"] == b["tokens"] and a["instruction"] == b["instruction"]
        assert abs(a["nll"] - b["nll"]) <= 1e-6 * abs(b["nll"])
    score = read_jsonl(save.parent / "loss_score.jsonl")
    assert len(score) == 1 and score[0]["rows"] == 7
    # Resuming a partial file written with other settings is refused, naming them.
    other = tmp_path / "other.jsonl"
    Path(f"{other}.partial").write_text(json.dumps({"partial_of": other.name, "settings": {"max_seq_len": 3}}) + "\n")
    with pytest.raises(ValueError, match=r"other settings \(.*max_seq_len"):
        run(tiny_model_dir, test_file, other, max_batch_size=2)


def test_complete_file_left_alone_without_a_second_summary_line_and_overwrite_redoes(tiny_model_dir, test_file,
                                                                                     tmp_path):
    save = tmp_path / "loss.jsonl"
    first = run(tiny_model_dir, test_file, save)
    again = run(tiny_model_dir, test_file, save)
    assert again.left_alone and again.nll_per_token == first.nll_per_token
    assert len(read_jsonl(tmp_path / "loss_score.jsonl")) == 1
    (tmp_path / "loss_score.jsonl").unlink()  # killed between the two writes: the line is restored
    run(tiny_model_dir, test_file, save)
    assert len(read_jsonl(tmp_path / "loss_score.jsonl")) == 1
    redo = run(tiny_model_dir, test_file, save, overwrite=True)
    assert not redo.left_alone and len(read_jsonl(tmp_path / "loss_score.jsonl")) == 2


def test_cli_prints_summary_and_dtype_choice(tiny_model_dir, test_file, tmp_path, capsys):
    save = tmp_path / "cli.jsonl"
    main(["--ckpt_dir", str(tiny_model_dir), "--data_path", str(test_file), "--save_path", str(save),
          "--max_batch_size", "4", "--dtype", "float32", "--progress", "False"])
    out = capsys.readouterr().out
    assert "tinyset: nll/token" in out and "bare model" in out and "dtype float32 (as asked)" in out
    assert len(read_jsonl(save)) == 7


def test_torchrun_2_gloo_ranks_equal_one_process_file(tiny_model_dir, test_file, reference, tmp_path):
    save = tmp_path / "ddp" / "loss.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29617",
           "evaluate_loss.py", "--ckpt_dir", str(tiny_model_dir), "--data_path", str(test_file),
           "--save_path", str(save), "--max_batch_size", "2", "--progress", "False"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("tinyset: nll/token") == 1  # rank 0 reports
    got, want = read_jsonl(save), read_jsonl(reference)
    for a, b in zip(got, want):
        assert a["tokens"] == b["tokens"] and a["instruction"] == b["instruction"]
        assert abs(a["nll"] - b["nll"]) <= 1e-6 * abs(b["nll"])
    assert not list(save.parent.glob("*.partial*"))
    score = read_jsonl(save.parent / "loss_score.jsonl")
    assert len(score) == 1 and score[0]["rows"] == 7


@pytest.mark.parametrize("router", ["soft", "instance"])
def test_routed_adapter_batch_size_1_and_4_agree_pads_reach_no_router(tiny_model_dir, test_file, tmp_path, router):
    """An instance-level router averages x over a row's tokens: a pad that reached it would change the row."""
    adapter = tmp_path / "adapter" / "adapter.pth"
    adapter.parent.mkdir()
    make_lora_adapter(tiny_model_dir, adapter, scale=0.3, type_router=router, swi_x=0)
    one = run(tiny_model_dir, test_file, tmp_path / "b1.jsonl", adapter_path=str(adapter), max_batch_size=1)
    four = run(tiny_model_dir, test_file, tmp_path / "b4.jsonl", adapter_path=str(adapter), max_batch_size=4)
    for a, b in zip(read_jsonl(tmp_path / "b1.jsonl"), read_jsonl(tmp_path / "b4.jsonl")):
        assert a["tokens"] == b["tokens"]
        assert abs(a["nll"] - b["nll"]) <= 1e-6 * abs(b["nll"])
    assert abs(one.nll_per_token - four.nll_per_token) <= 1e-6 * four.nll_per_token


def test_dtype_auto_follows_the_cpu_flags_recorded_and_bf16_stays_close_to_fp32(tiny_model_dir, test_file, reference,
                                                                               tmp_path, monkeypatch):
    monkeypatch.setenv("MOA_CPU_FLAGS", "avx512_bf16")  # a CPU with native bf16: auto -> bfloat16
    summary = run(tiny_model_dir, test_file, tmp_path / "auto.jsonl", dtype="auto", max_batch_size=4)
    assert summary.dtype == "bfloat16" and "avx512_bf16" in summary.dtype_report
    recorded = json.loads(Path(f"{tmp_path / 'auto.jsonl'}.settings.json").read_text())["settings"]
    assert (recorded["dtype"], recorded["dtype_resolved"]) == ("auto", "bfloat16")
    monkeypatch.setenv("MOA_CPU_FLAGS", "")  # a rerun on a machine that would choose fp32: the file is its result
    assert run(tiny_model_dir, test_file, tmp_path / "auto.jsonl", dtype="auto", max_batch_size=4).left_alone
    fp32 = read_jsonl(reference.parent / "loss_score.jsonl")[0]["nll_per_token"]
    assert abs(summary.nll_per_token - fp32) <= 0.02 * fp32  # bf16 weights: close, not equal


@pytest.mark.parametrize("text,want", [("\nA: He needs 24 tiles.", "He needs 24 tiles."),
                                       ("\nRationale: x = 2. The answer is (D).", "x = 2. The answer is (D)."),
                                       (" of 5 apples", "of 5 apples"), ("A: A: twice", "A: twice"),
                                       ("Area: 4", "Area: 4"), ("\nA:", "")])
def test_strip_answer_cue_hand_examples(text, want):
    assert loss_mod.strip_answer_cue(text) == want


def test_answer_cue_not_scored_equals_the_bare_answer_scored_verbatim(tiny_model_dir, rows, tmp_path):
    """A row '\\nA: ' + answer scores exactly as the answer alone (default), and verbatim as the hand
    computation of the whole text (strip_answer_cue=False); a reference that is only a cue is an error."""
    cued = [dict(r, output="\nA: " + r["output"]) for r in rows[:4]]
    plain, with_cue = write_set(tmp_path / "p", rows[:4]), write_set(tmp_path / "c", cued)
    a = read_jsonl(Path(run(tiny_model_dir, plain, tmp_path / "plain.jsonl").save_path))
    b = read_jsonl(Path(run(tiny_model_dir, with_cue, tmp_path / "cued.jsonl").save_path))
    assert [(x["nll"], x["tokens"]) for x in a] == [(x["nll"], x["tokens"]) for x in b]
    verbatim = run(tiny_model_dir, with_cue, tmp_path / "verbatim.jsonl", strip_answer_cue=False)
    model, tokenizer = load_model(tiny_model_dir)
    for line, row in zip(read_jsonl(Path(verbatim.save_path)), cued):
        nll, n = hand_nll(model, tokenizer, row)
        assert line["tokens"] == n and abs(line["nll"] - nll) <= 1e-5 * nll
    assert read_jsonl(tmp_path / "loss_score.jsonl")[-1]["reference"] == "verbatim"
    only_cue = write_set(tmp_path / "o", [dict(rows[0], output="\nA: ")])
    with pytest.raises(ValueError, match=r"row 0: field 'output' is empty"):
        run(tiny_model_dir, only_cue, tmp_path / "o.jsonl")
