"""`lrdaccel demo` (being built)."""

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    return subparsers.add_parser("demo", help="(being built)")


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("lrdaccel demo is being built")
