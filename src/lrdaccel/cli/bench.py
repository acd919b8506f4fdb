"""`lrdaccel bench`: the paper's table, measured side by side in one run.

Rows: original, LRD (ratio ranks), LRD + rank optimization, LRD + sequential freezing (rotate),
LRD + both, LRD + static freezing. Columns: parameters, MACs, inference throughput, training
throughput (averaged over the freezing phases), each as a ratio to the original, with
min/median/max over interleaved repeats (A B A B ...). Writes results.json, report.md (the table)
and report.png (bar chart) into --out, and the time-vs-rank staircase of a [512,512,3,3] conv.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lrdaccel import zoo
from lrdaccel.bench.cpu import busy_warning, set_threads
from lrdaccel.cli._common import threads_type
from lrdaccel.bench.report import render_markdown, write_report
from lrdaccel.bench.schema import load_results
from lrdaccel.bench.staircase import write_staircase
from lrdaccel.bench.throughput import FULL_MODELS, OBJECTIVES, QUICK_MODELS, BenchConfig, run_bench

QUICK = {"batch_size": 2, "min_run_time": 0.05, "rank_budget_s": 2.0, "rank_min_run_time": 0.05}
FULL = {"batch_size": 16, "min_run_time": 0.2, "rank_budget_s": 20.0, "rank_min_run_time": 0.2}


def _models(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--models needs at least one zoo name")
    return names


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="measure the paper's table (params, MACs, inference and training throughput ratios)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=_models, default=None,
                        help=f"comma-separated zoo names (default {','.join(FULL_MODELS)}; with --quick "
                             f"{','.join(QUICK_MODELS)}); known: {', '.join(zoo.names())}")
    parser.add_argument("--quick", action="store_true",
                        help=f"a fast look: small models ({','.join(QUICK_MODELS)}), batch {QUICK['batch_size']}, "
                             f"{QUICK['min_run_time']} s per measurement, no staircase; other options still apply")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"batch of every timed step (default {FULL['batch_size']}; {QUICK['batch_size']} with --quick)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved measurements of every step; ratios report min/median/max over them (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of every step before measuring (default 1)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help=f"seconds one measurement lasts at least; fast steps are repeated within it "
                             f"(default {FULL['min_run_time']}; {QUICK['min_run_time']} with --quick)")
    parser.add_argument("--ratio", type=float, default=2.0,
                        help="per-layer compression ratio, original weight params / decomposed (default 2)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="infer",
                        help="what rank optimization times per layer: 'infer' (forward, as in the paper) or "
                             "'train' (forward + backward) (default infer)")
    parser.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu, cuda (default cpu)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="run under bf16 autocast (default: on for cuda, off on cpu)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels_last memory format for conv models (default: on for cuda, off on cpu)")
    parser.add_argument("--threads", type=threads_type, default=None,
                        help="torch CPU threads, or 'auto': torch's choice on an idle machine, 1 on a busy one "
                             "(default: torch's choice; time on a quiet machine)")
    parser.add_argument("--staircase", action=argparse.BooleanOptionalAction, default=None,
                        help="also time a [512,512,3,3] conv under Tucker-2 across ranks and plot time vs rank "
                             "(default: on, off with --quick)")
    parser.add_argument("--rank-budget", type=float, default=None,
                        help=f"seconds rank optimization may spend timing each distinct layer (default "
                             f"{FULL['rank_budget_s']:g}; {QUICK['rank_budget_s']:g} with --quick)")
    parser.add_argument("--rank-min-run-time", type=float, default=None,
                        help=f"seconds of repeated calls per layer timing in the rank search (default "
                             f"{FULL['rank_min_run_time']:g}; {QUICK['rank_min_run_time']:g} with --quick)")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="record the top operators (torch.profiler) of the original and of LRD + both, "
                             "inference and training, in the results and the report (default on)")
    parser.add_argument("--timing-cache", default=None,
                        help="rank optimization's per-layer timing cache: a JSON path, or 'none' for no file "
                             "(default: lrdaccel's file in the user cache directory)")
    parser.add_argument("--out", default="out/bench",
                        help="directory for results.json, report.md, report.png, staircase.* (default out/bench)")
    parser.add_argument("--report", metavar="RESULTS_JSON",
                        help="do not measure: redraw report.md and report.png from this results.json into --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _pick(value, default):
    return default if value is None else value


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.report:
        results = load_results(args.report)
        paths = write_report(results, out)
        print(render_markdown(results))
        print(f"wrote {paths['markdown']} and {paths['plot']}")
        return 0
    for message in (set_threads(args.threads), busy_warning()):
        if message:
            print(message, file=sys.stderr)
    defaults = QUICK if args.quick else FULL
    on_gpu = torch.device(args.device).type == "cuda"
    config = BenchConfig(
        models=args.models or list(QUICK_MODELS if args.quick else FULL_MODELS),
        ratio=args.ratio,
        batch_size=_pick(args.batch_size, defaults["batch_size"]),
        repeats=args.repeats,
        warmup=args.warmup,
        min_run_time=_pick(args.min_run_time, defaults["min_run_time"]),
        objective=args.objective,
        device=args.device,
        autocast_bf16=on_gpu if args.bf16 is None else args.bf16,
        channels_last=on_gpu if args.channels_last is None else args.channels_last,
        timing_cache=args.timing_cache,
        rank_budget_s=_pick(args.rank_budget, defaults["rank_budget_s"]),
        rank_min_run_time=_pick(args.rank_min_run_time, defaults["rank_min_run_time"]),
        profile=args.profile,
        quick=args.quick,
    )
    results = run_bench(config, progress=not args.no_progress)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    paths = write_report(results, out)
    print(render_markdown(results))
    print(f"wrote {out / 'results.json'}, {paths['markdown']} and {paths['plot']}")
    if args.staircase if args.staircase is not None else not args.quick:
        paths = write_staircase(out, config.runtime, config.batch_size, config.objective, config.cache)
        print(f"time-vs-rank staircase of a [512,512,3,3] conv: wrote {paths['plot']} and {paths['data']}")
    return 0
