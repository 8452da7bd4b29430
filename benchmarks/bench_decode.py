"""Decoding overhead: ms per new token where compute is negligible, so that what remains is the
per-step dispatch that dominates decoding on a GPU.

A random model of 8 layers, dim 64, batch 1, a 16-token prompt, 64 new tokens (greedy), 1 thread:
ours bare, ours Soft MoA (the paper's Soft MoA command's 7 types), ours Sparse MoA, each with the eager decode step
and with the captured one (`generate(compile_decode=True)`: one torch.compile'd graph; CUDA graphs on a
GPU; compiled in a warm-up call that is not timed), and transformers' `LlamaForCausalLM` (same weights)
`generate`. Goals: Soft MoA <= 1.5x ours bare (each step kind against its own bare); ours bare below
transformers'.

    python benchmarks/bench_decode.py                         # this tree
    python benchmarks/bench_decode.py --before /tmp/before    # also a copy of older llama/ and moa/,
                                                              # timed in turns in the same run

With `--before ROOT`, each round runs every configuration once under this tree and once under ROOT
(a folder holding `llama/` and `moa/`), each in its own subprocess, so machine load hits both alike; a
configuration a tree cannot run (the captured step, before it existed) prints "-".
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
CAPTURED = ", captured step"
CONFIGS = ("ours bare", "ours Soft MoA", "ours Sparse MoA", "ours bare" + CAPTURED, "ours Soft MoA" + CAPTURED,
           "ours Sparse MoA" + CAPTURED, "transformers bare")
SMALL = dict(dim=64, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=256)


PRESETS = {"ours Soft MoA": "soft_moa", "ours Sparse MoA": "sparse_moa"}  # of moa/method/presets.py


def adapter_flags(config: str) -> dict | None:
    """The `MoAConfig` keywords of `config`: its preset over SMALL's layers; None for a bare model. Computed by
    this tree (an older tree under `--before` may predate the presets) and handed to `measure`."""
    preset = PRESETS.get(config.removesuffix(CAPTURED))
    if preset is None:
        return None
    from moa.method.presets import get_preset

    return dict(get_preset(preset).flag_values(SMALL["n_layers"]))


def _build(config: str, device: str = "cpu", flags: dict | None = None):
    """A callable generating the new tokens of one configuration, fresh random weights (seed 0), on `device`;
    `flags`: its adapters' `MoAConfig` keywords (`adapter_flags(config)`)."""
    import torch

    from llama.generation import generate
    from llama.model import ModelArgs, Transformer

    captured = config.endswith(CAPTURED)
    config = config.removesuffix(CAPTURED)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**SMALL)).eval()
    prompt = [list(range(1, 17))]
    if config == "transformers bare":
        return _hf_generate(model, prompt, device)
    if config != "ours bare":
        from moa import MoAConfig, attach_adapters
        from moa.method.inject import reset_adapter_parameters

        attach_adapters(model, MoAConfig(**(adapter_flags(config) if flags is None else flags)))
        reset_adapter_parameters(model)
        with torch.no_grad():  # non-zero adapters, so every expert and router really computes
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.02)
        model.eval()
    model.to(device)
    if captured:
        return lambda: generate(model, prompt, NEW_TOKENS, stop_tokens=[], compile_decode=True)
    return lambda: generate(model, prompt, NEW_TOKENS, stop_tokens=[])


def _hf_generate(model, prompt, device: str):
    """transformers' LlamaForCausalLM with `model`'s weights (tests/hf_reference.py's twin), greedy `generate`."""
    import torch
    from references import hf_twin

    hf = hf_twin(model).eval().to(device)
    ids = torch.tensor(prompt, device=device)

    def run():
        with torch.inference_mode():
            return hf.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                               pad_token_id=0)
    return run


NEW_TOKENS = 64


def measure(config: str, repeats: int, device: str = "cpu", flags: dict | None = None) -> float:
    """Best-of-`repeats` ms per new token of one configuration, in this process (1 CPU thread); `flags` as
    `_build`."""
    import torch

    torch.set_num_threads(1)
    fn = _build(config, device, flags)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()  # warm-up (compiles the captured step)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best / NEW_TOKENS * 1e3


def _child(root: Path, config: str, repeats: int, device: str) -> float:
    """`measure` in a subprocess importing llama/ and moa/ from `root`; NaN where that tree cannot run
    the configuration (a captured step before `compile_decode` existed)."""
    if config.endswith(CAPTURED) and "compile_decode" not in (root / "llama" / "generation.py").read_text():
        return float("nan")
    # PYTHONPATH comes before the installed (editable) package, so `root`'s llama/ and moa/ are the ones imported
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(root), str(HERE / "benchmarks")]))
    code = f"import bench_decode as b; print(b.measure({config!r}, {repeats}, {device!r}, {adapter_flags(config)!r}))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, default=None, help="a folder with older llama/ and moa/ to compare")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5, help="generations per measurement (best one kept)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    roots = {"after": HERE} if a.before is None else {"before": a.before.resolve(), "after": HERE}
    times: dict[tuple[str, str], list[float]] = {(r, c): [] for r in roots for c in CONFIGS}
    for _ in range(a.rounds):
        for config in CONFIGS:
            for name, root in roots.items():
                times[(name, config)].append(_child(root, config, a.repeats, a.device))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"decode ms/token: 8 layers, dim 64, batch 1, {NEW_TOKENS} new tokens, 1 CPU thread, {a.device}; "
          f"median of {a.rounds} rounds (best of {a.repeats} each)\n")
    print("| config | " + " | ".join(roots) + " |")
    print("|---|" + "---|" * len(roots))
    for config in CONFIGS:
        print(f"| {config} | " + " | ".join("-" if math.isnan(med[(r, config)]) else f"{med[(r, config)]:.2f}"
                                           for r in roots) + " |")
    for r in roots:
        for step in ("", CAPTURED):
            bare = med[(r, "ours bare" + step)]
            if math.isnan(bare):
                continue
            print(f"\n{r}{step or ', eager step'}: Soft MoA / bare {med[(r, 'ours Soft MoA' + step)] / bare:.2f}x "
                  f"(goal <= 1.5x), Sparse MoA / bare {med[(r, 'ours Sparse MoA' + step)] / bare:.2f}x, "
                  f"bare / transformers {bare / med[(r, 'transformers bare')]:.2f}x (goal < 1)")
    print("\n" + json.dumps({f"{r}|{c}": None if math.isnan(v) else round(v, 3) for (r, c), v in med.items()}))


if __name__ == "__main__":
    main()
