"""`lrdaccel bench`: the paper's table, measured side by side in one run, under each runtime.

Rows: original, LRD (ratio ranks), LRD + rank optimization, LRD + sequential freezing (rotate),
LRD + both, LRD + static freezing, LRD + merging (bottleneck models; --variants picks rows), and
with --peers prune channel pruning (torch-pruning) at the same parameters. Columns: parameters,
MACs, inference throughput, training throughput (averaged over the freezing phases), each as a
ratio to the original in the same runtime, with min/median/max over interleaved repeats (A B A B
...). One table per runtime (--runtime eager,compile,onnxruntime,int8; ranks optimized for each unless
--rank-runtime; onnxruntime and int8 run inference only, int8 being every row quantized by
lrd.quantize and timed eager on the CPU; --compile-mode reduce-overhead or max-autotune for
what GPU users run), and one line comparing our best (decomposed, in its fastest runtime) with
the original in its fastest runtime. Writes results.json, report.md (the tables) and report.png
(bar chart) into --out, and the time-vs-rank staircase of a [512,512,3,3] conv.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lrdaccel import zoo
from lrdaccel.bench.config import PEERS, QUICK_SETTINGS, VARIANT_KEYS, BenchConfig
from lrdaccel.bench.paper_table import paper_staircase, run_bench
from lrdaccel.bench.report import render_markdown, write_report
from lrdaccel.bench.schema import load_results
from lrdaccel.cli._common import check_outputs, threads_type
from lrdaccel.cli._config_args import add_config_args, field_help, given
from lrdaccel.measure.machine import busy_warning, set_threads
from lrdaccel.measure.runtimes import COMPILE_MODES, RUNTIMES
from lrdaccel.measure.timer import OBJECTIVES
from lrdaccel.peers._extra import require_peers


ORDER = 80  # place in `lrdaccel --help`: the pipeline's order

def _names(option: str):
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"{option} needs at least one name")
        return names

    return parse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="measure the paper's table (params, MACs, inference and training throughput ratios)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    quick = {key: value for key, value in QUICK_SETTINGS.items() if key not in ("models", "quick")}
    parser.add_argument("--runtimes", "--runtime", dest="runtimes", type=_names("--runtimes"), default=argparse.SUPPRESS,
                        help=f"comma-separated, from {', '.join(RUNTIMES)}: "
                             f"{field_help(BenchConfig)['runtimes']} (default {','.join(BenchConfig().runtimes)})")
    parser.add_argument("--models", type=_names("--models"), default=argparse.SUPPRESS,
                        help=f"comma-separated zoo names (default {','.join(BenchConfig().models)}; with --quick "
                             f"{','.join(QUICK_SETTINGS['models'])}); known: {', '.join(zoo.names())}")
    parser.add_argument("--variants", type=_names("--variants"), default=argparse.SUPPRESS,
                        help=f"comma-separated rows, from {', '.join(VARIANT_KEYS)}: "
                             f"{field_help(BenchConfig)['variants']} (default: all)")
    parser.add_argument("--peers", type=_names("--peers"), default=argparse.SUPPRESS,
                        help=f"comma-separated, from {', '.join(PEERS)}: "
                             f"{field_help(BenchConfig)['peers'].replace('%', '%%')} (default: none)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a fast look: {', '.join(f'{k}={v}' for k, v in QUICK_SETTINGS.items() if k != 'quick')},"
                             f" no staircase; other options still apply")
    add_config_args(parser, BenchConfig, ("batch_size", "repeats", "warmup", "min_run_time", "ratio", "objective",
                                          "train", "device", "autocast_bf16", "channels_last", "rank_budget_s",
                                          "rank_min_run_time", "profile", "timing_cache", "compile_mode",
                                          "rank_runtime"),
                    flags={"autocast_bf16": "--bf16", "rank_budget_s": "--rank-budget"},
                    choices={"objective": OBJECTIVES, "compile_mode": COMPILE_MODES, "rank_runtime": RUNTIMES},
                    notes={name: f"{value} with --quick" for name, value in quick.items()})
    parser.add_argument("--threads", type=threads_type, default=None,
                        help="torch CPU threads, or 'auto': torch's choice on an idle machine, 1 on a busy one "
                             "(default: torch's choice; time on a quiet machine)")
    parser.add_argument("--staircase", action=argparse.BooleanOptionalAction, default=None,
                        help="also time a [512,512,3,3] conv under Tucker-2 across ranks and plot time vs rank "
                             "(default: on, off with --quick)")
    parser.add_argument("--out", default="out/bench",
                        help="directory for results.json, report.md, report.png, staircase.* (default out/bench)")
    parser.add_argument("--report", metavar="RESULTS_JSON",
                        help="do not measure: redraw report.md and report.png from this results.json into --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> int:
    check_outputs(dirs={"--out": args.out})
    out = Path(args.out)
    if args.report:
        results = load_results(args.report)
        paths = write_report(results, out)
        print(render_markdown(results))
        print(f"wrote {paths['markdown']} and {paths['plot']}")
        return 0
    overrides = given(args, BenchConfig)
    for kind in set(overrides.get("peers", [])) & set(PEERS):
        require_peers(kind, f"--peers {kind}")  # one line naming the option, before any work
    config = BenchConfig.quick_config(**overrides) if args.quick else BenchConfig(**overrides)
    for message in (set_threads(args.threads), busy_warning()):
        if message:
            print(message, file=sys.stderr)
    results = run_bench(config, progress=not args.no_progress)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    paths = write_report(results, out)
    print(render_markdown(results))
    print(f"wrote {out / 'results.json'}, {paths['markdown']} and {paths['plot']}")
    if args.staircase if args.staircase is not None else not args.quick:
        paths = paper_staircase(out, config)
        print(f"time-vs-rank staircase of a [512,512,3,3] conv: wrote {paths['plot']} and {paths['data']}")
    return 0
