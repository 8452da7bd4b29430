"""Small helpers shared by the command-line scripts: argparse types, and `one_line_errors`, the one
wrapper that turns a user's mistake or an operating-system error into one line on stderr."""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Any, Callable, TypeVar

_Main = TypeVar("_Main", bound=Callable[..., Any])

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
    """argparse `type` for `--bf16`: True/False as `str2bool`, or `auto` (decided by the device's declared features: llama/hardware.py)."""
    return "auto" if text == "auto" else str2bool(text)


def error_line(e: BaseException) -> str:
    """One line for `e`: an OSError as `PATH: reason` (both paths of a rename), else its message."""
    if isinstance(e, OSError) and e.filename is not None:
        target = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
        return f"{target}: {e.strerror or type(e).__name__}"
    return " ".join(str(e).split()) or type(e).__name__


def one_line_errors(prog: str, status: int = 2) -> Callable[[_Main], _Main]:
    """Decorator for a command line's `main`: a ValueError or OSError (no such file, permission denied,
    not a directory, disk full, ...) that reaches it prints `PROG: error: ...` naming the path, with no
    traceback, and exits with `status`."""

    def wrap(main: _Main) -> _Main:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return main(*args, **kwargs)
            except (OSError, ValueError) as e:
                print(f"{prog}: error: {error_line(e)}", file=sys.stderr)
                raise SystemExit(status) from None

        return run  # type: ignore[return-value]

    return wrap
