"""The research workflow end to end: scripts/run_math.sh and run_commonsense.sh (train -> extract ->
generate -> score), scripts/reproduce.py's table, scripts/router_stats.py's plot.

References: the per-row verdicts of evaluate_*.py recomputed here from the prediction files by
the scoring rule, the run directories' own adapter.pth for the parameter counts, and
`moa.RouterStats` called directly for the router numbers.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama.checkpoint import load_model
from moa import MoAConfig, RouterStats, attach_adapters, save_adapter
from moa.eval.scoring import COMMONSENSE_SETS, MATH_SETS, score_generation

REPO = Path(__file__).resolve().parent.parent
# Tiny sizes: a few training rows and steps, one or two test rows, a few new tokens. On the tiny
# byte-tokenizer model (`tiny_model_dir`) prompts are ~250 tokens: --max_seq_len 1024 there.
TINY_RUN = ["--train_rows", "4", "--batch", "2", "--accum", "1", "--test_rows", "2", "--loss_rows", "2",
            "--max_gen_len", "4", "--min_gen_len", "2", "--max_batch", "2"]


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def assert_scores_match_predictions(out: Path, sets: tuple[str, ...]) -> dict:
    """The last acc_score.jsonl line equals the scoring rule applied here to each prediction file."""
    lines = (out / "acc_score.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    assert record["missing"] == []
    for name in sets:
        rows = [json.loads(line) for line in (out / f"{name}_predict.jsonl").read_text().splitlines()]
        assert rows and all(set(r) >= {"generate", "output", "input", "instruction", "answer"} for r in rows)
        expected = sum(score_generation(name, r["generate"], r["answer"])[1] for r in rows) / len(rows)
        assert record[name] == pytest.approx(expected)
    assert record["average"] == pytest.approx(sum(record[s] for s in sets) / len(sets))
    return record


def test_run_math_sh_end_to_end_on_smollm2_files_and_acc_score_line(smollm2_dir, tmp_path):
    out = tmp_path / "run"
    proc = run(["bash", "scripts/run_math.sh", "--model", str(smollm2_dir), "--out", str(out),
                "--max_seq_len", "192", "--baseline", "True", *TINY_RUN])
    assert "AddSub" in proc.stdout and "average" in proc.stdout
    for name in ("checkpoint-0.pth", "adapter.pth", "adapter_params.json", "log.txt", "timing.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "adapter_params.json").read_text())["type_router"] == "soft"
    assert assert_scores_match_predictions(out, MATH_SETS)["predict_file"] == str(out / "AddSub_predict.jsonl")
    assert_scores_match_predictions(out / "base", MATH_SETS)
    for name in MATH_SETS:
        assert (out / f"{name}_predict_scored.jsonl").is_file()
        assert len(json.loads((out / "data" / name / "test.json").read_text())) == 2
    assert json.loads((out / "timing.json").read_text())["train_s"] > 0
    # The main job's report: held-out loss of both models from the per-row files, accuracy with intervals.
    summary = json.loads((out / "summary.json").read_text())
    for model, folder in (("adapters", out), ("bare", out / "base")):
        rows = [json.loads(line) for line in (folder / "loss" / "gsm8k_loss.jsonl").read_text().splitlines()]
        assert len(rows) == 2
        nll = sum(r["nll"] * r["tokens"] for r in rows) / sum(r["tokens"] for r in rows)
        assert summary["loss"][model]["gsm8k"]["nll"] == pytest.approx(nll)
        acc = summary["accuracy"][model]["average"]
        assert acc["rows"] == 12 and acc["low"] <= acc["acc"] <= acc["high"]
    assert "This run shows" in proc.stdout

    # A second run finds every step done: nothing is retrained or regenerated, one more score line.
    mtime = (out / "adapter.pth").stat().st_mtime_ns
    run(["bash", "scripts/run_math.sh", "--model", str(smollm2_dir), "--out", str(out),
         "--max_seq_len", "192", *TINY_RUN])
    assert (out / "adapter.pth").stat().st_mtime_ns == mtime
    assert len((out / "acc_score.jsonl").read_text().splitlines()) == 2

    # Other settings into the same folder would reuse stale files: refused, naming what differs.
    proc = subprocess.run(["bash", "scripts/run_math.sh", "--model", str(smollm2_dir), "--out", str(out),
                           "--max_seq_len", "192", *TINY_RUN, "--test_rows", "3"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "run_settings.json" in proc.stderr and "--test_rows '2' -> '3'" in proc.stderr


def test_run_commonsense_sh_mixes_train_sets_and_scores_seven_sets(tiny_model_dir, tmp_path):
    out = tmp_path / "cs"
    run(["bash", "scripts/run_commonsense.sh", "--model", str(tiny_model_dir), "--out", str(out),
         "--max_seq_len", "1024", "--method", "lora", *TINY_RUN])
    assert_scores_match_predictions(out, COMMONSENSE_SETS)
    train = json.loads((out / "data" / "train.json").read_text())
    assert len(train) == 4 and all("the correct answer is" in r["output"] for r in train)


def test_run_script_flag_errors_are_clear(tmp_path):
    proc = subprocess.run(["bash", "scripts/run_math.sh", "--model", str(tmp_path / "none")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no base model" in proc.stderr and "import_gguf.py" in proc.stderr
    proc = subprocess.run(["bash", "scripts/run_math.sh", "--method"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--method needs a value" in proc.stderr
    proc = subprocess.run(["bash", "scripts/run_math.sh", "--batch_size", "8"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown flag --batch_size" in proc.stderr and " batch " in proc.stderr


def test_run_script_resolves_relative_paths_against_the_callers_folder(tiny_model_dir, tmp_path):
    """--model and --out relative to where the user stands, not to the repository."""
    (tmp_path / "m").symlink_to(tiny_model_dir)
    proc = subprocess.run(["bash", str(REPO / "scripts/run_math.sh"), "--model", "m", "--out", "rel_out",
                           "--method", "nope"], cwd=tmp_path, capture_output=True, text=True)
    assert "unknown method 'nope'" in proc.stderr  # got past the model check: m was found from tmp_path
    assert not (REPO / "rel_out").exists()


def test_unknown_method_is_refused_with_the_known_names(tiny_model_dir, tmp_path):
    proc = subprocess.run(["bash", "scripts/run_math.sh", "--model", str(tiny_model_dir), "--method", "nope",
                           "--out", str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown method 'nope'" in proc.stderr and "hydralora" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_reproduce_refuses_an_unknown_method_before_any_run(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/reproduce.py", "--methods", "lora,nope", "--seeds", "0",
                           "--out", str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--methods 'nope': unknown method" in proc.stderr and "hydralora" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_reproduce_two_methods_one_seed_table_rows_and_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "repro"
    cmd = [sys.executable, "scripts/reproduce.py", "--methods", "lora,p_adapter", "--seeds", "0",
           "--scale", "smoke", "--out", str(out), "--model", str(tiny_model_dir), "--max_seq_len", "1024", *TINY_RUN]
    run(cmd)
    with open(out / "math_smoke_runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert [(r["method"], r["seed"]) for r in runs] == [("lora", "0"), ("p_adapter", "0")]
    with open(out / "math_smoke_results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["lora", "p_adapter"]
    for r, per_run in zip(table, runs):
        run_dir = Path(per_run["dir"])
        state = torch.load(run_dir / "adapter.pth", weights_only=True)
        assert int(per_run["params"]) == sum(t.numel() for t in state.values())
        score = json.loads((run_dir / "acc_score.jsonl").read_text().splitlines()[-1])
        assert float(r["average_mean"]) == pytest.approx(100 * score["average"])
        assert float(r["average_sd"]) == 0.0  # one seed
        for name in MATH_SETS:
            assert float(r[f"{name}_mean"]) == pytest.approx(100 * score[name])
    md = (out / "math_smoke_results.md").read_text()
    lines = md.splitlines()
    assert lines[0] == "accuracy, % (mean ± sd over seeds)" and lines[2].startswith("| method | AddSub |")
    assert "held-out loss, nats per reference token (mean ± sd over seeds)" in lines  # --loss_rows 2
    assert md.count("| lora |") == 2 and md.count("| p_adapter |") == 2
    for r in table:
        assert float(r["loss_average_mean"]) > 0

    again = run(cmd)  # resumable: finished runs are skipped
    assert again.stdout.count("finished, skipped") == 2
    # a fresh checkout keeps only the committed runs file: its runs (same flags) are not redone
    shutil.rmtree(out / "smoke")
    fresh = run(cmd)
    assert fresh.stdout.count("finished, skipped (recorded in") == 2
    assert (out / "math_smoke_results.md").read_text() == md


@pytest.mark.parametrize("type_router", ["soft", "sparse"])
def test_router_stats_png_and_json_equal_router_stats_direct(tiny_model_dir, tmp_path, type_router):
    model, tokenizer = load_model(tiny_model_dir, max_seq_len=1024)
    cfg = MoAConfig(lora_layers="0-2", lora_rank=4, lora_alpha=4, lora_targets="Q,V", p_adapter_layers="0-2",
                    p_adapter_size=8, swi_x=2, type_router=type_router, max_threshold=0.5)
    attach_adapters(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # routers away from their symmetric start, so that a threshold bites
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_(0, 0.5)
    adapter = tmp_path / "ad" / "adapter.pth"
    save_adapter(model, str(adapter))
    out = tmp_path / "stats"
    run([sys.executable, "scripts/router_stats.py", "--ckpt_dir", str(tiny_model_dir), "--adapter_path", str(adapter),
         "--data_path", "data/math/SVAMP/test.json", "--max_rows", "5", "--batch_size", "2",
         "--max_seq_len", "1024", "--out", str(out)])
    png = (out.parent / "stats.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    record = json.loads((out.parent / "stats.json").read_text())
    assert record["slots"] == ["lora.wq", "lora.wv", "p_adapter"] and record["layers"] == [0, 1]
    assert record["sparse"] == (type_router == "sparse")

    # Reference: RouterStats over the same rows, one at a time (no padding at all).
    from scripts.router_stats import row_tokens
    rows = json.loads((REPO / "data/math/SVAMP/test.json").read_text())[:5]
    with RouterStats(model) as direct, torch.inference_mode():
        for seq in row_tokens(tokenizer, rows, 1024, False):
            model.hidden_states(torch.tensor([seq]))
    ref = direct.tables()
    for key in ("weight", "active"):
        torch.testing.assert_close(torch.tensor(record[key]), torch.tensor(ref[key]), rtol=1e-5, atol=1e-6)
