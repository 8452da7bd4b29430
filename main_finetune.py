"""Fine-tune MoA adapters on a frozen LLaMA base (the paper's math setting):

    torchrun --nproc_per_node N main_finetune.py --llama_path MODEL/ --data_path DATA/train.json \\
      --expert_num 1 --lora_layers 0-32 --lora_rank 8 --lora_targets Q,K,V,O,FFN_DOWN --lora_alpha 8 \\
      --hydra_moe True --seed 0 --p_adapter_layers 0-32 --p_adapter_size 16 --p_adapter_hydra True \\
      --prompt_layers 0-32 --prompt_len 10 --swi_x 4 --max_seq_len 300 --batch_size 8 \\
      --accum_iter $((32/N/8)) --epochs 2 --warmup_epochs 1 --blr 6e-3 --flash_attention2 False \\
      --bf16 True --weight_decay 0.02 --output_dir OUT/ --num_workers 10

Plain `python main_finetune.py ...` runs one process. Writes OUT/checkpoint-{epoch}.pth and OUT/log.txt.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from moa import MoAConfig
from moa.checks import check_writable
from moa.cli import bool_or_auto, one_line_errors, str2bool
from moa.train.trainer import TrainConfig, finetune, resolve_bf16

REPO_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MoA fine-tuning of a frozen LLaMA base (see docs/training.md).")

    def flag_bool(name: str, default: bool, help: str) -> None:
        p.add_argument(f"--{name}", type=str2bool, nargs="?", const=True, default=default, metavar="True|False",
                       help=f"{help} (default {default}; a bare flag means True)")

    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--llama_path", required=True, help="base-model directory: params.json, consolidated.NN.pth, "
                    "tokenizer.model")
    io.add_argument("--data_path", required=True, help="Alpaca-format JSON list of {instruction, input, output}")
    io.add_argument("--output_dir", default="./output_dir", help="where checkpoint-{epoch}.pth and log.txt go")
    io.add_argument("--data_root", default=REPO_DATA, help="folder of the test sets (math/*/test.json, "
                    "commonsense/*/test.json) whose questions are left out of training")
    flag_bool("keep_test_overlap", False, "keep training rows that repeat a test-set question")
    io.add_argument("--resume", default="", help="continue from this checkpoint-{epoch}.pth")
    flag_bool("overwrite", False, "replace another run's checkpoint-*.pth and log.txt in --output_dir (without it, "
              "a folder holding them is refused unless --resume with the same settings)")
    io.add_argument("--log_every", type=int, default=10, help="optimizer steps between log.txt lines")

    tr = p.add_argument_group("training")
    tr.add_argument("--max_seq_len", type=int, default=300, help="tokens per example (prompt + response)")
    tr.add_argument("--max_batch_size", type=int, default=32, help="accepted for the research workflow's command "
                    "lines; training ignores it (the batch is --batch_size)")
    tr.add_argument("--batch_size", type=int, default=8, help="sequences per micro-batch per process")
    tr.add_argument("--accum_iter", type=int, default=1, help="micro-batches per optimizer step")
    tr.add_argument("--epochs", type=int, default=2)
    tr.add_argument("--warmup_epochs", type=float, default=1.0, help="linear warmup length (fractional allowed)")
    tr.add_argument("--start_epoch", type=int, default=0, help="first epoch (a --resume sets it from the checkpoint)")
    tr.add_argument("--blr", type=float, default=6e-3, help="base lr: lr = blr * effective batch / 256")
    tr.add_argument("--lr", type=float, default=None, help="absolute peak lr (overrides --blr)")
    tr.add_argument("--min_lr", type=float, default=0.0, help="lr at the end of the cosine")
    tr.add_argument("--weight_decay", type=float, default=0.02, help="AdamW weight decay (matrices only)")
    flag_bool("w_bias", False, "also train the base's norms and biases")
    tr.add_argument("--bf16", type=bool_or_auto, nargs="?", const=True, default=False, metavar="True|False|auto",
                    help="frozen base in bf16 with bf16 autocast (adapters stay fp32); auto: bf16 where the "
                         "device declares native bf16 (CUDA with bf16; CPU flags amx_bf16 or avx512_bf16, "
                         "$MOA_CPU_FLAGS overrides), else fp32; a rerun or --resume reuses the recorded choice "
                         "(default False)")
    flag_bool("grad_checkpointing", False, "recompute each block in backward (activation memory)")
    flag_bool("flash_attention2", False, "flash-attn when installed (CUDA, bf16), else PyTorch SDPA")
    flag_bool("compile_kernels", False, "fuse RMSNorm and SwiGLU into one kernel each with torch.compile "
              "(seconds of compiling at the first step; eager with a warning where no compiler works)")
    tr.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    tr.add_argument("--seed", type=int, default=0, help="every RNG is seeded with seed + rank")
    tr.add_argument("--num_workers", type=int, default=2, help="DataLoader worker processes")

    ad = p.add_argument_group("adapters (docs/method.md; defaults: every type off)")
    for f in dataclasses.fields(MoAConfig):
        if isinstance(f.default, bool):
            flag_bool(f.name, f.default, f.metadata["help"])
        else:
            ad.add_argument(f"--{f.name}", type=type(f.default), default=f.default,
                            help=f"{f.metadata['help']} (default {f.default})")
    return p


@one_line_errors("main_finetune.py")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    values = vars(args)
    moa_names = {f.name for f in dataclasses.fields(MoAConfig)}
    try:
        check_writable("output_dir", args.output_dir, folder=True)  # before the model and a whole epoch
        # --bf16 auto: the device's declared features decide, or a rerun's recorded choice (resolve_bf16);
        # the checkpoints' args keep bf16 as asked (compared on --resume) and bf16_resolved.
        bf16, report = resolve_bf16(values["bf16"], values["device"], values["output_dir"], values["resume"],
                                    values["overwrite"])
        if values["bf16"] == "auto":
            print(report)
        values["bf16_resolved"] = bf16
        train_values = {k: v for k, v in values.items() if k not in moa_names and k != "bf16_resolved"}
        train_values.update(bf16=bf16, bf16_requested="auto" if values["bf16"] == "auto" else None)
        moa_cfg = MoAConfig(**{k: v for k, v in values.items() if k in moa_names})
        train_cfg = TrainConfig(**train_values)
        finetune(train_cfg, moa_cfg, values)
    except (ValueError, OSError) as e:  # user mistakes name the flag/file/row; OSError: unwritable --output_dir, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
