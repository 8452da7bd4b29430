"""Our LLaMA vs transformers' LlamaForCausalLM on the same shape and weights: forward+backward time and
batched greedy generation tokens/s, printed as one table.

    python benchmarks/bench_llama.py                       # SmolLM2-135M shape, fp32, CPU
    python benchmarks/bench_llama.py --device cuda --dtype bfloat16

Random weights (speed does not depend on them); greedy generation runs the full `--new_tokens` on both
sides (no stop token), so both produce the same number of tokens.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llama.generation import generate  # noqa: E402
from llama.model import ModelArgs, Transformer  # noqa: E402
from tests.hf_reference import hf_twin  # noqa: E402

SMOLLM2 = dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, multiple_of=256,
               norm_eps=1e-5, rope_theta=100000.0)


def timed(fn, device: str, repeat: int) -> float:
    """Median seconds of `repeat` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--train_batch", type=int, default=4)
    p.add_argument("--train_len", type=int, default=256)
    p.add_argument("--gen_batch", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    ours = Transformer(ModelArgs(**SMOLLM2, max_seq_len=1024)).to(args.device, dtype)
    theirs = hf_twin(ours).to(args.device, dtype)
    vocab = SMOLLM2["vocab_size"]
    tokens = torch.randint(0, vocab, (args.train_batch, args.train_len), device=args.device)

    def step(model, get_logits):
        def run():
            model.zero_grad(set_to_none=True)
            logits = get_logits(model)
            F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten()).backward()
        return run

    ours.train(), theirs.train()
    t_ours = timed(step(ours, lambda m: m(tokens)), args.device, args.repeat)
    t_hf = timed(step(theirs, lambda m: m(tokens).logits), args.device, args.repeat)

    ours.eval(), theirs.eval()
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.gen_batch,), generator=g).tolist()
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]
    n_new = args.gen_batch * args.new_tokens

    def gen_ours():
        generate(ours, prompts, args.new_tokens, stop_tokens=[])

    width = max(lens)
    padded = torch.zeros(args.gen_batch, width, dtype=torch.long, device=args.device)
    mask = torch.zeros_like(padded)
    for i, pr in enumerate(prompts):  # left padding, transformers' convention for batched generation
        padded[i, width - len(pr):] = torch.tensor(pr)
        mask[i, width - len(pr):] = 1

    def gen_hf():
        with torch.inference_mode():
            theirs.generate(padded, attention_mask=mask, max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)

    g_ours = timed(gen_ours, args.device, args.repeat)
    g_hf = timed(gen_hf, args.device, args.repeat)

    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nSmolLM2-135M shape, random weights, {args.dtype}, {name}")
    print(f"| measure | ours | transformers | ours/transformers |")
    print(f"|---|---|---|---|")
    print(f"| forward+backward {args.train_batch}x{args.train_len} (s) | {t_ours:.3f} | {t_hf:.3f} | {t_ours / t_hf:.2f}x time |")
    print(f"| greedy generation bs {args.gen_batch}, {args.new_tokens} new tokens (tokens/s) | "
          f"{n_new / g_ours:.1f} | {n_new / g_hf:.1f} | {g_hf / g_ours:.2f}x speed |")


if __name__ == "__main__":
    main()
