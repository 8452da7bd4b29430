"""Generate predictions for a test set with a base model and, optionally, trained adapters.

    torchrun --nproc_per_node N example.py --ckpt_dir MODEL/ --adapter_path OUT/adapter.pth \\
        --data_path data/math/gsm8k/test.json --save_path OUT/gsm8k_predict_mingen120.jsonl \\
        --max_gen_len 200 --min_gen_len 120 --max_batch_size 200 --temperature 0.1 --top_p 0.75

Also runs as plain `python example.py ...`. Without --adapter_path the bare base model answers (a
baseline). With a task registry (--adapter_registry, or Adapters Selector's --data_config with --adapter_pool)
and --selector, each row runs on the task adapter(s) the selector picks (moa/tasks/routing.py).
Writes one JSON line per test row, in the test file's order (docs/formats.md, "predictions"); an
interrupted run resumes where it stopped. How prompts are cut, batched and split across ranks:
moa/infer/generate.py.
"""
from __future__ import annotations

import argparse
import os
import sys

from moa.checks import check_writable
from moa.cli import one_line_errors, str2bool
from moa.infer.generate import InferenceConfig, format_summary, run_inference
from moa.tasks.routing import check_routing_flags, generation_routing


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt_dir", required=True,
                   help="base-model directory (params.json, consolidated.NN.pth, tokenizer.model)")
    p.add_argument("--adapter_path", default=None,
                   help="adapter.pth with adapter_params.json beside it; omit to run the bare base model")
    p.add_argument("--adapter_registry", default=None,
                   help="task-adapter registry (JSON {domain: {task: {adapter, data}}} or a domain/task/ tree): "
                        "each row runs with the adapter(s) --selector picks (instead of --adapter_path); plain "
                        "LoRAs share batches, any other adapter (Soft MoA, HydraLoRA, ...) runs its rows attached")
    p.add_argument("--data_config", default=None,
                   help="instead of --adapter_registry, a data config and an adapter pool (the Adapters Selector "
                        "data-config format): the data config, JSON {domain: {task: "
                        "data_path}} or a tree domain/task/train.json (with --adapter_pool)")
    p.add_argument("--adapter_pool", default=None,
                   help="the adapter pool, JSON {domain: {task: adapter_path}} (with --data_config)")
    p.add_argument("--selector", default=None, help="selector file from scripts/train_selector.py (with "
                   "--adapter_registry, or --data_config and --adapter_pool)")
    p.add_argument("--fusion", default="top1", choices=["top1", "topp"],
                   help="top1: the selector's most probable task adapter per row; topp: the fusion of the "
                        "adapters whose probabilities reach --top_p_adapters, weighted by them (DLP-LoRA); plain "
                        "LoRAs only, except a row whose set is one non-LoRA adapter alone (it runs on it, top-1)")
    p.add_argument("--top_p_adapters", type=float, default=0.9, help="probability mass of the fused adapters "
                   "(--fusion topp)")
    p.add_argument("--data_path", required=True, help="test set: JSON list of {instruction, input, output, answer}")
    p.add_argument("--save_path", required=True, help="prediction file to write (.jsonl)")
    p.add_argument("--max_gen_len", type=int, default=200, help="most new tokens per row")
    p.add_argument("--min_gen_len", type=int, default=120,
                   help="a longer prompt is shortened (its input first) so that this many tokens remain "
                        "for generation within --max_seq_len")
    p.add_argument("--max_seq_len", type=int, default=None,
                   help="cap on prompt + generation tokens; default: the adapter's training max_seq_len "
                        "(bare model: the model's context); 0: the model's context")
    p.add_argument("--max_batch_size", type=int, default=32, help="rows generated together (per rank)")
    p.add_argument("--temperature", type=float, default=0.1, help="0 is greedy")
    p.add_argument("--top_p", type=float, default=0.75, help="nucleus sampling mass (temperature > 0)")
    p.add_argument("--seed", type=int, default=1, help="sampling seed (each rank uses seed + rank)")
    p.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False,
                   help="True: redo an existing prediction file and discard partial files of an interrupted run")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' dtype; auto: bfloat16 where the device declares native bf16 (CUDA with bf16; "
                        "CPU flags amx_bf16 or avx512_bf16, $MOA_CPU_FLAGS overrides), else float32; a rerun "
                        "reuses the choice recorded with its partial or complete file")
    p.add_argument("--kv_cache_dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the KV cache's dtype; auto: the weights' dtype, but float32 under bf16/fp16 weights on a "
                        "CPU without amx_bf16 (its half-precision attention is slow); a rerun reuses the recorded choice")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    p.add_argument("--compile_decode", type=str2bool, nargs="?", const=True, default=False,
                   help="run the decode steps as one graph captured by torch.compile (CUDA graphs on a GPU): "
                        "less per-step overhead, after a first step that compiles (seconds to a minute); "
                        "falls back to eager with a warning where compiling fails")
    p.add_argument("--progress", type=str2bool, nargs="?", const=True, default=True, help="tqdm progress bar")
    return p


def parse_args(argv: list[str] | None = None) -> InferenceConfig:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        cfg = InferenceConfig(**vars(a))
        check_routing_flags(cfg.adapter_path, cfg.adapter_registry, cfg.selector, cfg.fusion, cfg.top_p_adapters,
                            cfg.data_config, cfg.adapter_pool)
        return cfg
    except ValueError as e:
        p.error(str(e))


@one_line_errors("example.py", status=1)
def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    check_writable("save_path", cfg.save_path)  # before any model is loaded
    try:
        # The task registry's routing is built here, from moa.tasks, and handed to generation.
        summary = run_inference(cfg, routing=generation_routing(cfg))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"example.py: error: {e}")
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        print(format_summary(summary, cfg.min_gen_len))


if __name__ == "__main__":
    main()
