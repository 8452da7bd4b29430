"""Write docs/cli.md, every command line's flags, from the argparse parsers and MoAConfig's field metadata.

    python scripts/gen_cli_docs.py           # rewrite docs/cli.md
    python scripts/gen_cli_docs.py --check   # exit 1, naming the file, when docs/cli.md is not what it would write

Each command line (the top-level scripts and scripts/*.py) builds its parser in a module-level
`build_parser()`; this script imports each file by its path and reads the parser's actions. The adapter
flags (`moa.method.config.MoAConfig`, one field per flag, its help in the field's metadata) are listed
once; a command line that takes all of them says so instead of repeating them. The output does not depend
on the machine: a default computed from the environment (e.g. `"cuda" if torch.cuda.is_available() else
"cpu"`) is shown as its expression, and a path inside the repository as `<repo>/...`.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from moa.method.config import MoAConfig

ROOT = Path(__file__).resolve().parents[1]
# The repository's folder as the command lines may spell it in a default (symbolic links resolved or not).
ROOT_NAMES = sorted({str(ROOT), str(Path(os.path.abspath(__file__)).parents[1])}, key=len, reverse=True)
DOC = ROOT / "docs" / "cli.md"
GENERATE = "python scripts/gen_cli_docs.py"
# Top-level command lines in workflow order; any other top-level one follows, then scripts/*.py by name.
TOP_LEVEL = ("main_finetune.py", "extract_adapter_from_checkpoint.py", "example.py", "evaluate_math.py",
             "evaluate_commonsense.py", "evaluate_loss.py")
# A default whose expression mentions one of these depends on the machine: it is shown as written.
ENVIRONMENT = ("torch.cuda", "os.environ", "getenv", "cpu_count", "getcwd", "Path.cwd", "Path.home", "expanduser",
               "platform.", "socket.", "get_num_threads")
ADAPTER_FLAGS = "adapter-flags"


def cli_files() -> list[Path]:
    """The files whose parsers are documented: those that build an ArgumentParser."""
    top = [ROOT / name for name in TOP_LEVEL]
    top += sorted(p for p in ROOT.glob("*.py") if p.name not in TOP_LEVEL)
    files = [p for p in top + sorted((ROOT / "scripts").glob("*.py")) if p.is_file()]
    return [p for p in files if "ArgumentParser" in p.read_text(encoding="utf-8")]


def load_module(path: Path) -> ModuleType:
    """Import `path` under a private name (its `if __name__ == "__main__"` block does not run)."""
    name = "_cli_docs_" + "_".join(path.relative_to(ROOT).with_suffix("").parts)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def parser_of(path: Path) -> argparse.ArgumentParser:
    build = getattr(load_module(path), "build_parser", None)
    if build is None:
        raise SystemExit(f"{path.relative_to(ROOT)} builds an ArgumentParser but has no module-level "
                         "build_parser(): add one (main() calls it) so that its flags are documented")
    return build()


def environment_defaults(path: Path) -> dict[str, str]:
    """{option string or positional name: source of its `default=` expression} for each `add_argument` call
    of `path` whose default depends on the machine (mentions a name of ENVIRONMENT)."""
    source = path.read_text(encoding="utf-8")
    out = {}
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            continue
        default = next((k.value for k in node.keywords if k.arg == "default"), None)
        text = ast.get_source_segment(source, default) if default is not None else None
        if text and any(marker in text for marker in ENVIRONMENT):
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    out[arg.value] = " ".join(text.split())
    return out


def cell(text: str) -> str:
    """One Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def prose(text: str) -> str:
    """Help text as Markdown shows it verbatim: outside `code` spans, `<` (an HTML tag otherwise) and `*`
    (emphasis otherwise) escaped."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace("*", "\\*")
    return "`".join(parts)


def show_value(value: Any, sep: str = ",") -> str:
    """A default as the user would type it; paths inside the repository as <repo>/..."""
    if isinstance(value, (list, tuple)):
        return sep.join(show_value(v) for v in value)
    text = str(value)
    for root in ROOT_NAMES:
        if text == root or text.startswith(root + os.sep):
            return "<repo>" + text[len(root):].replace(os.sep, "/")
    return text


def code(text: str) -> str:
    return f"`{text}`" if text else '`""`'


def default_cell(action: argparse.Action, literal: dict[str, str]) -> str:
    if action.required:
        return "required"
    names = action.option_strings or [action.dest]
    expression = next((literal[n] for n in names if n in literal), None)
    if expression is not None:
        return code(expression)
    if action.default is None or action.default is argparse.SUPPRESS:
        return "none"
    return code(show_value(action.default, " " if action.nargs in ("+", "*") else ","))


def flag_cell(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}` (positional)"
    flags = ", ".join(f"`{o}`" for o in action.option_strings)
    if action.metavar and action.nargs != 0:
        value = f"[{action.metavar}]" if action.nargs == "?" else action.metavar
        flags += f" `{value}`"
    return flags


def help_text(action: argparse.Action, prog: str) -> str:
    """The action's help as argparse prints it (`%(default)s` and the like filled in), plus its choices and
    how many values it takes."""
    text = action.help or ""
    if "%" in text:
        params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
        params["prog"] = prog
        if params.get("choices") is not None:
            params["choices"] = ", ".join(map(str, params["choices"]))
        text = text % params
    extra = []
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        extra.append("choices: " + ", ".join(f"`{c}`" for c in action.choices))
    if action.nargs == "+":
        extra.append("one or more values")
    elif action.nargs == "*":
        extra.append("any number of values")
    elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        extra.append("a bare flag, no value")
    text = prose(text)
    if extra:
        text = f"{text} ({'; '.join(extra)})" if text else "; ".join(extra)
    return text


def description(parser: argparse.ArgumentParser, prog: str) -> str:
    text = (parser.description or "").strip().split("\n\n")[0]
    if "%(prog)" in text:
        text = text % {"prog": prog}
    text = " ".join(text.split())
    return prose(text[:-1] + "." if text.endswith(":") else text)


def documented(parser: argparse.ArgumentParser) -> tuple[list[argparse.Action], bool]:
    """The actions to list (help and subcommand actions left out) and whether the parser takes the adapter
    flags (then those are left out of its list)."""
    adapter = {f"--{f.name}" for f in dataclasses.fields(MoAConfig)}
    options = {o for a in parser._actions for o in a.option_strings}
    takes_adapter = adapter <= options
    actions = [a for a in parser._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
               and a.help is not argparse.SUPPRESS
               and not (takes_adapter and set(a.option_strings) & adapter)]
    return actions, takes_adapter


def table(actions: list[argparse.Action], prog: str, literal: dict[str, str]) -> list[str]:
    if not actions:
        return ["No flags."]
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for a in actions:
        rows.append(f"| {cell(flag_cell(a))} | {cell(default_cell(a, literal))} | {cell(help_text(a, prog))} |")
    return rows


def parser_section(parser: argparse.ArgumentParser, prog: str, level: int, literal: dict[str, str],
                   summary: str = "") -> list[str]:
    out = [f"{'#' * level} {prog}", ""]
    text = description(parser, prog) or prose(" ".join(summary.split()))
    if text:
        out += [text, ""]
    actions, takes_adapter = documented(parser)
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if actions or not subcommands:
        out += table(actions, prog, literal) + [""]
    if takes_adapter:
        out += [f"Plus the [adapter flags](#{ADAPTER_FLAGS}).", ""]
    for sub in subcommands:
        helps = {c.dest: c.help or "" for c in sub._choices_actions}
        for name, subparser in sub.choices.items():
            out += parser_section(subparser, f"{prog} {name}", level + 1, literal, helps.get(name, ""))
    return out


def adapter_section() -> list[str]:
    out = ["## Adapter flags", "",
           "The adapter flags are the fields of `moa.method.config.MoAConfig` (docs/method.md says what each type "
           "does). Booleans take `True` or `False`; a bare flag means `True`. Layer spans are `a-b[,c-d]` over "
           "block indices, end exclusive (`0-32` = blocks 0..31, `0-0` = none).", "",
           "| flag | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(MoAConfig):
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        out.append(f"| {cell(f'`--{f.name}`')} | {kind} | {cell(code(show_value(f.default)))} | "
                   f"{cell(prose(f.metadata['help']))} |")
    return out + [""]


def render() -> str:
    """The text of docs/cli.md."""
    out = [f"Generated by `{GENERATE}` from the command lines' argparse parsers and MoAConfig's field "
           "metadata (do not edit by hand): every command line's flags.", "",
           "# Command lines", ""]
    for path in cli_files():
        rel = path.relative_to(ROOT).as_posix()
        out += parser_section(parser_of(path), f"python {rel}", 2, environment_defaults(path))
    out += adapter_section()
    return "\n".join(out).rstrip("\n") + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 naming the file when docs/cli.md differs from what would be written")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    text = render()
    rel = DOC.relative_to(ROOT).as_posix() if DOC.is_relative_to(ROOT) else str(DOC)
    if a.check:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print(f"{rel} is stale: run `{GENERATE}`", file=sys.stderr)
            return 1
        print(f"{rel} is up to date")
        return 0
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
