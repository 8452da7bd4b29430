"""Answer one question with a base model in its chat format (greedy by default).

    python scripts/chat.py --ckpt_dir models/smollm2 "What is the capital of France?"
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from llama.checkpoint import load_model
from llama.generation import generate
from moa.cli import error_line
from moa.infer.dtype import DTYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt_dir", required=True, help="base-model directory (params.json, consolidated.NN.pth, tokenizer)")
    p.add_argument("question", help="the user's message")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--max_gen_len", type=int, default=256, help="most new tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)

    t0 = time.perf_counter()
    try:
        model, tokenizer = load_model(a.ckpt_dir, dtype=DTYPES[a.dtype], device=a.device)
    except (OSError, ValueError) as e:
        sys.exit(f"chat: error: {error_line(e)}")
    messages = ([{"role": "system", "content": a.system}] if a.system else [])
    messages.append({"role": "user", "content": a.question})
    prompt = tokenizer.format_dialog(messages, add_generation_prompt=True)
    generator = torch.Generator(device=a.device).manual_seed(a.seed)
    t1 = time.perf_counter()
    out = generate(model, [prompt], a.max_gen_len, temperature=a.temperature, top_p=a.top_p,
                   tokenizer=tokenizer, generator=generator)[0]
    t2 = time.perf_counter()
    print(tokenizer.decode(out))
    print(f"[load {t1 - t0:.1f} s, {len(out)} tokens in {t2 - t1:.1f} s]", file=sys.stderr)


if __name__ == "__main__":
    main()
