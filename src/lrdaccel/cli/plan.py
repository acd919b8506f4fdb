"""`lrdaccel plan`: print (and optionally write) the decomposition plan of a model."""

from __future__ import annotations

import argparse

from lrdaccel.cli._common import add_model_args, check_outputs, load_model, write_output
from lrdaccel.cli._config_args import add_config_args, given
from lrdaccel.planning import Plan, PlanConfig, plan
from lrdaccel.planning.planner import FORMS

PLAN_OPTIONS = ("ratio", "include", "exclude", "min_rank", "beta", "branches", "merge", "form")


ORDER = 10  # place in `lrdaccel --help`: the pipeline's order

def add_plan_args(parser: argparse.ArgumentParser, tradeoff: bool = True) -> None:
    """The plan options; `tradeoff=False` where the command has a --tradeoff of its own (optimize's
    rank search: PlanConfig reads the same value, one rule for both)."""
    options = PLAN_OPTIONS + (("tradeoff",) if tradeoff else ())
    add_config_args(parser, PlanConfig, options, choices={"form": FORMS},
                    notes={"form": "narrow and auto trace the model on its example inputs; auto measures errors on "
                                   "calibration batches: lrdaccel compress --form auto --calibration N",
                           "tradeoff": "with --form auto"})


def plan_from_args(model, args: argparse.Namespace, example=None, calibration=None) -> Plan:
    """The plan the options ask for; `example` is traced by --merge and --form narrow / auto,
    `calibration` read by --allocate and --form auto (compress only)."""
    if getattr(args, "form", None) == "auto" and calibration is None:
        raise ValueError("--form auto measures each form's output error on calibration batches, which this command "
                         "does not read: run lrdaccel compress --form auto --calibration N")
    return plan(model, example_inputs=example, calibration=calibration, **given(args, PlanConfig))


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("plan", help="show which layers would be decomposed, at which ranks, and why",
                                   description=__doc__)
    add_model_args(parser)
    add_plan_args(parser)
    parser.add_argument("--output", "-o", help="write the plan as JSON to this file (missing folders are created)")
    return parser


def run(args: argparse.Namespace) -> int:
    check_outputs(files={"--output": args.output})
    model, example = load_model(args)
    result = plan_from_args(model, args, example)
    print(result)
    if args.output:
        write_output(args.output, result.save)
        print(f"plan written to {args.output}")
    return 0
