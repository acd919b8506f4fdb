"""How a merged bottleneck's speed depends on its inner width: one HF ResNet-50 block alone
(`lrdaccel.rankopt.forms.timing_chain`), original vs merged at the ratio-2 width and at nearby
widths, inference and training, interleaved. Input for rank optimization over merged blocks
(issue 11 item 3): the widths it would time.

    .venv/bin/python benchmarks/merge_block_widths.py --threads 1

Writes <out>.json and <out>.md (default benchmarks/results/merge_block_widths.*).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

import lrdaccel as lrd
from lrdaccel import zoo
from lrdaccel.rankopt.forms import timing_chain
from lrdaccel.measure import Workload, measure_interleaved, ratio_to_baseline
from lrdaccel.measure.machine import load_average
from lrdaccel.measure.steps import inference_phase, training_phase

BLOCKS = {  # a block of each stage (not the first, which has the projection shortcut): input side
    "resnet.encoder.stages.0.layers.1.layer.1.convolution": 56,
    "resnet.encoder.stages.2.layers.1.layer.1.convolution": 14,
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/merge_block_widths")
    return parser.parse_args(argv)


def widths_near(rank: int) -> list[int]:
    """The ratio width and the multiples of 8, 16 and 32 around it."""
    return sorted({rank, rank - rank % 8, rank - rank % 8 + 8, rank - rank % 16, rank - rank % 32} - {0})


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = zoo.get("resnet50").build().eval()
    plan = lrd.plan(model, ratio=2.0, merge=True, example_inputs=torch.randn(1, 3, 224, 224))
    rows = {row.name: row for row in plan.merged}
    results = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{platform.processor() or platform.machine()}, {args.threads} torch threads, "
                          f"torch {torch.__version__}", "load_average": load_average(), "config": vars(args),
               "blocks": []}
    for name, side in BLOCKS.items():
        row = rows[name]
        x = torch.randn(args.batch_size, row.merge.first_shape["in"], side, side)
        widths = widths_near(row.rank[0])
        entry = {"block": name, "input": list(x.shape), "ratio_width": row.rank[0], "widths": {}}
        for objective, phase in (("infer", inference_phase), ("train", training_phase)):
            workloads = [Workload("original", [phase(timing_chain(model, row), x)])]
            workloads += [Workload(str(w), [phase(timing_chain(model, row, (w, w)), x)]) for w in widths]
            timings = measure_interleaved(workloads, repeats=args.repeats, min_run_time=args.min_run_time,
                                          alternate=True)
            for w in widths:
                cell = entry["widths"].setdefault(str(w), {"params": row.with_rank((w, w), "").params_after})
                cell[objective] = ratio_to_baseline(timings, str(w), "original")
        results["blocks"].append(entry)
        print(json.dumps({w: {k: round(v["median"], 2) if isinstance(v, dict) else v for k, v in c.items()}
                          for w, c in entry["widths"].items()}), flush=True)
    results["load_average_end"] = load_average()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Merged bottleneck speed against inner width (HF ResNet-50 blocks alone)", "",
             f"Batch {args.batch_size}, {args.repeats} interleaved repeats; {results['machine']}; load average "
             f"{results['load_average']} to {results['load_average_end']}; {results['created']}. Ratio to the "
             f"original block, median (min-max).", ""]
    for entry in results["blocks"]:
        lines += [f"## {entry['block']} (input {'x'.join(map(str, entry['input']))}, ratio width "
                  f"{entry['ratio_width']})", "", "| width | weights | inference | training |", "|---|---|---|---|"]
        for w, cell in entry["widths"].items():
            lines.append(f"| {w} | {cell['params']:,} | {cell['infer']['median']:.2f}x "
                         f"({cell['infer']['min']:.2f}-{cell['infer']['max']:.2f}) | {cell['train']['median']:.2f}x "
                         f"({cell['train']['min']:.2f}-{cell['train']['max']:.2f}) |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
