"""Branched Tucker-2 cores as a form the rank search may pick (`optimize_ranks(try_branches=N)`).

HF ResNet-50 at ratio 2 (plain LRD plan, the layer reading the image kept), batch 8: the rank
search without and with `try_branches`, then the whole models timed side by side
(`compare_end_to_end`, interleaved rounds) in the same runtime the search timed in. Both searches
share one timing cache, so the plain Tucker-2 times are measured once.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/branched_search.py --runtime eager

Writes <out>.json and <out>.md (default benchmarks/results/branched_search_<runtime>.*).
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

import torch

import lrdaccel as lrd
from lrdaccel import zoo
from lrdaccel.bench.demo_pipeline import keep_input_layer
from lrdaccel.measure.machine import load_average
from lrdaccel.rankopt import compare_end_to_end
from lrdaccel.rankopt.cache import TimingCache


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--runtime", default="eager", choices=("eager", "compile"))
    parser.add_argument("--branches", type=int, default=4, help="try cores of 2, 4, ... up to this many branches")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out or f"benchmarks/results/branched_search_{args.runtime}")
    spec = zoo.get(args.model)
    torch.manual_seed(0)
    model = spec.build().eval()
    x = spec.example_inputs(args.batch_size)
    plan = lrd.plan(model, ratio=2.0, filter_fn=keep_input_layer(3))
    load_start = load_average()
    with tempfile.TemporaryDirectory() as scratch:
        cache = TimingCache(Path(scratch) / "timings.json")  # fresh: both searches measure here and now
        plain = lrd.optimize_ranks(model, plan, x, runtime=args.runtime, cache=cache, progress=True)
        branched = lrd.optimize_ranks(model, plan, x, runtime=args.runtime, cache=cache, progress=True,
                                      try_branches=args.branches)
    plans = {"ratio ranks": plan, "optimized": plain, "optimized + branches": branched}
    report = compare_end_to_end(model, plans, x, runtime=args.runtime, rounds=args.rounds)
    summary = report.summary()
    rows = []
    for name, variant in plans.items():
        forms = [row for row in variant.changed if row.kind == "tucker2_branched"]
        rows.append({"variant": name, "params": sum(r.params_after for r in variant.changed),
                     "branched_layers": len(forms), "branches": sorted({r.branches for r in forms}),
                     "tucker2_layers": sum(r.kind in ("tucker2", "tucker2_branched") for r in variant.changed),
                     **summary[name]})
    dense = sum(r.params_before for r in plan.changed)
    result = {"model": args.model, "runtime": args.runtime, "batch_size": args.batch_size, "rounds": args.rounds,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "load_average": [load_start,
                                                                                              load_average()],
              "search_seconds": {"optimized": plain.meta["rank_optimization"]["seconds"],
                                 "optimized + branches": branched.meta["rank_optimization"]["seconds"]},
              "dense_params": dense, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Branched Tucker-2 in the rank search: {args.model}, {args.runtime}", "",
             f"Ratio 2, batch {args.batch_size}, {args.rounds} interleaved rounds, {result['threads']} thread(s), "
             f"torch {result['torch']}; load average {load_start:.1f} at start, {load_average():.1f} at end; "
             f"{result['created']}. Searches: {result['search_seconds']['optimized']:.0f} s plain, "
             f"{result['search_seconds']['optimized + branches']:.0f} s with up to {args.branches} branches.", "",
             "| variant | decomposed layers' params | branched layers | speed-up vs original (median, min-max) |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['params'] / dense:.3f}x | {r['branched_layers']} of {r['tucker2_layers']} "
                     f"{r['branches'] or ''} | {r['speedup_median']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
