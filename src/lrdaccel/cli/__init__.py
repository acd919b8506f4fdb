"""The `lrdaccel` command: one subcommand per step, each a thin layer over the public API."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module under lrdaccel.cli exposing add_parser(subparsers) and run(args)
COMMANDS = ("plan", "compress", "optimize", "finetune", "bench", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrdaccel",
        description="Make a trained PyTorch model faster to fine-tune and serve by low-rank decomposition.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        module = importlib.import_module(f"lrdaccel.cli.{command}")
        sub = module.add_parser(subparsers)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError) as error:
        print(f"lrdaccel {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
