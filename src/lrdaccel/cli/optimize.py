"""`lrdaccel optimize`: time each decomposed layer on this device and choose its rank.

Starts from the ratio's ranks (or a plan file), times each layer alone on the input it really
sees, original and decomposed at candidate ranks, under the runtime you will deploy with
(--runtime eager, compile or onnxruntime), and keeps the rank that saves the most time for the
capacity it gives up (or the original layer, where nothing beats it). Then times the whole model
at ratio ranks and at the chosen ranks, interleaved, in the same runtime, to show whether it
paid off.
"""

from __future__ import annotations

import argparse
import dataclasses

from lrdaccel._extras import require
from lrdaccel.cli._common import (add_model_args, check_outputs, load_model, non_negative_float, non_negative_int,
                                   write_output)
from lrdaccel.cli._config_args import add_config_args, given
from lrdaccel.cli.plan import add_plan_args, plan_from_args
from lrdaccel.measure.runtimes import COMPILE_MODES, RUNTIMES
from lrdaccel.measure.timer import OBJECTIVES
from lrdaccel.planning import LayerPlan, Plan
from lrdaccel.rankopt import (SearchSettings, capture_inputs, compare_end_to_end, default_cache_path, measure_staircase,
                              optimize_ranks, plot_staircase, timing_table)
from lrdaccel.rankopt.layer_timing import BenchmarkTimer
from lrdaccel.rankopt.search import RULES


ORDER = 20  # place in `lrdaccel --help`: the pipeline's order

def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "optimize", help="time decomposed layers on this device and choose faster ranks",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(parser)
    add_plan_args(parser, tradeoff=False)  # the search's --tradeoff also weighs --form auto's choices
    parser.add_argument("--plan", help="start from this plan JSON (from `lrdaccel plan -o`) instead of --ratio "
                                       "and the other plan options")
    search = parser.add_argument_group("rank search")
    add_config_args(search, SearchSettings, [f.name for f in dataclasses.fields(SearchSettings)],
                    choices={"objective": OBJECTIVES, "runtime": RUNTIMES, "rule": RULES,
                             "compile_mode": COMPILE_MODES})
    parser.add_argument("--device", help="where to time, e.g. cpu, cuda, cuda:1 (default: the model's, cpu); the "
                                         "layers are copied there")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="precision to time in (default: the model's, float32)")
    parser.add_argument("--cache", help=f"timing cache JSON file; a second run on the same machine measures "
                                        f"nothing new (default {default_cache_path()})")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write a timing cache file")
    parser.add_argument("--output", "-o", help="write the optimized plan as JSON here (for `lrdaccel compress --plan`; "
                                               "missing folders are created)")
    parser.add_argument("--check-rounds", type=non_negative_int, default=5,
                        help="interleaved rounds of the whole-model comparison (original, ratio ranks, optimized "
                             "ranks); 0 skips it (default 5)")
    parser.add_argument("--check-time", type=non_negative_float, default=0.5,
                        help="seconds of calls per model per round in the comparison (default 0.5)")
    parser.add_argument("--staircase", help="also write a PNG of layer time against rank (the staircase) here "
                                            "(needs lrdaccel[plot])")
    parser.add_argument("--staircase-layer",
                        help="the layer for --staircase (default: the decomposed layer with the most weights)")
    parser.add_argument("--staircase-ranks", type=_rank_range,
                        help="ranks for --staircase as FIRST:LAST, e.g. 240:272 (default: ratio rank -16 to +16)")
    return parser


def _rank_range(text: str) -> range:
    try:
        first, last = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--staircase-ranks must be FIRST:LAST, got {text!r}") from None
    if not 1 <= first <= last:
        raise argparse.ArgumentTypeError(f"--staircase-ranks needs 1 <= FIRST <= LAST, got {text!r}")
    return range(first, last + 1)


def run(args: argparse.Namespace) -> int:
    check_outputs(files={"--output": args.output, "--staircase": args.staircase})
    settings = SearchSettings(**given(args, SearchSettings))  # --runtime onnxruntime: its extra is checked here
    if args.staircase:
        require("plot", "--staircase")
    model, example = load_model(args, check_input=True)
    plan = Plan.load(args.plan) if args.plan else plan_from_args(model, args, example)
    staircase_row = _staircase_row(plan, args.staircase_layer) if args.staircase else None
    cache = False if args.no_cache else args.cache
    optimized = optimize_ranks(model, plan, example, settings=settings, device=args.device, dtype=args.dtype,
                               cache=cache, progress=True)
    print(optimized)
    print()
    print(timing_table(optimized))
    info = optimized.meta["rank_optimization"]
    print(f"\nsearch: {info['distinct_layers']} distinct layers, {info['timed']} timings measured, "
          f"{info['cache_hits']} from cache, {info['seconds']:.1f} s on {info['device']}")
    if args.output:
        write_output(args.output, optimized.save)
        print(f"optimized plan written to {args.output}")
    if args.check_rounds > 0:
        report = compare_end_to_end(
            model, {"ratio ranks": plan, "optimized": optimized}, example, settings.objective,
            device=args.device, dtype=args.dtype, rounds=args.check_rounds, min_run_time=args.check_time,
            runtime=settings.runtime, compile_mode=settings.compile_mode,
        )
        print()
        print(report)
    if staircase_row is not None:
        _staircase(model, staircase_row, example, args, settings, cache)
    return 0


def _staircase_row(plan: Plan, name: str | None) -> LayerPlan:
    """The --staircase layer: the one named, else the decomposed layer with the most weights."""
    if name is None:
        if not plan.decomposed:
            raise ValueError("--staircase: the plan decomposes no layer")
        return max(plan.decomposed, key=lambda r: r.params_before)
    try:
        row = plan[name]
    except KeyError:
        raise ValueError(f"--staircase-layer {name}: no such layer in the plan") from None
    if not row.decomposed:
        raise ValueError(f"--staircase-layer {name}: the plan keeps this layer ({row.reason})")
    return row


def _staircase(model, row: LayerPlan, example, args: argparse.Namespace, settings: SearchSettings,
               cache) -> None:
    spec = capture_inputs(model, [row.name], example).get(row.name)
    if spec is None:
        raise ValueError(f"--staircase-layer {row.name}: the example inputs never reach this layer")
    ratio_rank = row.ratio_rank if row.ratio_rank is not None else row.rank
    centre = ratio_rank if isinstance(ratio_rank, int) else ratio_rank[0]
    top = min(row.shape["in"], row.shape["out"])
    ranks = args.staircase_ranks or range(max(1, centre - 16), min(top, centre + 16) + 1)
    weight = "x".join(str(d) for d in (row.shape["out"], row.shape["in"], *row.shape["kernel"]))
    staircase = measure_staircase(
        model.get_submodule(row.name), spec.shape, ranks, settings.objective, device=args.device, dtype=args.dtype,
        memory_format=spec.memory_format, cache=cache, timer=BenchmarkTimer(settings.min_run_time),
        runtime=settings.runtime,
        label=f"{row.name} ({row.layer_type} {weight}), input {'x'.join(map(str, spec.shape))}, {settings.objective}",
    )
    plot_staircase(staircase, args.staircase)
    print(f"\nstaircase of {row.name} for ranks {ranks.start}..{ranks.stop - 1} written to {args.staircase}")
