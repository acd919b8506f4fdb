"""The paper's table, measured side by side: original, LRD, LRD + rank optimization, LRD + sequential
freezing, LRD + both, LRD + static freezing, LRD + merging (arXiv 2407.20266's bottleneck merge,
conv models only), and with `peers` what users would pick instead (channel pruning at LRD's
parameters, `lrdaccel.bench.peer_rows`); parameters, MACs, inference and training throughput,
each as a ratio to the original in the same runtime, one table per runtime (eager, compile,
onnxruntime: ranks optimized for each), and our best against the original's best across them:
a user who would serve the original compiled or exported compares with that, not with eager.

Weights are random and decomposed layers are built at the planned shapes without factorizing
(`LayerClass.like`): speed depends on shapes, dtype and memory format, not on values, and
factorizing ResNet-152 would cost minutes for nothing. Freezing does not change the inference
graph, so freezing rows reuse the inference measurement of the model they freeze. Under compile
the table records torch.compile's mode (CUDA graphs, autotuning): that is what users run on a GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lrdaccel import zoo
from lrdaccel.bench.config import INFER_OURS, TRAIN_OURS, BenchConfig
from lrdaccel.bench.peer_rows import PeerModels
from lrdaccel.bench.schema import BENCH_FORMAT, record_end_load, results_header
from lrdaccel.bench.workloads import training_phases
from lrdaccel.layers import LowRankModule
from lrdaccel.measure.counting import count_macs, count_params
from lrdaccel.measure.profiling import onnxruntime_operators, top_operators
from lrdaccel.measure.runtimes import INFERENCE_ONLY
from lrdaccel.measure.steps import Placement, inference_phase
from lrdaccel.measure.timer import Timings, Workload, measure_interleaved, ratio_to_baseline, spread
from lrdaccel.planning import Plan
from lrdaccel.planning import plan as make_plan
from lrdaccel.rankopt import measure_staircase, optimize_ranks
from lrdaccel.planning.forms import apply_forms, plan_forms
from lrdaccel.rankopt.staircase import write_staircase
from lrdaccel.decomposition.build import build_modules, swap_modules

# Paper B's Fig. 2: a [512,512,3,3] conv under Tucker-2 at ranks 242..270; at ResNet-50's last
# stage it sees 512 channels at 7x7.
STAIRCASE_RANKS = range(242, 271)
STAIRCASE_CHANNELS, STAIRCASE_SIDE = 512, 7


def structural_copy(model: nn.Module, plan: Plan, placement: Placement) -> nn.Module:
    """A copy of `model` with the plan's layers replaced by low-rank layers of the planned shapes
    (and the execution forms the plan chose)."""
    copied = copy.deepcopy(model)
    swap_modules(copied, build_modules(copied, plan, factorize=False))
    apply_forms(copied, plan)
    return placement.place_model(copied)


def _plan_summary(plan: Plan, ratio_plan: Plan, seconds: float | None = None) -> dict:
    changed = sum(1 for row, base in zip(plan, ratio_plan) if (row.kind, row.rank) != (base.kind, base.rank))
    summary = {
        "candidates": len(plan),
        "decomposed": len(plan.decomposed),
        "changed_from_ratio_ranks": changed,
        "kept_as_original_by_search": sum(1 for row, base in zip(plan, ratio_plan)
                                          if base.decomposed and not row.decomposed),
        **plan.totals(),
    }
    if seconds is not None:
        summary["seconds"] = round(seconds, 2)
    return summary


def bench_model(name: str, config: BenchConfig, progress: bool = False) -> dict:
    """Measure every variant of one zoo model under every runtime of the config.

    All inference steps (every variant in every runtime) are timed in one interleaved run, and
    all training steps in another, so ratios within a runtime and across runtimes come from the
    same repeats.

    Returns:
        {"entries": one results `models[i]` entry per runtime, "best": our best against the
        original's best across the runtimes (`best_of_runtimes`), None with one runtime}.
    """
    spec = zoo.get(name)
    torch.manual_seed(0)
    base_placement = config.placement
    original = base_placement.place_model(spec.build())
    inputs = base_placement.place_inputs(spec.example_inputs(config.batch_size))
    plans = _Plans(original, inputs, config, progress)
    peers = PeerModels(original, inputs, base_placement, plans.ratio) if config.peers else None

    entries = {runtime: _RuntimeEntry(name, runtime, config, original, inputs, plans, peers)
               for runtime in config.runtimes}
    infer = [w for entry in entries.values() for w in entry.infer]
    train = [w for entry in entries.values() for w in entry.train]
    infer_timings = measure_interleaved(infer, config.repeats, config.warmup, config.min_run_time, progress)
    train_timings = (measure_interleaved(train, config.repeats, config.warmup, config.min_run_time, progress)
                     if train else None)
    base_params, base_macs = count_params(original), count_macs(original, inputs)
    best = None
    if len(config.runtimes) > 1:
        best = {"name": name, "infer": best_of_runtimes(infer_timings, INFER_OURS, config.batch_size)}
        if train_timings is not None:
            best["train"] = best_of_runtimes(train_timings, TRAIN_OURS, config.batch_size)
    return {"entries": [entry.result(spec, infer_timings, train_timings, base_params, base_macs)
                        for entry in entries.values()], "best": best}


class _Plans:
    """One model's plans: at the ratio ranks, merged (where the config measures merging), and
    optimized per runtime the ranks are searched in (computed once, shared by the tables)."""

    def __init__(self, original: nn.Module, inputs, config: BenchConfig, progress: bool):
        self.original, self.inputs, self.config, self.progress = original, inputs, config, progress
        self.ratio = make_plan(original, ratio=config.ratio)
        self.merged = None
        if any(v.plan == "merged" for v in config.rows()):
            self.merged = make_plan(original, ratio=config.ratio, merge=True, example_inputs=inputs)
        self._optimized: dict[str, tuple[Plan, float]] = {}

    def optimized(self, runtime: str) -> tuple[Plan, float, str]:
        """(the plan optimized for a table's runtime, seconds the search took, the runtime searched in)."""
        searched = self.config.rank_runtime or runtime
        if searched not in self._optimized:
            config, placement = self.config, self.config.placement
            # ONNX Runtime has no training step: its ranks are chosen for inference.
            objective = "infer" if searched in INFERENCE_ONLY else config.objective
            start = time.perf_counter()
            plan = optimize_ranks(
                self.original, self.ratio, self.inputs, objective=objective, runtime=searched,
                compile_mode=config.compile_mode, device=placement.device,
                dtype=torch.bfloat16 if placement.autocast_bf16 else None, cache=config.cache,
                budget_s=config.rank_budget_s, min_run_time=config.rank_min_run_time, progress=self.progress)
            self._optimized[searched] = (plan, time.perf_counter() - start)
        return (*self._optimized[searched], searched)


class _RuntimeEntry:
    """One runtime's table of one model: its optimized plan, its models and their timed steps."""

    def __init__(self, name: str, runtime: str, config: BenchConfig, original: nn.Module, inputs, plans: _Plans,
                 peers: PeerModels | None = None):
        self.name, self.runtime, self.config, self.inputs = name, runtime, config, inputs
        self.placement = dataclasses.replace(config.placement, runtime=runtime)
        self.ratio_plan, self.merged_plan = plans.ratio, plans.merged
        self.optimized_plan, self.optimize_seconds, self.rank_runtime = plans.optimized(runtime)
        by_name = {"ratio": plans.ratio, "optimized": self.optimized_plan, "merged": plans.merged}
        trains = config.train and runtime not in INFERENCE_ONLY
        self.notes, self.schedules, self.peer_info = [], {}, {}
        self.variants = []
        self.models: dict[str, nn.Module] = {}
        for variant in config.rows():
            if variant.peer:
                built = peers.build(variant, by_name[variant.plan])
                if built.model is None:
                    self.notes.append(built.note)
                    continue
                self.models[variant.key], self.peer_info[variant.key] = built.model, built.info
                self.variants.append(variant)
            elif variant.plan == "merged" and not plans.merged.merged:
                self.notes.append(f"{variant.label}: n/a, the model has no bottleneck to merge (conv 1x1 -> kxk "
                                  f"-> 1x1); its other layers are the LRD row's")
            elif trains or variant.schedule is None:
                self.variants.append(variant)
        for variant in self.variants:
            if variant.peer:
                continue  # built above
            if variant.plan is None:
                self.models[variant.key] = original
            elif variant.schedule is None:
                self.models[variant.key] = structural_copy(original, by_name[variant.plan], self.placement)
            else:
                # Freezing changes requires_grad, so each freezing row trains its own copy.
                self.models[variant.key] = copy.deepcopy(self.models[variant.infer_as])
        for variant in self.variants:
            self.schedules[variant.key] = variant.schedule
            if variant.schedule and not any(isinstance(m, LowRankModule) for m in self.models[variant.key].modules()):
                self.schedules[variant.key] = None
                self.notes.append(f"{variant.label}: the {variant.plan} plan decomposes no layer, so there is "
                                  f"nothing to freeze; it trains like the model it would freeze")
        self.infer = [Workload(self.key(v.key), [inference_phase(self.models[v.key], inputs, self.placement)])
                      for v in self.variants if not v.infer_as]
        self.train = [] if runtime in INFERENCE_ONLY or not config.train else [
            Workload(self.key(v.key), training_phases(self.models[v.key], inputs, self.placement,
                                                      self.schedules[v.key])) for v in self.variants]

    def key(self, variant: str) -> str:
        return f"{self.runtime}/{variant}"

    def result(self, spec, infer_timings, train_timings, base_params: int, base_macs: int) -> dict:
        """The results entry: rows with ratios to the original under this runtime, plans, profiles."""
        config, batch = self.config, self.config.batch_size
        trainable = {w.name: _trainable_per_phase(self.models[w.name.split("/", 1)[1]], w) for w in self.train}
        rows = []
        for variant in self.variants:
            model = self.models[variant.key]
            infer_key = self.key(variant.infer_as or variant.key)
            params, macs = count_params(model), count_macs(model, self.inputs)
            row = {
                "variant": variant.key, "label": variant.label, "plan": variant.plan,
                "schedule": self.schedules[variant.key], "params": params, "macs": macs,
                "params_ratio": params / base_params, "macs_ratio": macs / base_macs,
                "infer_ratio": ratio_to_baseline(infer_timings, infer_key, self.key("original")),
                "infer_items_per_s": spread([batch / s for s in infer_timings.seconds[infer_key]]),
                "infer_measured_as": infer_key.split("/", 1)[1],
            }
            if variant.peer:
                row["peer"] = self.peer_info[variant.key]
            if self.train:
                train_key = self.key(variant.key)
                row.update({
                    "train_ratio": ratio_to_baseline(train_timings, train_key, self.key("original")),
                    "train_items_per_s": spread([batch / s for s in train_timings.seconds[train_key]]),
                    "train_phases": len(train_timings.per_phase[train_key][0]),
                    "train_phase_seconds": train_timings.per_phase[train_key],
                    "trainable_params": spread(trainable[train_key]),
                })
            rows.append(row)
        plans = {"ratio": _plan_summary(self.ratio_plan, self.ratio_plan),
                 "optimized": _plan_summary(self.optimized_plan, self.ratio_plan, self.optimize_seconds)}
        if self.merged_plan is not None and self.merged_plan.merged:
            merged = self.merged_plan
            plans["merged"] = {"candidates": len(merged), "decomposed": len(merged.decomposed),
                               "merged": len(merged.merged), **merged.totals()}
        return {
            "name": self.name, "runtime": self.runtime, "description": spec.description,
            **({"compile_mode": self.placement.compile_mode} if self.runtime == "compile" else {}),
            "ranks_searched_in": self.rank_runtime,
            "input_shape": list(spec.input_shape), "batch_size": batch,
            "plans": plans,
            "rows": rows,
            "optimized_layers": [_layer_row(row, base) for row, base in zip(self.optimized_plan, self.ratio_plan)
                                 if base.decomposed],
            "forms": plan_forms(self.optimized_plan),
            "profile": self.profile() if config.profile else {},
            "notes": self.notes,
        }

    def profile(self) -> dict:
        """Top operators of one inference (and training cycle) of the original and of our most
        complete row measured (LRD + both where training is, else LRD + rank optimization)."""
        infer = {w.name: w.phases for w in self.infer}
        train = {w.name: w.phases for w in self.train}
        profiles = {}
        preferred = ("lrd_both", "lrd_opt", "lrd_merge", "lrd") if self.train else ("lrd_opt", "lrd_merge", "lrd")
        ours = next((key for key in preferred if key in self.models), None)
        for variant in ("original",) + ((ours,) if ours else ()):
            infer_key = self.key(next(v.infer_as or v.key for v in self.variants if v.key == variant))
            if self.runtime == "onnxruntime":
                profiles[variant] = {"infer": onnxruntime_operators(self.models[variant], self.inputs)}
                continue
            profiles[variant] = {"infer": top_operators(infer[infer_key], self.placement.device)}
            if self.train:
                profiles[variant]["train"] = top_operators(train[self.key(variant)], self.placement.device)
        return profiles


def best_of_runtimes(timings: Timings, ours: tuple[str, ...], batch_size: int) -> dict:
    """Our fastest (a decomposed variant in its fastest runtime) against the original in ITS
    fastest runtime, by median time, with the per-repeat ratio of the two from the same run.

    A user who would deploy the original compiled or exported compares with that, not with
    eager PyTorch. (Picking the fastest of several by their medians favours whichever was lucky;
    the min-max of the ratio shows how much that can be.)
    """
    median = lambda key: statistics.median(timings.seconds[key])  # noqa: E731
    originals = [key for key in timings.seconds if key.split("/", 1)[1] == "original"]
    candidates = [key for key in timings.seconds if key.split("/", 1)[1] in ours]
    original, best = min(originals, key=median), min(candidates, key=median)
    per_s = lambda key: spread([batch_size / s for s in timings.seconds[key]])  # noqa: E731
    return {"original": original, "ours": best, "ratio": ratio_to_baseline(timings, best, original),
            "original_items_per_s": per_s(original), "ours_items_per_s": per_s(best)}


def _layer_row(row, base) -> dict:
    """One layer of the optimized plan: the ratio rank, the chosen one, and the measured times."""
    return {"name": row.name, "ratio_rank": base.rank, "kind": row.kind, "rank": row.rank,
            "time_original_ms": row.time_original_ms, "time_ratio_rank_ms": row.time_ratio_rank_ms,
            "time_ms": row.time_ms}


def _trainable_per_phase(model: nn.Module, workload: Workload) -> list[int]:
    counts = []
    for phase in workload.phases:
        if phase.prepare is not None:
            phase.prepare()
        counts.append(count_params(model, trainable_only=True))
    return counts


def run_bench(config: BenchConfig, progress: bool = True) -> dict:
    """Run the bench over `config.models`.

    Returns:
        The results dict (checked by `lrdaccel.bench.schema.check_results`).

    On CUDA, cuDNN picks its conv algorithms by timing them (`torch.backends.cudnn.benchmark`,
    as GPU training scripts set it), for the original and the decomposed shapes alike; the flag is
    restored afterwards and recorded in the results' machine section.

    Raises:
        ValueError: a bad configuration (unknown model, device, ratio).
    """
    on_gpu = torch.device(config.device).type == "cuda"
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = saved or on_gpu
    try:
        results = results_header(BENCH_FORMAT, asdict(config), config.device)
        results["models"], results["best"] = [], []
        for name in tqdm(config.models, desc="models", unit="model", disable=not progress):
            measured = bench_model(name, config, progress)
            results["models"] += measured["entries"]
            if measured["best"] is not None:
                results["best"].append(measured["best"])
    finally:
        torch.backends.cudnn.benchmark = saved
    record_end_load(results)
    return results


def paper_staircase(out_dir: str | Path, config: BenchConfig, ranks=STAIRCASE_RANKS) -> dict[str, Path]:
    """Paper B's Fig. 2 measured here: a [512,512,3,3] conv under Tucker-2 at ranks 242..270 on
    a 7x7 input; writes staircase.png and staircase.json into `out_dir`."""
    placement = config.placement
    conv = nn.Conv2d(STAIRCASE_CHANNELS, STAIRCASE_CHANNELS, 3, padding=1, bias=False)
    staircase = measure_staircase(
        conv, (config.batch_size, STAIRCASE_CHANNELS, STAIRCASE_SIDE, STAIRCASE_SIDE), list(ranks),
        config.objective, device=placement.device, dtype="bfloat16" if placement.autocast_bf16 else None,
        memory_format="channels_last" if placement.channels_last else "contiguous", cache=config.cache)
    return write_staircase(staircase, out_dir)
