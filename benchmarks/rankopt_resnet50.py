"""Rank optimization on HF ResNet-50 at ratio 2, 224x224, on this machine.

Measures, in this order, writing the results after every stage (so a cut-short run keeps what
it measured):
  1. search time with a cold cache (a fresh file) and again warm (same file), objective infer;
  2. the search for objective train (cold), to get the ranks training should use;
  3. whole-model inference, then training, for the original, LRD at ratio ranks and LRD at
     optimized ranks, interleaved in one run per objective (min/median/max over rounds);
  4. the staircase of a [512,512,3,3] conv at 14x14 under Tucker-2, ranks 240..272.

    .venv/bin/python benchmarks/rankopt_resnet50.py            # writes benchmarks/results/rankopt_resnet50.*

The machine may be shared: figures are as measured, with their spread.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel import zoo
from lrdaccel.rankopt import compare_end_to_end, measure_staircase, plot_staircase, timing_table
from lrdaccel.measure.machine import device_name

RESULTS = Path(__file__).parent / "results"
NAME = "rankopt_resnet50"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="zoo name (a smaller one for a dry run)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=2.0)
    parser.add_argument("--budget-s", type=float, default=20.0, help="per-layer search budget, infer (library default)")
    parser.add_argument("--train-budget-s", type=float, default=8.0, help="per-layer search budget, train")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the whole-model comparison")
    parser.add_argument("--check-time", type=float, default=0.5, help="seconds of calls per model per round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    spec = zoo.get(args.model)
    model = spec.build().eval()
    inputs = spec.example_inputs(args.batch_size)
    plan = lrd.plan(model, ratio=args.ratio)
    results: dict = {
        "model": spec.description,
        "input": list(inputs.shape),
        "ratio": args.ratio,
        "machine": {"device": device_name("cpu"), "torch": torch.__version__, "python": platform.python_version(),
                    "threads": torch.get_num_threads()},
        "settings": vars(args) | {"out": str(args.out)},
    }
    write = lambda: _write(args.out, results)  # noqa: E731

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "timings.json"
        infer_plan = lrd.optimize_ranks(model, plan, inputs, "infer", cache=cache, budget_s=args.budget_s,
                                        progress=True)
        warm = lrd.optimize_ranks(model, plan, inputs, "infer", cache=cache, budget_s=args.budget_s)
        same = [(r.kind, r.rank) for r in warm] == [(r.kind, r.rank) for r in infer_plan]
        results["search_infer"] = _search_summary(plan, infer_plan, warm, same)
        infer_plan.save(args.out / f"{NAME}_plan_infer.json")
        print(timing_table(infer_plan))
        print(json.dumps(results["search_infer"], indent=1))
        write()

        train_plan = lrd.optimize_ranks(model, plan, inputs, "train", cache=cache, budget_s=args.train_budget_s,
                                        progress=True)
        results["search_train"] = _search_summary(plan, train_plan)
        train_plan.save(args.out / f"{NAME}_plan_train.json")
        print(timing_table(train_plan))
        print(json.dumps(results["search_train"], indent=1))
        write()

    for objective, optimized in (("infer", infer_plan), ("train", train_plan)):
        report = compare_end_to_end(model, {"ratio ranks": plan, "optimized ranks": optimized}, inputs, objective,
                                    rounds=args.rounds, min_run_time=args.check_time)
        print(report)
        results[f"end_to_end_{objective}"] = _end_to_end_summary(report, args.batch_size)
        write()

    conv = nn.Conv2d(512, 512, 3, padding=1, bias=False)
    shape = (args.batch_size, 512, 14, 14)
    stairs = measure_staircase(conv, shape, range(240, 273), "infer", cache=False,
                               label=f"Conv2d 512x512x3x3 under Tucker-2, input {'x'.join(map(str, shape))}, "
                                     f"infer, {device_name('cpu')}")
    plot_staircase(stairs, args.out / f"{NAME}_staircase.png")
    results["staircase"] = stairs.to_dict()
    write()


def _search_summary(ratio_plan: lrd.Plan, optimized: lrd.Plan, warm: lrd.Plan | None = None,
                    same: bool | None = None) -> dict:
    info = optimized.meta["rank_optimization"]
    timed = [row for row in optimized if row.time_ms is not None]
    before, after = ratio_plan.totals(), optimized.totals()
    summary = {
        "cold_seconds": info["seconds"],
        "cold_timings_measured": info["timed"],
        "distinct_layers": info["distinct_layers"],
        "budget_s_per_layer": info["budget_s"],
        "layers": len(timed),
        "rank_changed": sum(1 for r in timed if r.kind != "keep" and r.rank != r.ratio_rank),
        "kept_original": sum(1 for r in timed if r.kind == "keep"),
        "kept_ratio_rank": sum(1 for r in timed if r.kind != "keep" and r.rank == r.ratio_rank),
        "cut_by_budget": sum(1 for r in timed if "budget" in r.reason),
        "sum_layer_ms_original": round(sum(r.time_original_ms for r in timed), 2),
        "sum_layer_ms_ratio_rank": round(sum(r.time_ratio_rank_ms for r in timed), 2),
        "sum_layer_ms_chosen": round(sum(r.time_ms for r in timed), 2),
        "candidate_params_ratio_plan": before["params_after"],
        "candidate_params_optimized_plan": after["params_after"],
        "candidate_params_original": before["params_before"],
    }
    if warm is not None:
        warm_info = warm.meta["rank_optimization"]
        summary |= {"warm_seconds": warm_info["seconds"], "warm_timings_measured": warm_info["timed"],
                    "warm_same_choices": same}
    return summary


def _end_to_end_summary(report, batch: int) -> dict:
    out = {"rounds": len(report.times_ms["original"]), "ms_per_round": report.times_ms, "variants": {}}
    for name, s in report.summary().items():
        throughput = [batch * 1000 / t for t in report.times_ms[name]]
        out["variants"][name] = s | {"items_per_s_min": min(throughput), "items_per_s_max": max(throughput),
                                     "items_per_s_median": statistics.median(throughput)}
    return out


def _write(out: Path, results: dict) -> None:
    (out / f"{NAME}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{NAME}.md").write_text(_markdown(results))


def _markdown(r: dict) -> str:
    lines = [f"# Rank optimization, {r['model']}, ratio {r['ratio']:g}, input {'x'.join(map(str, r['input']))}",
             "", f"Machine: {r['machine']['device']}, torch {r['machine']['torch']}. The machine was shared with "
             "other jobs: figures are as measured, spread included.", ""]
    for objective in ("infer", "train"):
        s = r.get(f"search_{objective}")
        if not s:
            continue
        lines += [f"## Search, objective {objective}", "",
                  f"- cold cache: {s['cold_seconds']:.1f} s, {s['cold_timings_measured']} layer timings over "
                  f"{s['distinct_layers']} distinct layers (budget {s['budget_s_per_layer']} s per layer; "
                  f"{s['cut_by_budget']} layers cut by it)"]
        if "warm_seconds" in s:
            lines.append(f"- warm cache: {s['warm_seconds']:.2f} s, {s['warm_timings_measured']} timings measured, "
                         f"same choices: {s['warm_same_choices']}")
        lines += [f"- {s['layers']} layers: rank changed {s['rank_changed']}, ratio rank kept {s['kept_ratio_rank']}, "
                  f"original kept {s['kept_original']}",
                  f"- sum of per-layer times (ms): original {s['sum_layer_ms_original']}, ratio ranks "
                  f"{s['sum_layer_ms_ratio_rank']}, chosen {s['sum_layer_ms_chosen']}",
                  f"- candidate-layer weights: original {s['candidate_params_original']:,}, ratio plan "
                  f"{s['candidate_params_ratio_plan']:,}, optimized plan {s['candidate_params_optimized_plan']:,}", ""]
    for objective in ("infer", "train"):
        e = r.get(f"end_to_end_{objective}")
        if not e:
            continue
        lines += [f"## Whole model, {objective}, {e['rounds']} interleaved rounds", "",
                  "| variant | ms min / median / max | items/s median | speed-up vs original min / median / max |",
                  "|---|---|---|---|"]
        for name, v in e["variants"].items():
            lines.append(f"| {name} | {v['ms_min']:.0f} / {v['ms_median']:.0f} / {v['ms_max']:.0f} | "
                         f"{v['items_per_s_median']:.2f} | {v['speedup_min']:.3f} / {v['speedup_median']:.3f} / "
                         f"{v['speedup_max']:.3f} |")
        lines.append("")
    st = r.get("staircase")
    if st:
        lines += ["## Staircase", "", f"{st['label']}; original layer {st['original_ms']:.2f} ms.", "",
                  f"![staircase]({NAME}_staircase.png)", "", "| rank | ms | params |", "|---|---|---|"]
        lines += [f"| {rank[0]} | {ms:.2f} | {p:,} |" for rank, ms, p in zip(st["ranks"], st["times_ms"], st["params"])]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
