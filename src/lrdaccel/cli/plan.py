"""`lrdaccel plan`: print (and optionally write) the decomposition plan of a model."""

from __future__ import annotations

import argparse

import lrdaccel as lrd
from lrdaccel.cli._common import add_model_args, load_model


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ratio", type=float, default=2.0,
                        help="per-layer compression ratio: original weight params / decomposed (default 2)")
    parser.add_argument("--include", help="full regex on module names to decompose (default: all candidates)")
    parser.add_argument("--exclude", help="full regex on module names to keep as they are")
    parser.add_argument("--min-rank", type=int, default=8,
                        help="keep a layer whose ratio rank falls below this (or below its channel count, "
                             "if smaller): it would save little and lose much (default 8)")
    parser.add_argument("--beta", type=float, default=1.0, help="Tucker-2 rank_out / rank_in (default 1)")


def plan_from_args(model, args: argparse.Namespace) -> lrd.Plan:
    return lrd.plan(model, ratio=args.ratio, include=args.include, exclude=args.exclude,
                    min_rank=args.min_rank, beta=args.beta)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("plan", help="show which layers would be decomposed, at which ranks, and why",
                                   description=__doc__)
    add_model_args(parser)
    add_plan_args(parser)
    parser.add_argument("--output", "-o", help="write the plan as JSON to this file")
    return parser


def run(args: argparse.Namespace) -> int:
    model, _ = load_model(args)
    plan = plan_from_args(model, args)
    print(plan)
    if args.output:
        plan.save(args.output)
        print(f"plan written to {args.output}")
    return 0
