"""Router statistics of trained adapters over a test set: a heatmap PNG and the numbers as JSON.

    python scripts/router_stats.py --ckpt_dir models/smollm2 --adapter_path runs/math_soft_moa/adapter.pth \\
        --data_path data/math/gsm8k/test.json --out runs/math_soft_moa/router_gsm8k

Runs the model (no generation) over the Alpaca prompts of the test rows, with `--with_output True`
also over each row's reference response (what the router sees while it answers), and collects
through `moa.RouterStats`, over real tokens only: per layer and adapter type, the mean type-router
weight and (Sparse MoA) the fraction of tokens that ran the type. Writes OUT.json and OUT.png
(one heatmap of weights, and one of activation fractions when the router is sparse).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent

import torch
from tqdm import tqdm

from llama.checkpoint import load_model
from moa import RouterStats
from moa.atomic import atomic_write_files, atomic_write_json
from moa.cli import error_line, str2bool
from moa.files.adapters import load_trained_adapter
from moa.infer.generate import encode_prompt
from moa.train.data import load_rows, pad_right


def row_tokens(tokenizer: Any, rows: list[dict], max_seq_len: int, with_output: bool) -> list[list[int]]:
    """Token ids per row: its prompt (BOS first), then with `with_output` its `output` + EOS, at
    most `max_seq_len` tokens (the response's tail is cut, as in training)."""
    seqs = []
    for row in rows:
        tokens, _ = encode_prompt(tokenizer, row, max_seq_len)
        if with_output and row.get("output"):
            tokens = tokens + tokenizer.encode(row["output"], bos=False, eos=True)
        seqs.append(tokens[:max_seq_len])
    return seqs


@torch.inference_mode()
def collect(model: torch.nn.Module, seqs: list[list[int]], batch_size: int, progress: bool = True) -> RouterStats:
    """Run right-padded batches of `seqs` (with their real-token mask) under a RouterStats."""
    device = model.tok_embeddings.weight.device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths share a batch
    with RouterStats(model) as stats:
        for start in tqdm(range(0, len(order), batch_size), desc="router stats", disable=not progress):
            tokens, mask = pad_right([seqs[i] for i in order[start:start + batch_size]])
            tokens, mask = tokens.to(device), mask.to(device)
            model.hidden_states(tokens, token_mask=mask)
    return stats


def plot(tables: dict[str, Any], path: Path, title: str, sparse: bool) -> None:
    """Heatmap(s) layer x type of the mean weight and, when sparse, of the activation fraction."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("mean router weight", "weight")] + ([("fraction of tokens run", "active")] if sparse else [])
    layers, slots = tables["layers"], tables["slots"]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 0.9 * len(slots) * len(panels), 1.5 + 0.22 * len(layers)),
                             squeeze=False)
    for ax, (label, key) in zip(axes[0], panels):
        values = np.ma.masked_invalid(np.array(tables[key], dtype=float))
        im = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(len(slots)), slots, rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("adapter type")
        ax.set_ylabel("layer")
        ax.set_title(label)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write_files({str(path): lambda tmp: fig.savefig(tmp, dpi=100, format="png")})
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt_dir", required=True, help="base-model directory")
    p.add_argument("--adapter_path", required=True, help="adapter.pth with adapter_params.json beside it")
    p.add_argument("--data_path", required=True, help="test set (JSON list of {instruction, input, output})")
    p.add_argument("--out", default=None, help="output prefix (default: beside the adapter, router_<set>)")
    p.add_argument("--max_rows", type=int, default=0, help="first N rows only (0: all)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_seq_len", type=int, default=512, help="tokens per row at most")
    p.add_argument("--with_output", type=str2bool, nargs="?", const=True, default=False,
                   help="also run each row's reference response (teacher forcing)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        rows = load_rows(a.data_path)
        rows = rows[:a.max_rows] if a.max_rows > 0 else rows
        model, tokenizer = load_model(a.ckpt_dir, device=a.device, max_seq_len=a.max_seq_len,
                                      dtype=torch.bfloat16 if a.device.startswith("cuda") else torch.float32)
        load_trained_adapter(model, a.adapter_path, a.ckpt_dir)
    except (OSError, ValueError) as e:
        print(f"router_stats.py: error: {error_line(e)}", file=sys.stderr)
        return 2
    stats = collect(model, row_tokens(tokenizer, rows, a.max_seq_len, a.with_output), a.batch_size)
    tables = stats.tables()
    if not tables["layers"]:
        print("router_stats.py: error: the adapters have no type router (--type_router none): nothing to show",
              file=sys.stderr)
        return 2
    sparse = model.moa_config.type_router == "sparse"
    set_name = Path(a.data_path).parent.name
    out = Path(a.out) if a.out else Path(a.adapter_path).parent / f"router_{set_name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"ckpt_dir": a.ckpt_dir, "adapter_path": a.adapter_path, "data_path": a.data_path, "rows": len(rows),
              "with_output": a.with_output, "sparse": sparse, **tables,
              "per_layer": {str(k): v for k, v in stats.summary().items()}}
    json_path, png_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".png")
    atomic_write_json(json_path, record)
    plot(tables, png_path, f"{Path(a.adapter_path).parent.name} on {set_name} ({len(rows)} rows)", sparse)
    columns = {s: [r[j] for r in tables["weight"] if not math.isnan(r[j])] for j, s in enumerate(tables["slots"])}
    means = {s: sum(v) / len(v) for s, v in columns.items()}
    print("mean weight over layers: " + ", ".join(f"{s} {w:.3f}" for s, w in means.items()))
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
