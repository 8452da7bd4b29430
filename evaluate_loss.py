"""Held-out loss of a test set: the mean negative log-likelihood per token of each row's reference output.

    torchrun --nproc_per_node N evaluate_loss.py --ckpt_dir MODEL/ --adapter_path OUT/adapter.pth \\
        --data_path data/math/gsm8k/test.json --save_path OUT/gsm8k_loss.jsonl --max_batch_size 16

Also runs as plain `python evaluate_loss.py ...`; without --adapter_path the bare base model is scored
(a baseline). Teacher-forced, one forward per batch, no generation: the reference `output` (+ EOS) is
scored given the row's Alpaca prompt, exactly the tokens and labels training uses. Writes one JSON line
per test row in the test file's order (`nll`: mean per token, `tokens`, `instruction`, `input`,
`nll_sum`, `cut_tokens`) and appends one summary line to loss_score.jsonl beside it:
{"set", "nll_per_token" (total NLL / total tokens), "rows", "tokens", "adapter", "data_path",
"save_path"}. An interrupted run resumes where it stopped. Details: moa/infer/loss.py.
"""
from __future__ import annotations

import argparse
import os
import sys

from moa.checks import check_writable
from moa.cli import one_line_errors, str2bool

PROG = "evaluate_loss.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2
        sys.stderr.write(f"{PROG}: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt_dir", required=True,
                   help="base-model directory (params.json, consolidated.NN.pth, tokenizer.model)")
    p.add_argument("--adapter_path", default=None,
                   help="adapter.pth with adapter_params.json beside it; omit to score the bare base model")
    p.add_argument("--data_path", required=True,
                   help="test set: JSON list of {instruction, input, output}; every row needs a non-empty output")
    p.add_argument("--save_path", required=True,
                   help="per-row loss file to write (.jsonl); the summary line goes to loss_score.jsonl beside it")
    p.add_argument("--max_seq_len", type=int, default=None,
                   help="cap on prompt + output tokens: a longer row keeps its whole prompt and the output's "
                        "first tokens that fit, and only those kept tokens are scored (the row's cut_tokens "
                        "counts the dropped ones); a prompt that leaves no room is an error. Default (or 0): the model's "
                        "context; compare bare and adapted scores at the same value")
    p.add_argument("--max_batch_size", type=int, default=32, help="rows per forward (per rank)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"],
                   help="weights' dtype; auto: bfloat16 where the device declares native bf16 (CUDA with bf16; "
                        "CPU flags amx_bf16 or avx512_bf16, $MOA_CPU_FLAGS overrides), float32 otherwise; a "
                        "rerun reuses the choice recorded with its partial or complete file")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    p.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False,
                   help="True: redo an existing loss file and discard partial files of an interrupted run")
    p.add_argument("--progress", type=str2bool, nargs="?", const=True, default=True, help="tqdm progress bar")
    p.add_argument("--strip_answer_cue", type=str2bool, nargs="?", const=True, default=True,
                   help="True: do not score the reference's leading whitespace and answer label ('\\nA: ', "
                        "'\\nRationale: ', as the bundled math references start), so the loss measures the "
                        "answer itself; False: score the output verbatim")
    return p


def parse_args(argv: list[str] | None = None):
    from moa.infer.loss import LossConfig

    p = build_parser()
    a = p.parse_args(argv)
    try:
        return LossConfig(**vars(a))
    except ValueError as e:
        p.error(str(e))


@one_line_errors(PROG)
def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    check_writable("save_path", cfg.save_path)  # and loss_score.jsonl beside it; before any model is loaded
    from moa.infer.loss import evaluate_loss, format_summary

    try:
        summary = evaluate_loss(cfg)
    except (FileNotFoundError, ValueError) as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        print(format_summary(summary))


if __name__ == "__main__":
    main()
