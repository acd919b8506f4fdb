"""Layer merging on HF ResNet-50/101/152 (eager): throughput of LRD, LRD + merging, and both with
sequential freezing, each as a ratio to the original, measured side by side (interleaved repeats).

Variants at ratio 2 (ratio ranks, the layer reading the image kept as in the bench):
- LRD: every conv and the classifier decomposed on its own (`lrd.plan(model, ratio=2)`);
- LRD + merging: each bottleneck merged to three convs at its 3x3's Tucker ranks, the other layers
  as in LRD (`lrd.plan(model, ratio=2, merge=True, example_inputs=...)`);
- "ranks timed": LRD + merging after `lrd.optimize_ranks` (eager, this machine), for inference
  or for training: each merged block timed alone at pairs of inner widths against the original
  block (kept where nothing beats it), the other layers as the rank search always does;
- "+ rotate" / "+ static": the same model trained under SequentialFreezer (rotate: one cycle of
  its phases, every factor of every layer and every conv of every merged block in proportion;
  static: SVD second factors, Tucker-2 cores and merged blocks' inner convs).
Freezing does not change the inference graph, so freezing rows share their model's inference.
Weights are random and new modules are built at the planned shapes without factorizing or
calibrating (speed depends on shapes, not values), as `lrdaccel bench` does.

    .venv/bin/python benchmarks/merge_resnet.py --models resnet50 --threads 1 --repeats 5
    .venv/bin/python benchmarks/merge_resnet.py --models resnet-mini --batch-size 2 --repeats 2   # smoke

Writes <out>.json and <out>.md (default benchmarks/results/merge_resnet.*).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
from pathlib import Path

import torch

import lrdaccel as lrd
from lrdaccel import zoo
from lrdaccel.bench.demo_pipeline import keep_input_layer
from lrdaccel.bench.workloads import training_phases
from lrdaccel.measure import Workload, count_macs, count_params, measure_interleaved, ratio_to_baseline
from lrdaccel.measure.machine import load_average
from lrdaccel.measure.steps import Placement, inference_phase
from lrdaccel.decomposition.build import build_modules, swap_modules

# (key, label, plan: None | "lrd" | "merged", freezing schedule or None)
VARIANTS = (
    ("original", "original", None, None),
    ("lrd", "LRD", "lrd", None),
    ("lrd_rotate", "LRD + freezing (rotate)", "lrd", "rotate"),
    ("merged", "LRD + merging", "merged", None),
    ("merged_rotate", "LRD + merging + freezing (rotate)", "merged", "rotate"),
    ("merged_static", "LRD + merging + freezing (static)", "merged", "static"),
    ("merged_infer", "LRD + merging, ranks timed for inference", "merged_infer", None),
    ("merged_train", "LRD + merging, ranks timed for training", "merged_train", None),
    ("merged_train_rotate", "LRD + merging, ranks timed for training + freezing (rotate)", "merged_train", "rotate"),
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,resnet101,resnet152")
    parser.add_argument("--ratio", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds of calls per measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--search-budget", type=float, default=20.0, help="rank search seconds per distinct layer")
    parser.add_argument("--runtime", default="eager", choices=("eager", "compile"),
                        help="what every variant runs in, and what the rank search times in (default eager)")
    parser.add_argument("--no-train", action="store_true", help="inference only (compiled training of every "
                                                                "freezing phase takes long)")
    parser.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                        help=f"keys to measure (default all: {', '.join(v[0] for v in VARIANTS)}); a freezing "
                             f"row needs its model's row")
    parser.add_argument("--out", default="benchmarks/results/merge_resnet")
    return parser.parse_args(argv)


def structural(model: torch.nn.Module, plan) -> torch.nn.Module:
    """A copy of `model` with the plan's modules built at their shapes (no factorization)."""
    copied = copy.deepcopy(model)
    swap_modules(copied, build_modules(copied, plan, factorize=False))
    return copied


def bench_model(name: str, args) -> dict:
    spec = zoo.get(name)
    torch.manual_seed(0)
    original = spec.build().eval()
    inputs = spec.example_inputs(args.batch_size)
    keep = keep_input_layer(3)
    plans = {"lrd": lrd.plan(original, ratio=args.ratio, filter_fn=keep),
             "merged": lrd.plan(original, ratio=args.ratio, filter_fn=keep, merge=True,
                                example_inputs=spec.example_inputs(1))}
    chosen = {key.strip() for key in args.variants.split(",")} | {"original"}
    searches = {}
    for objective in ("infer", "train"):
        if any(v[2] == f"merged_{objective}" and v[0] in chosen for v in VARIANTS):
            plans[f"merged_{objective}"] = lrd.optimize_ranks(original, plans["merged"], inputs, objective=objective,
                                                               runtime=args.runtime, budget_s=args.search_budget,
                                                               min_run_time=0.1, progress=True)
            searches[objective] = _search_summary(plans[f"merged_{objective}"], plans["merged"])
    models = {"original": original, **{key: structural(original, plan) for key, plan in plans.items()}}
    placement = Placement(runtime=args.runtime)
    workloads, rows = [], []
    for key, label, plan, schedule in VARIANTS:
        if key not in chosen:
            continue
        model = models[plan or "original"]
        if schedule is None:
            workloads.append(Workload(f"{key}:infer", [inference_phase(model, inputs, placement)]))
        if not args.no_train:
            workloads.append(Workload(f"{key}:train", training_phases(model, inputs, placement, schedule)))
        rows.append((key, label, plan, schedule))
    timings = measure_interleaved(workloads, repeats=args.repeats, warmup=1, min_run_time=args.min_run_time,
                                  progress=True, alternate=True)
    base_params, base_macs = count_params(original), count_macs(original, inputs)
    result = {"model": name, "description": spec.description, "batch_size": args.batch_size,
              "runtime": args.runtime,
              "original": {"params": base_params, "macs": base_macs,
                           "infer_s": min(timings.seconds["original:infer"]),
                           "train_s": min(timings.seconds["original:train"]) if not args.no_train else None},
              "merged_blocks": len(plans["merged"].merged), "searches": searches, "variants": []}
    for key, label, plan, schedule in rows:
        model = models[plan or "original"]
        infer_key = f"{key if schedule is None else plan}:infer"
        result["variants"].append({
            "key": key, "label": label, "schedule": schedule,
            "params": count_params(model) / base_params, "macs": count_macs(model, inputs) / base_macs,
            "convs": sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()),
            "infer": ratio_to_baseline(timings, infer_key, "original:infer"),
            "train": None if args.no_train else ratio_to_baseline(timings, f"{key}:train", "original:train"),
            "phases": 0 if args.no_train else len(next(w for w in workloads if w.name == f"{key}:train").phases),
        })
    result["seconds"] = {name: values for name, values in timings.seconds.items()}
    return result


def _search_summary(optimized, planned) -> dict:
    """What the rank search changed in the merged plan: widths of merged blocks, blocks kept."""
    blocks = [(row, optimized[row.name]) for row in planned.merged]
    return {"seconds": optimized.meta["rank_optimization"]["seconds"],
            "blocks_kept": sum(new.kind == "keep" for _, new in blocks),
            "widths": [[row.name, list(row.rank), list(new.rank) if new.rank else None] for row, new in blocks],
            "layers_changed": sum(optimized[row.name].rank != row.rank for row in planned.changed)}


def markdown(results: dict) -> str:
    lines = [f"# Layer merging on HF ResNet ({results['config'].get('runtime', 'eager')})", "",
             f"Ratio {results['config']['ratio']:g}, batch {results['config']['batch_size']}, "
             f"{results['config']['repeats']} interleaved repeats (alternating order), 1 warm-up call per step; "
             f"{results['machine']}; load average {results['load_average']} at start, {results['load_average_end']} "
             f"at end; {results['created']}.", "",
             "Cells: ratio to the original, median over repeats (min-max). Freezing rows share the inference "
             "of the model they freeze (*); their training is the mean over one cycle of phases.", ""]
    for model in results["models"]:
        o = model["original"]
        lines += [f"## {model['model']}", "",
                  f"{model['description']}; batch {model['batch_size']}. Original {o['params']:,} parameters, "
                  f"{o['macs'] / 1e9 / model['batch_size']:.2f} GMACs per image; {model['merged_blocks']} "
                  f"bottlenecks merged.", "",
                  *[f"Rank search for {objective}: {search['seconds']:.0f} s; {search['layers_changed']} of the "
                    f"plan's rows changed rank or were kept; {search['blocks_kept']} merged blocks kept as the "
                    f"original; merged widths " + ", ".join(sorted({f"{tuple(a)} -> {tuple(b) if b else 'kept'}"
                                                                      for _, a, b in search["widths"]})) + "."
                    for objective, search in model.get("searches", {}).items()], "",
                  "| variant | parameters | MACs | convs | inference throughput | training throughput |",
                  "|---|---|---|---|---|---|"]
        for v in model["variants"]:
            star = " *" if v["schedule"] else ""
            phases = f" [{v['phases']} phases]" if v["phases"] > 1 else ""
            lines.append(f"| {v['label']} | {v['params']:.3f}x | {v['macs']:.3f}x | {v['convs']} | "
                         f"{_cell(v['infer'])}{star} | {_cell(v['train']) if v['train'] else '-'}{phases} |")
        lines.append("")
    return "\n".join(lines)


def _cell(spread: dict) -> str:
    return f"{spread['median']:.2f}x ({spread['min']:.2f}-{spread['max']:.2f})"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"format": "lrdaccel.merge_resnet", "version": 1, "lrdaccel_version": lrd.__version__,
               "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                          f"torch {torch.__version__}",
               "load_average": load_average(), "config": vars(args), "models": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        results["models"].append(bench_model(name, args))
        results["load_average_end"] = load_average()
        out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(results))
        print(markdown(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
