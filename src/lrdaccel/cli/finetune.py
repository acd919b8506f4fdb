"""`lrdaccel finetune` (being built)."""

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    return subparsers.add_parser("finetune", help="(being built)")


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("lrdaccel finetune is being built")
