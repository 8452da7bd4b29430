"""Training step time: our LoRA r8 vs transformers + PEFT LoRA r8 on the same shape and weights, and our
Soft MoA / Sparse MoA, printed as one table.

    pip install peft                                  # benchmark only, not a project dependency
    python benchmarks/bench_train.py                  # SmolLM2-135M shape, 4 x 256, fp32, CPU
    python benchmarks/bench_train.py --device cuda --dtype bfloat16

A step = forward + loss + backward + AdamW step, on one batch whose first `--prompt_len` tokens of every
row are prompt (label -100) and the rest response. Ours computes logits only at label positions (the
trainer's `CausalLMLoss`); transformers computes them everywhere (its standard causal-LM loss). The
configurations are timed in turns, one step each per round, so a change in machine load hits all of
them alike; the table gives the median over rounds.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llama.model import ModelArgs, Transformer  # noqa: E402
from moa import MoAConfig, RouterStats, attach_adapters  # noqa: E402
from moa.schedule import ADAMW_BETAS  # noqa: E402
from moa.trainer import CausalLMLoss, DistEnv, forward_backward  # noqa: E402
from tests.hf_reference import hf_twin  # noqa: E402

SMOLLM2 = dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, multiple_of=256,
               norm_eps=1e-5, rope_theta=100000.0)
TARGETS = "Q,K,V,O,FFN_DOWN"
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
CONFIGS = {
    "ours LoRA r8": dict(lora_layers="0-30", lora_rank=8, lora_alpha=8, lora_targets=TARGETS, type_router="none"),
    "ours Soft MoA (seed command)": dict(lora_layers="0-30", lora_rank=8, lora_alpha=8, lora_targets=TARGETS,
                                         hydra_moe=True, p_adapter_layers="0-30", p_adapter_size=16,
                                         p_adapter_hydra=True, prompt_layers="0-30", prompt_len=10, swi_x=4),
    "ours Sparse MoA": dict(lora_layers="0-30", lora_rank=8, lora_alpha=8, lora_targets=TARGETS,
                            p_adapter_layers="0-30", p_adapter_size=16, swi_x=4, type_router="sparse"),
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="base weights (adapters stay fp32; bfloat16 also turns on autocast)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--prompt_len", type=int, default=128, help="masked tokens at the start of each row")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    try:
        import peft
    except ImportError:
        sys.exit("error: this benchmark compares with PEFT: pip install peft")
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    bf16 = dtype == torch.bfloat16
    torch.manual_seed(0)

    base = Transformer(ModelArgs(**SMOLLM2, max_seq_len=args.seq_len))
    tokens = torch.randint(0, SMOLLM2["vocab_size"], (args.batch, args.seq_len))
    labels = tokens.clone()
    labels[:, :args.prompt_len] = -100
    batch = {"tokens": tokens, "labels": labels, "token_mask": torch.ones_like(tokens, dtype=torch.bool)}

    steps, models = {}, {}
    for name, flags in CONFIGS.items():
        model = Transformer(ModelArgs(**SMOLLM2, max_seq_len=args.seq_len))
        model.load_state_dict(base.state_dict())
        model = attach_adapters(model.to(device, dtype), MoAConfig(**flags)).train()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, betas=ADAMW_BETAS)
        loss_module = CausalLMLoss(model)

        def step(loss_module=loss_module, opt=opt):
            forward_backward(loss_module, [batch], DistEnv(device=device), bf16)
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[name], models[name] = step, model

    hf = peft.get_peft_model(hf_twin(base).to(device, dtype).train(),
                             peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=PEFT_TARGETS))
    hf_opt = torch.optim.AdamW([q for q in hf.parameters() if q.requires_grad], lr=1e-4, betas=ADAMW_BETAS)
    hf_tokens, hf_labels = tokens.to(device), labels.to(device)

    def hf_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = hf(input_ids=hf_tokens, labels=hf_labels).loss
        loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
    steps["transformers + PEFT LoRA r8"] = hf_step

    times: dict[str, list[float]] = {name: [] for name in steps}
    for name, fn in steps.items():  # warm-up
        fn()
    for _ in range(args.rounds):
        for name, fn in steps.items():
            sync(args.device)
            t0 = time.perf_counter()
            fn()
            sync(args.device)
            times[name].append(time.perf_counter() - t0)

    with RouterStats(models["ours Sparse MoA"]) as stats, torch.no_grad():
        models["ours Sparse MoA"](tokens.to(device))
    active = [v["active"] for layer in stats.summary().values() for v in layer.values()]
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    ref = median["transformers + PEFT LoRA r8"]
    trainable = {name: sum(q.numel() for q in m.parameters() if q.requires_grad) for name, m in models.items()}
    trainable["transformers + PEFT LoRA r8"] = sum(q.numel() for q in hf.parameters() if q.requires_grad)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nSmolLM2-135M shape, random weights, {args.dtype} base, batch {args.batch} x {args.seq_len} "
          f"({args.seq_len - args.prompt_len} label tokens per row), {where}, median of {args.rounds} rounds")
    print("| configuration | trainable params | step time (s) | tokens/s | time vs PEFT LoRA r8 |")
    print("|---|---|---|---|---|")
    for name, t in median.items():
        print(f"| {name} | {trainable[name]:,} | {t:.3f} | {args.batch * args.seq_len / t:,.0f} | {t / ref:.2f}x |")
    print(f"\nSparse MoA: {100 * sum(active) / len(active):.0f}% of (token, type) pairs ran their expert "
          "(fresh router, default --max_threshold 0.5)")


if __name__ == "__main__":
    main()
