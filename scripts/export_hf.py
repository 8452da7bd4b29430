"""Write a base model, or a base with a plain LoRA merged in, as a Hugging Face model folder.

    python scripts/export_hf.py --ckpt_dir models/smollm2 --out hf/smollm2
    python scripts/export_hf.py --ckpt_dir DIR --adapter_path out/adapter.pth --out hf/merged --max_shard_size 2GB

--ckpt_dir is a Meta base-model directory (params.json + consolidated.NN.pth + tokenizer.model) or a
Hugging Face folder. The result (config.json, model.safetensors or shards with their index,
tokenizer.json, tokenizer_config.json, generation_config.json) loads in transformers'
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` and computes our logits.
Weights keep the stored dtype of --ckpt_dir. Only a plain LoRA (LoRA only, --expert_num 1,
--type_router none) is a fixed weight change that can be merged; any other adapter is refused with
the reason. A tiktoken tokenizer is converted to tokenizer.json (same ids); a Hugging Face folder's
tokenizer files are copied; a sentencepiece (LLaMA-2) tokenizer is refused.
A user's mistake, or an operating-system error (an --out that cannot be written, a full disk), exits
with status 1 and one line `export_hf: error: ...` on stderr; --out is checked before the model loads.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

import torch

from llama import hf
from llama.checkpoint import load_model, stored_dtype
from llama.model import Transformer
from llama.tokenizer import Tiktoken
from moa.checks import check_writable
from moa.cli import one_line_errors
from moa.lora.algebra import merged_base


def tokenizer_files(ckpt_dir: Path, tokenizer, vocab_size: int, context: int) -> dict[str, bytes | str]:
    """The tokenizer files of the exported folder: copied from a Hugging Face folder, converted from tiktoken."""
    if hf.is_hf_dir(ckpt_dir):
        return hf.copied_tokenizer_files(ckpt_dir)
    if isinstance(tokenizer, Tiktoken):
        return hf.converted_tokenizer_files(tokenizer, vocab_size, context)
    raise ValueError(f"{ckpt_dir / 'tokenizer.model'}: a sentencepiece tokenizer (LLaMA-2); only tiktoken "
                     "tokenizers are converted to tokenizer.json")


def base_and_state(ckpt_dir: Path, adapter_path: Optional[str]) -> tuple[Transformer, object, dict]:
    """(model, tokenizer, Meta-named state) of the base in its stored dtype, a plain LoRA merged in if given."""
    if adapter_path is None:
        model, tokenizer = load_model(ckpt_dir, dtype=stored_dtype(ckpt_dir))
        return model, tokenizer, model.state_dict()
    state, model, tokenizer = merged_base(ckpt_dir, adapter_path)
    return model, tokenizer, state


def export_hf(ckpt_dir: str | os.PathLike, out: str | os.PathLike, adapter_path: Optional[str] = None,
              max_shard_size: str | int = "5GB") -> Path:
    """Write the model of `ckpt_dir` (+ a merged plain LoRA) as a Hugging Face folder at `out` (must not
    exist; written atomically). The embeddings are tied when `output` equals `tok_embeddings`."""
    ckpt_dir, out = Path(ckpt_dir), Path(out)
    if out.exists():  # checked before the load, again when renaming into place
        raise FileExistsError(f"{out} already exists: remove it or choose another --out")
    check_writable("out", out, folder=True)  # an --out under a file or in an unwritable folder: before the load
    hf.parse_size(max_shard_size)  # a bad --max_shard_size fails before the load
    model, tokenizer, state = base_and_state(ckpt_dir, adapter_path)
    args = model.args
    tie = torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    dtype = state["tok_embeddings.weight"].dtype
    config = hf.hf_config(args, tie=tie, context=args.max_seq_len, dtype=dtype, bos_id=tokenizer.bos_id,
                          eos_ids=tokenizer.stop_tokens)
    files = tokenizer_files(ckpt_dir, tokenizer, args.vocab_size, args.max_seq_len)
    return hf.save_hf_dir(out, config, hf.to_hf_state_dict(state, args, tie), files, max_shard_size)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt_dir", required=True, help="Meta base-model directory or Hugging Face folder")
    p.add_argument("--adapter_path", default=None, help="a plain LoRA adapter.pth to merge in (optional)")
    p.add_argument("--out", required=True, help="Hugging Face folder to write (must not exist)")
    p.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard, e.g. 5GB, 200MB")
    return p


@one_line_errors("export_hf", status=1)
def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    print(f"wrote {export_hf(a.ckpt_dir, a.out, a.adapter_path, a.max_shard_size)}")


if __name__ == "__main__":
    main()
