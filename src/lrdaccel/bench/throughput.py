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
import datetime
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

import lrdaccel as lrd
from lrdaccel import zoo
from lrdaccel.bench.counting import count_macs, count_params
from lrdaccel.bench.profiling import top_operators
from lrdaccel.bench.schema import BENCH_FORMAT, RESULTS_VERSION
from lrdaccel.bench.timing import Workload, measure_interleaved, ratio_to_baseline, spread
from lrdaccel.bench.workloads import Runtime, inference_phase, training_phases
from lrdaccel.layers import LowRankModule
from lrdaccel.plan import Plan
from lrdaccel.rankopt import BenchmarkTimer
from lrdaccel.rankopt.cache import device_name
from lrdaccel.surgery import build_modules, swap_modules

FULL_MODELS = ("resnet50", "resnet101", "resnet152", "vit-b16")
QUICK_MODELS = ("resnet-mini", "vit-tiny")
OBJECTIVES = ("infer", "train")


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
        device / autocast_bf16 / channels_last: where and how to run (see `Runtime`).
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
    autocast_bf16: bool = False
    channels_last: bool = False
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
        for what, value, low in (("batch_size", self.batch_size, 1), ("repeats", self.repeats, 1),
                                 ("warmup", self.warmup, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{what} must be an int >= {low}, got {value!r}")
        if not isinstance(self.ratio, (int, float)) or not self.ratio > 1:
            raise ValueError(f"ratio must be a number > 1, got {self.ratio!r}")
        if not self.min_run_time >= 0:
            raise ValueError(f"min_run_time must be >= 0 seconds, got {self.min_run_time!r}")
        for what in ("rank_budget_s", "rank_min_run_time"):
            if not getattr(self, what) > 0:
                raise ValueError(f"{what} must be > 0 seconds, got {getattr(self, what)!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        self.runtime  # validates the device

    @property
    def runtime(self) -> Runtime:
        return Runtime(self.device, self.autocast_bf16, self.channels_last)

    @property
    def cache(self):
        """The `cache=` argument of `optimize_ranks`."""
        return timing_cache_arg(self.timing_cache)


def timing_cache_arg(value: str | None):
    """--timing-cache as optimize_ranks takes it: None (default file), False ("none"), or a path."""
    if value is None:
        return None
    return False if value == "none" else value


def machine_info(runtime: Runtime) -> dict:
    """Where the numbers come from: CPU, threads, accelerator, library versions."""
    device = torch.device(runtime.device)
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    info["device_name"] = device_name(device)
    if hasattr(os, "getloadavg"):  # other work on the machine skews throughput: record how busy it was
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    return info


def results_header(kind: str, config: dict, runtime: Runtime) -> dict:
    """The fields every results file starts with."""
    return {
        "format": kind,
        "version": RESULTS_VERSION,
        "lrdaccel_version": lrd.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(runtime),
        "config": config,
    }


def structural_copy(model: nn.Module, plan: Plan, runtime: Runtime) -> nn.Module:
    """A copy of `model` with the plan's layers replaced by low-rank layers of the planned shapes."""
    copied = copy.deepcopy(model)
    swap_modules(copied, build_modules(copied, plan, factorize=False))
    return runtime.place_model(copied)


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
    runtime = config.runtime
    spec = zoo.get(name)
    torch.manual_seed(0)
    original = runtime.place_model(spec.build())
    inputs = runtime.place_inputs(spec.example_inputs(config.batch_size))

    ratio_plan = lrd.plan(original, ratio=config.ratio)
    start = time.perf_counter()
    optimized_plan = lrd.optimize_ranks(
        original, ratio_plan, inputs, objective=config.objective, device=runtime.device,
        dtype=torch.bfloat16 if runtime.autocast_bf16 else None, cache=config.cache,
        budget_s=config.rank_budget_s, timer=BenchmarkTimer(min_run_time=config.rank_min_run_time),
        progress=progress)
    optimize_seconds = time.perf_counter() - start
    plans = {"ratio": ratio_plan, "optimized": optimized_plan}

    models: dict[str, nn.Module] = {}
    for variant in VARIANTS:
        if variant.plan is None:
            models[variant.key] = original
        elif variant.schedule is None:
            models[variant.key] = structural_copy(original, plans[variant.plan], runtime)
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
    infer = [Workload(v.key, [inference_phase(models[v.key], inputs, runtime)]) for v in VARIANTS if not v.infer_as]
    train = [Workload(v.key, training_phases(models[v.key], inputs, runtime, schedules[v.key])) for v in VARIANTS]
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
        profiles = {key: {"infer": top_operators(infer_phases[infer_as[key]], runtime.device),
                          "train": top_operators(train_phases[key], runtime.device)}
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
    results = results_header(BENCH_FORMAT, asdict(config), config.runtime)
    results["models"] = []
    for name in tqdm(config.models, desc="models", unit="model", disable=not progress):
        results["models"].append(bench_model(name, config, progress))
    record_end_load(results)
    return results


def record_end_load(results: dict) -> None:
    """Add the machine's load average at the end of the run next to the one at the start."""
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
