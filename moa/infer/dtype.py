"""The weights' dtype of a run: `float32`, `bfloat16`, or `auto`, which picks bf16 where the hardware
declares native support for it (`llama.hardware.auto_dtype`: CUDA devices with bf16; CPUs whose flags
include amx_bf16 or avx512_bf16), never by a timing, so that a command computes the same numbers in
every run on the same machine. The report line says what was chosen and why.

`settle_dtype` is `auto` for a resumable output: a rerun reuses the choice an earlier run with the same
requested settings recorded (`<key>_resolved` in the partial file's header or the output's sidecar),
so that a rerun resumes and writes the same file even where the rule would choose otherwise.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from llama.hardware import auto_dtype, auto_kv_cache_dtype

# The one table of --dtype names (example.py, evaluate_loss.py, scripts and benchmarks); a command line
# that accepts fewer says which (`resolve_dtype(..., names=)`, argparse `choices`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The names `resolve_dtype` accepts unless told otherwise (evaluate_loss.py's --dtype): float16 is not one.
DTYPE_NAMES = ("auto", "float32", "bfloat16")
# The names --kv_cache_dtype accepts (example.py): auto, the weights' dtype or fp32 by `auto_kv_cache_dtype`.
KV_CACHE_DTYPE_NAMES = ("auto", "float32", "bfloat16")


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32, ... (the names of `DTYPES`)."""
    return str(dtype).removeprefix("torch.")


def resolve_dtype(name: str, device: torch.device | str,
                  names: tuple[str, ...] = DTYPE_NAMES) -> tuple[torch.dtype, str]:
    """The dtype `name` (auto or a key of `DTYPES`) means on `device`, and a one-line report of the choice.

    ValueError for a name not in `names` (default: auto | float32 | bfloat16).
    """
    if name not in names:
        raise ValueError(f"--dtype: expected one of {', '.join(names)}, got {name!r}")
    if name != "auto":
        return DTYPES[name], f"dtype {name} (as asked)"
    chosen, reason = auto_dtype(device)
    return chosen, f"dtype auto -> {dtype_name(chosen)} ({reason})"


def resolve_kv_cache_dtype(name: str, weight_dtype: torch.dtype, device: torch.device | str) -> tuple[torch.dtype, str]:
    """The KV cache's dtype `name` (auto | float32 | bfloat16) means under weights of `weight_dtype` on
    `device`, and a one-line report. auto: `llama.hardware.auto_kv_cache_dtype` (the weights' dtype,
    but fp32 under half-precision weights on a CPU without amx_bf16)."""
    if name not in KV_CACHE_DTYPE_NAMES:
        raise ValueError(f"--kv_cache_dtype: expected one of {', '.join(KV_CACHE_DTYPE_NAMES)}, got {name!r}")
    if name != "auto":
        return DTYPES[name], f"kv_cache_dtype {name} (as asked)"
    chosen = auto_kv_cache_dtype(weight_dtype, device)
    why = ("the weights' dtype" if chosen == weight_dtype else
           "fp32 under half-precision weights on a CPU without amx_bf16")
    return chosen, f"kv_cache_dtype auto -> {dtype_name(chosen)} ({why})"


def resolved_key(key: str) -> str:
    """Where a settings record keeps what its automatic `key` resolved to: `<key>_resolved`."""
    return f"{key}_resolved"


def settle_dtype(key: str, name: str, choose: Callable[[], tuple[torch.dtype, str]],
                 recorded: Optional[tuple[dict, str]]) -> tuple[str, str]:
    """The dtype name `--<key> <name>` stands for in a resumable run, and a one-line report of it: `name`
    itself unless it is auto; for auto, the value an earlier run with equal requested settings recorded
    under `<key>_resolved` (`recorded`: (its settings, the file); "reusing ..."), else `choose()`'s
    (dtype, report). Nothing here times anything, and a rerun never chooses differently."""
    if name != "auto":
        return name, f"{key} {name} (as asked)"
    if recorded is not None and recorded[0].get(resolved_key(key)) in DTYPES:
        value = recorded[0][resolved_key(key)]
        return value, f"{key} auto: reusing {key.replace('_', ' ')} {value} recorded in {recorded[1]}"
    dtype, report = choose()
    return dtype_name(dtype), report
