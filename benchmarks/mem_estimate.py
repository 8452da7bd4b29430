"""Peak memory of one LLaMA-3.1-8B training step with the paper's Soft MoA command's flags, without a GPU.

The whole 32-layer model runs one step (forward, label-only loss, backward, AdamW) on fake tensors
(`FakeTensorMode`: shapes and dtypes, no data), counted by `moa.train.memory.LiveBytes` (the bytes
of every live storage). As `main_finetune.py --bf16 True`: bf16 base weights, fp32 adapters and AdamW
state, bf16 autocast; batch 8 x 300 (the first `--prompt_len` tokens of each row are prompt, the
rest labels), with and without activation checkpointing (`--grad_checkpointing True`). tests/test_mem_estimate.py
checks the same count against the CPU allocator's measured peak at a small shape.

    python benchmarks/mem_estimate.py                       # the 8B table (about a minute on 2 cores)
    python benchmarks/mem_estimate.py --n_layers 2          # a quicker look
"""
from __future__ import annotations

import argparse

import torch
from bench_train import LLAMA31_8B, adapter_configs
from torch._subclasses import FakeTensorMode

from llama.model import ModelArgs, Transformer
from moa import attach_adapters
from moa.train.memory import CATEGORIES, block_label_step, count_step_peak
from moa.train.schedule import make_adamw

GOAL_GB = 20.0
SOFT_MOA = "ours Soft MoA (paper's command)"


def _bf16_transformer(args: ModelArgs) -> Transformer:
    """The base built straight in bf16 (as `load_model(dtype=torch.bfloat16)`: norms included)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return Transformer(args)
    finally:
        torch.set_default_dtype(old)


def fake_step_peak(n_layers: int, batch: int, seq_len: int, prompt_len: int, grad_ckpt: bool,
                   config: str = SOFT_MOA) -> dict[str, int]:
    """Bytes per category at the peak of one bf16 step of the 8B shape (first `n_layers` blocks), plus 'peak'."""
    args = ModelArgs(**dict(LLAMA31_8B, n_layers=n_layers), max_seq_len=max(seq_len, 2048))
    with FakeTensorMode():
        model = _bf16_transformer(args)
        attach_adapters(model, adapter_configs(n_layers)[config])
        model.train()
        model.grad_checkpointing = grad_ckpt
        optimizer = make_adamw(model, 1e-4, 0.02)
        tokens = torch.randint(0, args.vocab_size, (batch, seq_len))
        counter = count_step_peak(model, optimizer, block_label_step(model, optimizer, tokens, prompt_len, True),
                                  args.vocab_size)
    return dict(counter.at_peak, peak=counter.peak)


def print_table(rows: dict[str, dict[str, int]]) -> None:
    """One Markdown table, GB (10^9 bytes) per category, a column per setting."""
    names = list(rows)
    print("| GB at the peak | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for cat in (*CATEGORIES, "peak"):
        print(f"| {cat} | " + " | ".join(f"{rows[n].get(cat, 0) / 1e9:.2f}" for n in names) + " |")
    worst = max(r["peak"] for r in rows.values()) / 1e9
    print(f"\ngoal <= {GOAL_GB:.0f} GB: {'met' if worst <= GOAL_GB else 'NOT met'} (largest peak {worst:.2f} GB; "
          "storage bytes, without the CUDA allocator's rounding, workspaces or the CUDA context)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=300)
    ap.add_argument("--prompt_len", type=int, default=100, help="prompt tokens per row (label -100)")
    a = ap.parse_args()
    rows = {f"--grad_checkpointing {flag}": fake_step_peak(a.n_layers, a.batch, a.seq_len, a.prompt_len, flag)
            for flag in (False, True)}
    print(f"LLaMA-3.1-8B shape, {a.n_layers} layers, Soft MoA (the paper's command), bf16 base + fp32 adapters/AdamW, "
          f"batch {a.batch} x {a.seq_len} ({a.seq_len - a.prompt_len} labels per row), one step on fake tensors\n")
    print_table(rows)


if __name__ == "__main__":
    main()
