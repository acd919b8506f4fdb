"""The paper's table, measured side by side: original, LRD, LRD + rank optimization, LRD + sequential
freezing, LRD + both, LRD + static freezing; parameters, MACs, inference and training throughput,
each as a ratio to the original.

Weights are random and decomposed layers are built at the planned shapes without factorizing
(`LayerClass.like`): speed depends on shapes, dtype and memory format, not on values, and
factorizing ResNet-152 would cost minutes for nothing. Freezing does not change the inference
graph, so freezing rows reuse the inference measurement of the model they freeze.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lrdaccel import zoo
from lrdaccel._settings import check_choice, check_int, check_number
from lrdaccel.bench.schema import BENCH_FORMAT, record_end_load, results_header
from lrdaccel.bench.workloads import training_phases
from lrdaccel.factorize.ranks import check_ratio
from lrdaccel.layers import LowRankModule
from lrdaccel.measure.counting import count_macs, count_params
from lrdaccel.measure.profiling import top_operators
from lrdaccel.measure.steps import Placement, inference_phase
from lrdaccel.measure.timer import OBJECTIVES, Workload, measure_interleaved, ratio_to_baseline, spread
from lrdaccel.planning import Plan
from lrdaccel.planning import plan as make_plan
from lrdaccel.rankopt import measure_staircase, optimize_ranks
from lrdaccel.rankopt.staircase import write_staircase
from lrdaccel.surgery import build_modules, swap_modules

FULL_MODELS = ("resnet50", "resnet101", "resnet152", "vit-b16")
QUICK_MODELS = ("resnet-mini", "vit-tiny")
QUICK_SETTINGS = {"models": list(QUICK_MODELS), "batch_size": 2, "min_run_time": 0.05, "rank_budget_s": 2.0,
                  "rank_min_run_time": 0.05, "quick": True}
# Paper B's Fig. 2: a [512,512,3,3] conv under Tucker-2 at ranks 242..270; at ResNet-50's last
# stage it sees 512 channels at 7x7.
STAIRCASE_RANKS = range(242, 271)
STAIRCASE_CHANNELS, STAIRCASE_SIDE = 512, 7


@dataclass(frozen=True)
class Variant:
    """One row of the table.

    Attributes:
        key: short id used in the results JSON.
        label: what the table shows.
        plan: None for the original, "ratio" or "optimized".
        schedule: SequentialFreezer schedule while training, None for no freezing.
        infer_as: the row whose inference measurement this one shares (same inference graph).
    """

    key: str
    label: str
    plan: str | None = None
    schedule: str | None = None
    infer_as: str | None = None


VARIANTS = (
    Variant("original", "original"),
    Variant("lrd", "LRD (ratio ranks)", plan="ratio"),
    Variant("lrd_opt", "LRD + rank optimization", plan="optimized"),
    Variant("lrd_seq", "LRD + sequential freezing", plan="ratio", schedule="rotate", infer_as="lrd"),
    Variant("lrd_both", "LRD + both", plan="optimized", schedule="rotate", infer_as="lrd_opt"),
    Variant("lrd_static", "LRD + static freezing", plan="ratio", schedule="static", infer_as="lrd"),
)


@dataclass
class BenchConfig:
    """What `run_bench` measures.

    Attributes:
        models: zoo names.
        ratio: per-layer compression ratio (> 1).
        batch_size: batch of every timed step (>= 1).
        repeats: interleaved measurements per step (>= 1; the table's min/median/max are over these).
        warmup: untimed calls per step before measuring (>= 0).
        min_run_time: seconds one measurement lasts at least (fast steps are repeated).
        objective: what rank optimization times per layer: "infer" (forward, as Paper B's
            Algorithm 1) or "train" (forward + backward).
        device: the torch device to run on, e.g. cpu, cuda.
        autocast_bf16: run under bf16 autocast (None: on for cuda, off elsewhere).
        channels_last: channels_last memory format for conv models (None: on for cuda, off elsewhere).
        timing_cache: rank optimization's timing cache: None for its default file, "none" for
            no file, or a path.
        rank_budget_s: seconds rank optimization may spend timing each distinct layer.
        rank_min_run_time: seconds of repeated calls per layer timing in the rank search.
        profile: record the top operators of one inference and one training cycle of the
            original and of "LRD + both" (torch.profiler), to explain the ratios.
        quick: a fast look; recorded in the results.
    """

    models: list[str] = field(default_factory=lambda: list(FULL_MODELS))
    ratio: float = 2.0
    batch_size: int = 16
    repeats: int = 5
    warmup: int = 1
    min_run_time: float = 0.2
    objective: str = "infer"
    device: str = "cpu"
    autocast_bf16: bool | None = None
    channels_last: bool | None = None
    timing_cache: str | None = None
    rank_budget_s: float = 20.0
    rank_min_run_time: float = 0.2
    profile: bool = True
    quick: bool = False

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models: give at least one zoo model")
        for name in self.models:
            zoo.get(name)  # raises ValueError naming the unknown model
        check_int("batch_size", self.batch_size, 1)
        check_int("repeats", self.repeats, 1)
        check_int("warmup", self.warmup, 0)
        check_ratio(self.ratio)
        check_number("min_run_time", self.min_run_time, at_least=0)
        check_number("rank_budget_s", self.rank_budget_s, above=0)
        check_number("rank_min_run_time", self.rank_min_run_time, above=0)
        check_choice("objective", self.objective, OBJECTIVES)
        placement = Placement.default_for(self.device, self.autocast_bf16, self.channels_last)  # checks the device
        self.autocast_bf16, self.channels_last = placement.autocast_bf16, placement.channels_last

    @classmethod
    def quick_config(cls, **overrides) -> "BenchConfig":
        """A fast look: small models, tiny batch, short measurements; `overrides` still apply."""
        return cls(**{**QUICK_SETTINGS, **overrides})

    @property
    def placement(self) -> Placement:
        return Placement(self.device, self.autocast_bf16, self.channels_last)

    @property
    def cache(self):
        """The `cache=` argument of `optimize_ranks`."""
        return timing_cache_arg(self.timing_cache)


def timing_cache_arg(value: str | None):
    """--timing-cache as optimize_ranks takes it: None (default file), False ("none"), or a path."""
    if value is None:
        return None
    return False if value == "none" else value


def structural_copy(model: nn.Module, plan: Plan, placement: Placement) -> nn.Module:
    """A copy of `model` with the plan's layers replaced by low-rank layers of the planned shapes."""
    copied = copy.deepcopy(model)
    swap_modules(copied, build_modules(copied, plan, factorize=False))
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
    """Measure every variant of one zoo model; the `models[i]` entry of the results."""
    placement = config.placement
    spec = zoo.get(name)
    torch.manual_seed(0)
    original = placement.place_model(spec.build())
    inputs = placement.place_inputs(spec.example_inputs(config.batch_size))

    ratio_plan = make_plan(original, ratio=config.ratio)
    start = time.perf_counter()
    optimized_plan = optimize_ranks(
        original, ratio_plan, inputs, objective=config.objective, device=placement.device,
        dtype=torch.bfloat16 if placement.autocast_bf16 else None, cache=config.cache,
        budget_s=config.rank_budget_s, min_run_time=config.rank_min_run_time, progress=progress)
    optimize_seconds = time.perf_counter() - start
    plans = {"ratio": ratio_plan, "optimized": optimized_plan}

    models: dict[str, nn.Module] = {}
    for variant in VARIANTS:
        if variant.plan is None:
            models[variant.key] = original
        elif variant.schedule is None:
            models[variant.key] = structural_copy(original, plans[variant.plan], placement)
        else:
            # Freezing changes requires_grad, so each freezing row trains its own copy.
            base = next(v.key for v in VARIANTS if v.plan == variant.plan and v.schedule is None)
            models[variant.key] = copy.deepcopy(models[base])

    notes, schedules = [], {}
    for variant in VARIANTS:
        schedules[variant.key] = variant.schedule
        if variant.schedule and not any(isinstance(m, LowRankModule) for m in models[variant.key].modules()):
            schedules[variant.key] = None
            notes.append(f"{variant.label}: the {variant.plan} plan decomposes no layer, so there is nothing to "
                         f"freeze; it trains like the model it would freeze")
    infer = [Workload(v.key, [inference_phase(models[v.key], inputs, placement)]) for v in VARIANTS if not v.infer_as]
    train = [Workload(v.key, training_phases(models[v.key], inputs, placement, schedules[v.key])) for v in VARIANTS]
    trainable = {w.name: _trainable_per_phase(models[w.name], w) for w in train}

    infer_timings = measure_interleaved(infer, config.repeats, config.warmup, config.min_run_time, progress)
    train_timings = measure_interleaved(train, config.repeats, config.warmup, config.min_run_time, progress)

    base_params, base_macs = count_params(original), count_macs(original, inputs)
    rows = []
    for variant in VARIANTS:
        model = models[variant.key]
        infer_key = variant.infer_as or variant.key
        params, macs = count_params(model), count_macs(model, inputs)
        rows.append({
            "variant": variant.key,
            "label": variant.label,
            "plan": variant.plan,
            "schedule": schedules[variant.key],
            "params": params,
            "macs": macs,
            "params_ratio": params / base_params,
            "macs_ratio": macs / base_macs,
            "infer_ratio": ratio_to_baseline(infer_timings, infer_key, "original"),
            "train_ratio": ratio_to_baseline(train_timings, variant.key, "original"),
            "infer_items_per_s": spread([config.batch_size / s for s in infer_timings.seconds[infer_key]]),
            "train_items_per_s": spread([config.batch_size / s for s in train_timings.seconds[variant.key]]),
            "infer_measured_as": infer_key,
            "train_phases": len(train_timings.per_phase[variant.key][0]),
            "train_phase_seconds": train_timings.per_phase[variant.key],
            "trainable_params": spread(trainable[variant.key]),
        })
    profiles = {}
    if config.profile:
        infer_phases = {w.name: w.phases for w in infer}
        train_phases = {w.name: w.phases for w in train}
        infer_as = {v.key: v.infer_as or v.key for v in VARIANTS}
        profiles = {key: {"infer": top_operators(infer_phases[infer_as[key]], placement.device),
                          "train": top_operators(train_phases[key], placement.device)}
                    for key in ("original", "lrd_both")}
    return {
        "name": name,
        "description": spec.description,
        "input_shape": list(spec.input_shape),
        "batch_size": config.batch_size,
        "plans": {
            "ratio": _plan_summary(ratio_plan, ratio_plan),
            "optimized": _plan_summary(optimized_plan, ratio_plan, optimize_seconds),
        },
        "rows": rows,
        "optimized_layers": [_layer_row(row, base) for row, base in zip(optimized_plan, ratio_plan) if base.decomposed],
        "profile": profiles,
        "notes": notes,
    }


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

    Raises:
        ValueError: a bad configuration (unknown model, device, ratio).
    """
    results = results_header(BENCH_FORMAT, asdict(config), config.device)
    results["models"] = []
    for name in tqdm(config.models, desc="models", unit="model", disable=not progress):
        results["models"].append(bench_model(name, config, progress))
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
