"""Shared test utilities: tiny random models written as Meta base-model directories.

(The Meta-interleaved -> transformers half-split q/k permutation and `meta_to_hf_state_dict`
live in tests/hf_reference.py.)
"""
from __future__ import annotations

import base64
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

import torch

from llama.checkpoint import load_model
from llama.model import ModelArgs, Transformer
from moa import MoAConfig, attach_adapters, save_adapter

# 256 single-byte ranks + Meta's 256 LLaMA-3 special tokens (no tokenizer_config.json) = 512 ids.
TINY_VOCAB = 512
TINY_PARAMS = {
    "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": TINY_VOCAB,
    "multiple_of": 32, "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 500000.0,
    "use_scaled_rope": False,
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| (the tolerance the tests state)."""
    return float((a - b).norm() / b.norm())


def random_state_dict(params: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Meta-named fp32 weights of a random model with `params`; norms random too (not all ones),
    so that a test can tell them apart."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**params))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k, v in sd.items():
        if k.endswith("norm.weight"):
            sd[k] = 1.0 + 0.1 * torch.randn_like(v)
    return sd


def shard_state_dict(sd: dict[str, torch.Tensor], n_shards: int) -> list[dict[str, torch.Tensor]]:
    """Split a state dict the way Meta's model parallelism (fairscale) stores it in n shards.

    Column-parallel `wq wk wv w1 w3 output` split their rows (dim 0), row-parallel `wo w2` and
    the `tok_embeddings` (ParallelEmbedding) split dim 1, RMSNorm weights are replicated.
    """
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for key, t in sd.items():
        name = key.split(".")[-2]
        if name in ("wq", "wk", "wv", "w1", "w3", "output"):
            parts = t.chunk(n_shards, dim=0)
        elif name in ("wo", "w2", "tok_embeddings"):
            parts = t.chunk(n_shards, dim=1)
        else:
            parts = [t] * n_shards
        if len(parts) != n_shards or any(p.shape != parts[0].shape for p in parts):
            raise ValueError(f"{key} {tuple(t.shape)} does not split evenly into {n_shards} shards")
        for shard, p in zip(shards, parts):
            shard[key] = p.clone()
    return shards


def write_byte_tokenizer(model_dir: Path) -> None:
    """A tiktoken `tokenizer.model` of the 256 single bytes (rank = byte value); without a
    tokenizer_config.json it gets Meta's 256 LLaMA-3 special tokens at ids 256..511."""
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    (Path(model_dir) / "tokenizer.model").write_text("\n".join(lines) + "\n")


def write_meta_model_dir(model_dir: Path, params: Optional[dict] = None, sd: Optional[dict] = None,
                         n_shards: int = 1, dtype: torch.dtype = torch.float32,
                         seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a Meta base-model directory (params.json, consolidated.NN.pth in `dtype`, byte
    tokenizer) of a random tiny model; returns its unsharded state dict (in `dtype`)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    params = dict(TINY_PARAMS if params is None else params)
    if sd is None:
        sd = random_state_dict({**params, "vocab_size": params["vocab_size"] if params["vocab_size"] > 0
                                else TINY_VOCAB}, seed)
    sd = {k: v.to(dtype) for k, v in sd.items()}
    (model_dir / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(shard_state_dict(sd, n_shards)):
        torch.save(shard, model_dir / f"consolidated.{i:02d}.pth")
    write_byte_tokenizer(model_dir)
    return sd


def make_lora_adapter(base_dir: Path, path: Path, lora_layers: str = "0-2", targets: str = "Q,V,FFN_DOWN",
                      rank: int = 4, alpha: float = 8.0, seed: int = 0, scale: float = 0.05, **flags):
    """Write a plain LoRA (adapter.pth + adapter_params.json) on the base in `base_dir`, with B random
    (N(0, scale^2), seeded): zero-init B would hide layout errors. Returns the model carrying it."""
    model, _ = load_model(base_dir)
    attach_adapters(model, MoAConfig(lora_layers=lora_layers, lora_rank=rank, lora_alpha=alpha,
                                     lora_targets=targets, **{"type_router": "none", **flags}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(scale * torch.randn(p.shape, generator=g))
    save_adapter(model, str(path))
    return model



def kill_after_rows(cmd: list[str], cwd: Path, env: dict, partial: Path, rows: int, timeout: float = 120) -> None:
    """Run `cmd` (example.py) and SIGKILL it once its partial file holds its settings line and `rows` rows;
    AssertionError when it finished before it could be killed."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.exists() and partial.read_text().count("\n") >= rows + 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "example.py finished before it could be killed"
