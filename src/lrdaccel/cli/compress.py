"""`lrdaccel compress`: decompose a model by a plan (or a ratio) and save it."""

from __future__ import annotations

import argparse

import lrdaccel as lrd
from lrdaccel.cli._common import add_model_args, load_model
from lrdaccel.cli.plan import add_plan_args, plan_from_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("compress", help="decompose a model and save it (weights + plan)",
                                   description=__doc__)
    add_model_args(parser)
    add_plan_args(parser)
    parser.add_argument("--plan", help="a plan JSON from `lrdaccel plan -o` or `lrdaccel optimize -o` "
                                       "(overrides --ratio and the other plan options)")
    parser.add_argument("--output", "-o", required=True, help="directory to save the decomposed model to")
    return parser


def run(args: argparse.Namespace) -> int:
    model, example = load_model(args)
    plan = lrd.Plan.load(args.plan) if args.plan else plan_from_args(model, args)
    report = lrd.decompose(model, plan, example_inputs=example, progress=True)
    print(report)
    lrd.save(model, args.output)
    print(f"saved to {args.output}")
    return 0
