"""The `lrdaccel` command: one subcommand per step, each a thin layer over the public API."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


def commands() -> list[str]:
    """Every subcommand: each public module of lrdaccel.cli exposes `ORDER` (its place in the
    pipeline, for --help), `add_parser(subparsers)` and `run(args)`."""
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return sorted(names, key=lambda name: importlib.import_module(f"{__name__}.{name}").ORDER)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr (exit 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lrdaccel",
        description="Make a trained PyTorch model faster to fine-tune and serve by low-rank decomposition.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for command in commands():
        module = importlib.import_module(f"lrdaccel.cli.{command}")
        sub = module.add_parser(subparsers)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A user's mistake (a bad value, path or file: ValueError or OSError)
    exits 2 with one line on stderr and no traceback; anything else is a bug and raises."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a bad option already reported on one line
        return stop.code if isinstance(stop.code, int) else 0
    try:
        return args.run(args) or 0
    except (ValueError, OSError) as error:
        message = " ".join(str(error).split())  # one line, whatever the library's message holds
        print(f"lrdaccel {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
