"""LoRA algebra and PEFT interchange for plain LoRA adapters (adapter.pth + adapter_params.json).

    python scripts/lora_tools.py merge --base DIR --adapter PATH --out DIR
    python scripts/lora_tools.py extract --base DIR --tuned DIR --rank 16 --targets Q,K,V,O,FFN_DOWN --out PATH
    python scripts/lora_tools.py combine --adapters P1 P2 --weights 0.5 0.5 --method cat --out PATH
    python scripts/lora_tools.py export-peft --adapter PATH --base DIR --out DIR
    python scripts/lora_tools.py import-peft --peft DIR --base DIR --out PATH

A plain LoRA is `--expert_num 1 --type_router none` with LoRA only (see moa/lora/algebra.py). Adapter
paths are an adapter.pth file or its folder. `combine` follows PEFT's add_weighted_adapter and its
method names (definitions in moa/lora/combine.py: COMBINE_METHODS): the exact sum of the LoRAs with
concatenated ranks is `cat`; PEFT's `linear` merges the A's and the B's separately (equal ranks).
A user's mistake exits with status 1 and one line `lora_tools COMMAND: error: ...` on stderr.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from llama.checkpoint import load_params
from moa.checks import check_writable
from moa.cli import one_line_errors
from moa.files.adapters import write_adapter_files
from moa.lora.algebra import energy_tables, extract_lora_svd, merge_into_base, read_plain_lora
from moa.lora.combine import COMBINE_METHODS, combine
from moa.lora.peft import export_peft, import_peft


def _ranks(text: str) -> list[int]:
    """argparse `type` for --energy_ranks: '1,4,16' -> [1, 4, 16]."""
    try:
        ranks = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if any(r < 1 for r in ranks):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return ranks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="fold a plain LoRA into a base model, writing a new base-model directory")
    m.add_argument("--base", required=True, help="base-model directory (params.json, consolidated.NN.pth)")
    m.add_argument("--adapter", required=True, help="adapter.pth (or its folder)")
    m.add_argument("--out", required=True, help="new base-model directory (must not exist)")

    e = sub.add_parser("extract", help="rank-r LoRA from the truncated SVD of tuned - base weights")
    e.add_argument("--base", required=True)
    e.add_argument("--tuned", required=True, help="the fine-tuned base-model directory")
    e.add_argument("--rank", type=int, required=True)
    e.add_argument("--targets", default="Q,K,V,O,FFN_DOWN", help="--lora_targets names")
    e.add_argument("--layers", default=None, help="--lora_layers span (default: every layer)")
    e.add_argument("--energy_ranks", type=_ranks, default=[1, 2, 4, 8, 16, 32, 64],
                   help="ranks of the kept-energy-by-rank table, e.g. 1,4,16 (to choose --rank)")
    e.add_argument("--out", required=True, help="adapter.pth to write (adapter_params.json beside it)")

    c = sub.add_parser("combine", help="combine plain LoRAs like PEFT's add_weighted_adapter")
    c.add_argument("--adapters", nargs="+", required=True)
    c.add_argument("--weights", nargs="+", type=float, required=True)
    c.add_argument("--method", required=True, choices=COMBINE_METHODS)
    c.add_argument("--density", type=float, default=None, help="kept fraction for ties / dare / magnitude_prune")
    c.add_argument("--rank", type=int, default=None, help="*svd methods: output rank (default: largest input rank)")
    c.add_argument("--seed", type=int, default=0, help="DARE masks")
    c.add_argument("--majority_sign_method", default="total", choices=("total", "frequency"))
    c.add_argument("--out", required=True)

    x = sub.add_parser("export-peft", help="write a plain LoRA as a PEFT LoRA for transformers' LLaMA")
    x.add_argument("--adapter", required=True)
    x.add_argument("--base", required=True, help="base-model directory (its params.json)")
    x.add_argument("--out", required=True, help="PEFT folder to write (must not exist)")

    i = sub.add_parser("import-peft", help="read a PEFT LoRA for transformers' LLaMA into our adapter format")
    i.add_argument("--peft", required=True, help="folder with adapter_config.json, adapter_model.safetensors "
                   "(or adapter_model.bin)")
    i.add_argument("--base", required=True, help="base-model directory (its params.json)")
    i.add_argument("--out", required=True, help="adapter.pth to write (or a folder)")
    return p


@one_line_errors("lora_tools", status=1)
def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        check_writable("out", args.out, folder=_out_is_folder(args.command, args.out))
        run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        p.exit(1, f"lora_tools {args.command}: error: {err}\n")


def _out_is_folder(command: str, out: str) -> bool:
    """Whether `--out` of `command` names a folder: a model or PEFT folder, or an adapter path that
    write_adapter_files puts `adapter.pth` inside (a folder, or a name without `.pth`)."""
    return command in ("merge", "export-peft") or Path(out).is_dir() or Path(out).suffix != ".pth"


def run(args: argparse.Namespace) -> None:
    """Call the library for one parsed subcommand (a user's mistake raises ValueError / FileNotFoundError
    / FileExistsError, printed by `main` without a traceback)."""
    if args.command == "merge":
        print(f"wrote {merge_into_base(args.base, args.adapter, args.out)}")
    elif args.command == "extract":
        cfg, state, report = extract_lora_svd(args.base, args.tuned, args.rank, args.targets, args.layers)
        print(energy_tables(report, args.rank, args.energy_ranks))
        if report.other_changed:
            print(f"not captured (non-target tensors that differ): {', '.join(report.other_changed)}")
        print(f"wrote {write_adapter_files(args.out, cfg, state)} (lora_alpha = rank = {args.rank}: scaling 1)")
    elif args.command == "combine":
        loras = [read_plain_lora(a) for a in args.adapters]
        cfg, state = combine(loras, args.weights, args.method, density=args.density, rank=args.rank,
                             seed=args.seed, majority_sign_method=args.majority_sign_method)
        print(f"wrote {write_adapter_files(args.out, cfg, state)} (rank {cfg.lora_rank}, lora_alpha {cfg.lora_alpha})")
    elif args.command == "export-peft":
        print(f"wrote {export_peft(args.adapter, args.out, load_params(args.base))}")
    else:
        print(f"wrote {import_peft(args.peft, args.out, load_params(args.base))}")

if __name__ == "__main__":
    main()
