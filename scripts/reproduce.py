"""Reproduce the paper's tables: methods x seeds x the sets of a benchmark -> one results table.

    python scripts/reproduce.py --methods soft_moa,lora --scale smoke          # CPU, bundled model
    python scripts/reproduce.py --methods lora,hydralora,soft_moa,sparse_moa --scale cpu   # the CPU comparison
    python scripts/reproduce.py --model /path/Meta-Llama-3.1-8B --nproc 4 --scale full \\
        --methods soft_moa,sparse_moa,lora,lora_r16,hydralora,molora,adamole,unipeft

Methods are the named flag sets of moa/method/presets.py (`python -m moa.method.presets --list`); an
unknown name stops reproduce.py before any run.

Each (method, seed) is one `scripts/run_{benchmark}.sh` run in OUT/{scale}/{benchmark}/{method}/seed{seed};
a run whose `acc_score.jsonl` exists is finished and skipped (so an interrupted reproduction
resumes, and inside a run every step resumes too; a run script stops rather than reuse a folder
whose `run_settings.json` records other settings). The table (OUT/{benchmark}_{scale}_results.md and .csv)
has, per method, the accuracy of every set and their average as mean ± sd over the training seeds
that finished, the held-out loss likewise (runs with `--loss_rows`), each method's paired difference to
LoRA over the training seeds both finished, the trainable parameters, the mean training time and the peak memory; OUT/{benchmark}_{scale}_runs.csv
has one row per run, with the flags it ran with. `--tables DIR` writes the tables there instead (e.g.
a committed `results/` folder): a run recorded in DIR's runs file with the same flags counts as
finished even where its run folder is gone, so a reproduction longer than one machine's session
resumes from the committed file on a fresh checkout. Flags this script does not know go to the run script as they are (e.g.
`--train_rows 128 --max_gen_len 32 --nproc 2`), after and over the flags of `--scale`.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parent.parent

from moa.atomic import atomic_write_text
from moa.eval.scoring import COMMONSENSE_SETS, MATH_SETS, SUMMARY_FILE
from moa.method.presets import PRESETS

LOSS_SUMMARY = "loss_score.jsonl"  # evaluate_loss.py's summary lines, beside its per-row files

SEEDS = (0, 125, 1225)  # the paper's three seeds
BENCHMARK_SETS = {"math": MATH_SETS, "commonsense": COMMONSENSE_SETS}
# Run-script flags for each scale. smoke: minutes on a CPU with the bundled model; full: the paper.
SCALES: dict[str, dict[str, str]] = {
    "smoke": {"train_rows": "64", "test_rows": "8", "epochs": "1", "max_gen_len": "48", "min_gen_len": "32"},
    "small": {},  # the run scripts' own defaults (the README's main job)
    # The paper's comparison at CPU scale on the bundled SmolLM2-135M: every method trains on the same
    # 1,000 GSM8K rows for one epoch (125 optimizer steps of 8 rows; peak lr 1e-3 = blr 0.032 x 8 / 256,
    # 10% warmup) and is scored on the same first 100 rows of every math set (loss and accuracy).
    # fp32 throughout, not auto: auto picks bf16 on some CPUs and fp32 on others, and the runs of one
    # table run on whatever machine each session gets.
    "cpu": {"train_rows": "1000", "test_rows": "100", "loss_rows": "100", "epochs": "1", "warmup": "0.1",
            "batch": "8", "accum": "1", "blr": "0.032", "max_gen_len": "128", "min_gen_len": "0",
            "max_batch": "32", "baseline": "False", "bf16": "False", "dtype": "float32"},
    "full": {"train_rows": "0", "test_rows": "0", "epochs": "2", "warmup": "1", "bf16": "True",
             "max_gen_len": "200", "min_gen_len": "120", "max_batch": "200", "temperature": "0.1"},
}


@dataclass
class RunResult:
    """What one finished (method, seed) run measured."""

    method: str
    seed: int
    accuracy: dict[str, Optional[float]]  # set -> fraction in [0, 1] (None: missing)
    average: Optional[float]
    loss: dict[str, Optional[float]]  # set -> held-out nats per reference token (None: not measured)
    params: int  # trainable adapter parameters
    train_s: Optional[float]
    peak_mem_mb: Optional[float]
    out_dir: Path = field(default=Path())
    flags: str = ""  # the run script's flags (reproduce.py's per-run flags excluded)


def run_dir(out: Path, scale: str, benchmark: str, method: str, seed: int) -> Path:
    return out / scale / benchmark / method / f"seed{seed}"


def adapter_param_count(adapter_path: Path) -> int:
    """Sum of the numel of every tensor in adapter.pth (the trainable adapter parameters)."""
    import torch

    state = torch.load(adapter_path, map_location="cpu", weights_only=True, mmap=True)
    return sum(t.numel() for t in state.values())


def peak_memory_mb(log_path: Path) -> Optional[float]:
    """The largest `peak_mem_mb` of the JSON lines in a training log.txt (None without one)."""
    if not log_path.is_file():
        return None
    peaks = [json.loads(line).get("peak_mem_mb") for line in log_path.read_text().splitlines() if line.strip()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def read_result(directory: Path, method: str, seed: int, sets: Sequence[str]) -> RunResult:
    """The measurements of a finished run directory (its last acc_score.jsonl line, adapter.pth,
    timing.json and log.txt)."""
    lines = [line for line in (directory / SUMMARY_FILE).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{directory / SUMMARY_FILE}: empty")
    score = json.loads(lines[-1])
    timing_path = directory / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    return RunResult(method, seed, {s: score.get(s) for s in sets}, score.get("average"),
                     read_losses(directory / "loss" / LOSS_SUMMARY, sets),
                     adapter_param_count(directory / "adapter.pth"), timing.get("train_s"),
                     peak_memory_mb(directory / "log.txt"), directory)


def read_losses(path: Path, sets: Sequence[str]) -> dict[str, Optional[float]]:
    """{set: nll_per_token} from the last line of each set in evaluate_loss.py's summary file."""
    found: dict[str, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                found[record["set"]] = float(record["nll_per_token"])
    return {s: found.get(s) for s in sets}


def _number(text: str, kind: type = float):
    return None if text in ("", "None", "nan") else kind(float(text))


def recorded_results(path: Path, sets: Sequence[str], flags: str) -> dict[tuple[str, int], RunResult]:
    """{(method, seed): result} of the rows of a runs file (`write_tables`) that ran with `flags`."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    found = {}
    for row in rows:
        if row.get("flags", "") != flags:
            continue
        r = RunResult(row["method"], int(row["seed"]), {s: _number(row[s]) for s in sets}, _number(row["average"]),
                      {s: _number(row[f"loss_{s}"]) for s in sets}, int(row["params"]), _number(row["train_s"]),
                      _number(row["peak_mem_mb"]), Path(row["dir"]), flags)
        found[(r.method, r.seed)] = r
    return found


def run_one(benchmark: str, method: str, seed: int, directory: Path, flags: Sequence[str]) -> None:
    """One `scripts/run_{benchmark}.sh` run; raises CalledProcessError when it fails."""
    cmd = ["bash", str(REPO / "scripts" / f"run_{benchmark}.sh"), "--method", method, "--seed", str(seed),
           "--out", str(directory), *flags]
    print(f"\n=== {benchmark} / {method} / seed {seed}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def metric(r: RunResult, kind: str, name: str) -> Optional[float]:
    """Accuracy in percent (kind 'acc') or held-out loss (kind 'loss') of one set or the 'average'."""
    values = r.accuracy if kind == "acc" else r.loss
    if name == "average":
        if kind == "acc":
            return None if r.average is None else 100 * r.average
        known = [v for v in values.values() if v is not None]
        return statistics.fmean(known) if known and len(known) == len(values) else None
    v = values[name]
    return None if v is None else (100 * v if kind == "acc" else v)


def paired_difference(runs: Sequence[RunResult], reference: Sequence[RunResult], kind: str) -> tuple[float, float]:
    """Mean and sd over the training seeds both finished of (this method - reference) on the average."""
    ref = {r.seed: metric(r, kind, "average") for r in reference}
    diffs = [metric(r, kind, "average") - ref[r.seed] for r in runs
             if ref.get(r.seed) is not None and metric(r, kind, "average") is not None]
    return mean_sd(diffs) if diffs else (math.nan, math.nan)


def aggregate(results: Sequence[RunResult], sets: Sequence[str], reference: str = "lora") -> list[dict]:
    """One row per method (in first-seen order): per set and average, accuracy (percent) and loss as
    mean and sd over its seeds; the paired difference to `reference` on both averages; params; mean
    train time; max peak memory; the training seeds that finished."""
    rows = []
    ref_runs = [r for r in results if r.method == reference]
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method]
        row: dict = {"method": method, "seeds": " ".join(str(r.seed) for r in runs)}
        for kind, prefix in (("acc", ""), ("loss", "loss_")):
            for name in (*sets, "average"):
                values = [v for v in (metric(r, kind, name) for r in runs) if v is not None]
                row[f"{prefix}{name}_mean"], row[f"{prefix}{name}_sd"] = (mean_sd(values) if values
                                                                          else (math.nan, math.nan))
            row[f"{prefix}vs_{reference}_mean"], row[f"{prefix}vs_{reference}_sd"] = paired_difference(
                runs, ref_runs, kind)
        row["params_M"] = runs[0].params / 1e6
        times = [r.train_s for r in runs if r.train_s is not None]
        row["train_s"] = statistics.fmean(times) if times else math.nan
        mems = [r.peak_mem_mb for r in runs if r.peak_mem_mb is not None]
        row["peak_mem_mb"] = max(mems) if mems else math.nan
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict], sets: Sequence[str], reference: str = "lora") -> str:
    """The aggregated rows as Markdown: accuracy (percent) and, when measured, held-out loss (nats per
    reference token), each mean ± sd over seeds with the paired difference to `reference`."""
    head = ["method", *sets, "average", f"Δ vs {reference}", "params (M)", "train (s)", "peak mem (MB)", "seeds"]
    out = []
    for kind, prefix, fmt, title in (("acc", "", "{:.1f} ± {:.1f}", "accuracy, % (mean ± sd over seeds)"),
                                     ("loss", "loss_", "{:.4f} ± {:.4f}",
                                      "held-out loss, nats per reference token (mean ± sd over seeds)")):
        if kind == "loss" and all(math.isnan(r["loss_average_mean"]) for r in rows):
            continue
        lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["method"]] + [fmt.format(r[f"{prefix}{s}_mean"], r[f"{prefix}{s}_sd"]) for s in (*sets, "average")]
            d, sd = r[f"{prefix}vs_{reference}_mean"], r[f"{prefix}vs_{reference}_sd"]
            cells.append("–" if r["method"] == reference else ("{:+.1f} ± {:.1f}" if kind == "acc"
                                                              else "{:+.4f} ± {:.4f}").format(d, sd))
            cells += [f"{r['params_M']:.2f}", f"{r['train_s']:.0f}", f"{r['peak_mem_mb']:.0f}", r["seeds"]]
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def csv_text(rows: Sequence[dict]) -> str:
    """Rows of dicts (same keys) as CSV text."""
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_tables(out: Path, name: str, results: Sequence[RunResult], sets: Sequence[str]) -> str:
    """Write OUT/{name}_results.md/.csv and OUT/{name}_runs.csv; return the Markdown table."""
    rows = aggregate(results, sets)
    table = markdown_table(rows, sets)
    atomic_write_text(out / f"{name}_results.md", table + "\n")
    atomic_write_text(out / f"{name}_results.csv", csv_text(rows))
    per_run = [{"method": r.method, "seed": r.seed, **{s: r.accuracy[s] for s in sets}, "average": r.average,
                **{f"loss_{s}": r.loss[s] for s in sets}, "params": r.params, "train_s": r.train_s,
                "peak_mem_mb": r.peak_mem_mb, "dir": str(r.out_dir), "flags": r.flags}
               for r in results]
    atomic_write_text(out / f"{name}_runs.csv", csv_text(per_run))
    return table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="soft_moa,lora",
                   help=f"comma-separated method names (moa/method/presets.py): {','.join(PRESETS)}")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated training seeds")
    p.add_argument("--benchmarks", default="math", help="comma-separated: math, commonsense")
    p.add_argument("--scale", choices=sorted(SCALES), default="smoke",
                   help="smoke: a few minutes per run on CPU; small: the run scripts' defaults; full: the paper")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "reproduce", help="output folder")
    p.add_argument("--tables", type=Path, default=None,
                   help="folder for the tables (default: --out); runs recorded in its runs file with the same "
                        "flags are finished (a committed results/ folder resumes on a fresh checkout)")
    p.add_argument("--stop_on_error", action="store_true",
                   help="stop at the first failed run (default: report it and run the others)")
    return p


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    p = build_parser()
    args, passthrough = p.parse_known_args(argv)
    for flag in ("--method", "--seed", "--out"):
        if flag in passthrough:
            p.error(f"{flag} is set by reproduce.py for each run; use --methods / --seeds / --out")
    return args, passthrough


def main(argv: Optional[list[str]] = None) -> int:
    args, passthrough = parse_args(argv)
    args.out = args.out.resolve()  # the run scripts work from the repository's folder
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    benchmarks = [b for b in args.benchmarks.split(",") if b]
    for b in benchmarks:
        if b not in BENCHMARK_SETS:
            print(f"reproduce.py: error: --benchmarks {b!r}: expected math or commonsense", file=sys.stderr)
            return 2
    for m in methods:  # before any run: a name the run scripts would refuse after other methods' hours
        if m not in PRESETS:
            print(f"reproduce.py: error: --methods {m!r}: unknown method; known: {','.join(PRESETS)}",
                  file=sys.stderr)
            return 2
    scale_flags = [x for k, v in SCALES[args.scale].items() if f"--{k}" not in passthrough for x in (f"--{k}", v)]
    flags = scale_flags + passthrough
    tables = (args.tables or args.out).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    tables.mkdir(parents=True, exist_ok=True)
    failed = []
    for benchmark in benchmarks:
        sets = BENCHMARK_SETS[benchmark]
        name = f"{benchmark}_{args.scale}"
        recorded = recorded_results(tables / f"{name}_runs.csv", sets, " ".join(flags))
        results = []
        # Seed-major: every method's first seed comes first, so a table that is cut short still compares
        # all methods.
        for seed in seeds:
            for method in methods:
                directory = run_dir(args.out, args.scale, benchmark, method, seed)
                if (method, seed) in recorded and not (directory / SUMMARY_FILE).is_file():
                    print(f"=== {benchmark} / {method} / seed {seed}: finished, skipped (recorded in "
                          f"{tables / f'{name}_runs.csv'})")
                    results.append(recorded[(method, seed)])
                    write_tables(tables, name, results, sets)
                    continue
                if (directory / SUMMARY_FILE).is_file():
                    print(f"=== {benchmark} / {method} / seed {seed}: finished, skipped ({directory})")
                else:
                    try:
                        run_one(benchmark, method, seed, directory, flags)
                    except subprocess.CalledProcessError as e:
                        failed.append(f"{benchmark}/{method}/seed{seed} (exit {e.returncode})")
                        if args.stop_on_error:
                            print(f"reproduce.py: stopped: {failed[-1]} failed", file=sys.stderr)
                            return 1
                        continue
                results.append(read_result(directory, method, seed, sets))
                results[-1].flags = " ".join(flags)
                write_tables(tables, name, results, sets)  # after every run: a cut-off reproduction keeps it
        if results:
            results.sort(key=lambda r: (methods.index(r.method), seeds.index(r.seed)))
            print(f"\n{benchmark} ({args.scale}):\n" + write_tables(tables, name, results, sets))
            print(f"written: {tables / f'{name}_results.md'}, .csv and {name}_runs.csv")
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
