"""`lrdaccel bench` (being built)."""

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    return subparsers.add_parser("bench", help="(being built)")


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("lrdaccel bench is being built")
