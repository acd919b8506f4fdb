"""`lrdaccel optimize` (being built)."""

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    return subparsers.add_parser("optimize", help="(being built)")


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("lrdaccel optimize is being built")
