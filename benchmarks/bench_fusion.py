"""Many task LoRAs on one model: the time of one batched generation when every
row has its own adapter(s), against the same batch on one adapter.

The bundled SmolLM2-135M (models/smollm2; `scripts/run_math.sh` imports it), batch 8 (the first 8
GSM8K test prompts), 64 new tokens, greedy, no early stop, fp32. A bank of N random LoRAs (r 8,
alpha 8, Q,K,V,O,FFN_DOWN, every layer, B ~ N(0, 0.02) so that every adapter really changes the
output) is attached once (`moa.tasks.fusion.attach_bank`). Rows:

    single LoRA            the standard one-adapter model (`LoRALinear`, moa.attach_adapters)
    bank: 8 rows, 1 adapter     every row on adapter 0 (top-1)
    bank: 8 rows, 8 adapters    row b on adapter b (top-1)
    bank: top-p 2 of N          row b on adapters b and b+1 mod N, weights 0.6 / 0.4

Goals: 8 adapters <= 1.3x one adapter; top-p with 2 active per row <= 1.5x, for N = 8 and 26.
Each configuration is timed `--repeats` times in turns (the median is printed), so machine load
hits all alike.

    python benchmarks/bench_fusion.py [--model models/smollm2] [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]

from llama.checkpoint import load_model
from llama.generation import generate
from moa.lora.algebra import lora_sites
from moa.method.config import MoAConfig
from moa.tasks.fusion import attach_bank, build_bank

BATCH, NEW_TOKENS = 8, 64
LORA = MoAConfig(lora_layers="0-30", lora_rank=8, lora_alpha=8.0, lora_targets="Q,K,V,O,FFN_DOWN",
                 type_router="none")


def random_lora(model: torch.nn.Module, cfg: MoAConfig, seed: int) -> dict[str, torch.Tensor]:
    """A plain LoRA state of `cfg` for `model` with A ~ U(+-1/sqrt(in)) and B ~ N(0, 0.02)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for site in lora_sites(cfg):
        out_f, in_f = model.get_submodule(site).weight.shape
        state[f"{site}.lora_A"] = (torch.rand(cfg.lora_rank, in_f, generator=g) * 2 - 1) / in_f ** 0.5
        state[f"{site}.lora_B"] = torch.randn(out_f, cfg.lora_rank, generator=g) * 0.02
    return state


def prompts(tokenizer, n: int) -> list[list[int]]:
    from moa.train.data import build_prompt

    rows = json.loads((HERE / "data/math/gsm8k/test.json").read_text())[:n]
    return [tokenizer.encode(build_prompt(r["instruction"], r.get("input", "")), bos=True, eos=False) for r in rows]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(HERE / "models/smollm2"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tokenizer = load_model(a.model, max_seq_len=1024)
    model.eval()
    cfg = dataclasses.replace(LORA, lora_layers=f"0-{model.args.n_layers}")
    batch = prompts(tokenizer, BATCH)
    loras = [random_lora(model, cfg, seed) for seed in range(26)]

    def run(m):
        return generate(m, batch, NEW_TOKENS, stop_tokens=[])

    from moa import attach_adapters
    single, _ = load_model(a.model, max_seq_len=1024)
    attach_adapters(single, cfg)
    single.load_state_dict(loras[0], strict=False)
    single.eval()

    cases = {"single LoRA (LoRALinear)": (lambda: run(single))}
    banks = {n: attach_bank(load_model(a.model, max_seq_len=1024)[0].eval(),
                            build_bank([f"t{i}" for i in range(n)], [(cfg, s) for s in loras[:n]])) for n in (8, 26)}

    def rows(bank, pairs):
        w = torch.zeros(BATCH, bank.bank.n)
        for b, entries in enumerate(pairs):
            for i, wi in entries:
                w[b, i] = wi
        return w

    def banked(bank, w):
        def go():
            with bank.rows(w):
                return run(bank.model)
        return go

    one = rows(banks[8], [[(0, 1.0)]] * BATCH)
    eight = rows(banks[8], [[(b, 1.0)] for b in range(BATCH)])
    cases["bank N=8: 8 rows, 1 adapter"] = banked(banks[8], one)
    cases["bank N=8: 8 rows, 8 adapters"] = banked(banks[8], eight)
    for n in (8, 26):
        cases[f"bank N={n}: top-p, 2 per row"] = banked(banks[n], rows(banks[n], [[(b % n, 0.6), ((b + 1) % n, 0.4)]
                                                                                  for b in range(BATCH)]))
    # Exactness of the mixed batch: row b equals the single-adapter model on its own LoRA b (greedy).
    with banks[8].rows(eight):
        mixed = run(banks[8].model)
    for b in (0, 5):
        single.load_state_dict(loras[b], strict=False)
        assert mixed[b] == generate(single, [batch[b]], NEW_TOKENS, stop_tokens=[])[0], f"row {b} differs"
    single.load_state_dict(loras[0], strict=False)

    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(a.repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["bank N=8: 8 rows, 1 adapter"])
    print(f"batch {BATCH}, {NEW_TOKENS} new tokens, fp32, {a.threads} threads, median of {a.repeats}; "
          f"rows 0 and 5 of the mixed batch equal their adapter alone (greedy)")
    print("| configuration | s | x bank 1 adapter |\n|---|---:|---:|")
    for name, ts in times.items():
        s = statistics.median(ts)
        print(f"| {name} | {s:.2f} | {s / ref:.2f} |")


if __name__ == "__main__":
    main()
