"""Small helpers shared by the command-line scripts (argparse types)."""
from __future__ import annotations

import argparse

_TRUE = ("True", "true", "1")
_FALSE = ("False", "false", "0")


def str2bool(text: str) -> bool:
    """argparse `type` for boolean flags: `True`/`False` (also `true`/`false`, `1`/`0`).

    `type=bool` would turn the string "False" into True; use with `nargs="?", const=True` so that
    a bare `--flag` means True:
        parser.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False)
    """
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def bool_or_auto(text: str) -> bool | str:
    """argparse `type` for `--bf16`: True/False as `str2bool`, or `auto` (decided by a probe at start)."""
    return "auto" if text == "auto" else str2bool(text)
