"""Did the per-layer rank choices pay off for the whole model? Time whole models side by side.

Layer times add up imperfectly (caches, memory traffic, the layers that were not touched), so
after a search the models are compared whole: the original and one decomposed model per plan,
each timed in turn within every round by `lrdaccel.measure.measure_interleaved` (the order
reversing each round so slow drift in a shared machine's load falls on all alike), and speed-ups
taken round by round against the original, all under one runtime (eager, compiled, or exported to
ONNX Runtime: a ratio is only meaningful within one). Decomposed copies are built with `like`
shapes (no SVD) and the execution forms their plan chose; the user's model is not touched. A
training step is a full SGD step (forward, backward, update), as in the bench.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from lrdaccel._modules import describe_inputs, model_device, model_dtype, move_inputs, unwrap
from lrdaccel._settings import check_choice, check_int, parse_device, parse_dtype
from lrdaccel.measure.runtimes import check_runtime, runtime_label
from lrdaccel.measure.steps import Placement, inference_phase, training_phase
from lrdaccel.measure.timer import OBJECTIVES, Workload, measure_interleaved
from lrdaccel.planning import Plan
from lrdaccel.planning.forms import apply_forms
from lrdaccel.decomposition.build import build_modules, swap_modules
from lrdaccel.decomposition.narrow_build import set_head_size

ORIGINAL = "original"


@dataclass
class EndToEndReport:
    """Per-round whole-model times (ms) for each variant, the original first.

    Attributes:
        objective: "infer" or "train".
        batch: a description of the example inputs.
        times_ms: variant name -> one median time per round.
        runtime: what every variant ran in ("eager", "compile", "compile max-autotune", "onnxruntime").
    """

    objective: str
    batch: str
    times_ms: dict[str, list[float]] = field(default_factory=dict)
    runtime: str = "eager"

    def speedups(self, name: str) -> list[float]:
        """original time / variant time, per round (> 1: the variant is faster)."""
        return [o / v for o, v in zip(self.times_ms[ORIGINAL], self.times_ms[name])]

    def summary(self) -> dict[str, dict[str, float]]:
        """Per variant: min/median/max of its time (ms) and of its speed-up over the original."""
        out = {}
        for name, times in self.times_ms.items():
            ups = self.speedups(name)
            out[name] = {
                "ms_min": min(times), "ms_median": statistics.median(times), "ms_max": max(times),
                "speedup_min": min(ups), "speedup_median": statistics.median(ups), "speedup_max": max(ups),
            }
        return out

    def __str__(self) -> str:
        rounds = len(self.times_ms[ORIGINAL])
        lines = [f"whole model, {self.objective}, runtime {self.runtime}, {self.batch}, {rounds} interleaved rounds",
                 f"{'variant':<16} {'ms min/median/max':>26} {'speed-up vs original min/median/max':>38}"]
        for name, s in self.summary().items():
            times = f"{s['ms_min']:.1f} / {s['ms_median']:.1f} / {s['ms_max']:.1f}"
            ups = f"{s['speedup_min']:.3f} / {s['speedup_median']:.3f} / {s['speedup_max']:.3f}"
            lines.append(f"{name:<16} {times:>26} {ups:>38}")
        return "\n".join(lines)


def compare_end_to_end(
    model: nn.Module,
    plans: Mapping[str, Plan],
    example_inputs: Any,
    objective: str = "infer",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    rounds: int = 5,
    min_run_time: float = 0.5,
    runtime: str = "eager",
    compile_mode: str = "default",
    autocast_bf16: bool = False,
) -> EndToEndReport:
    """Time the original model and one decomposed copy per plan, interleaved round by round.

    Args:
        model: the original model (not changed).
        plans: name -> plan, e.g. {"ratio ranks": plan, "optimized": optimized_plan}.
        example_inputs: a tensor, tuple or dict for the model.
        objective: "infer" (eval mode, inference mode) or "train" (train mode, forward, backward
            of the sum of the first output tensor, gradients reset every step).
        device, dtype: where and in what precision (default: the model's own).
        rounds: how many times each variant is timed; each time is a blocked_autorange median.
        min_run_time: seconds of calls per variant per round.
        runtime: "eager", "compile" (each variant compiled, once, before timing) or
            "onnxruntime" (each exported; inference only).
        compile_mode: torch.compile's mode under "compile" (e.g. "max-autotune", "reduce-overhead").
        autocast_bf16: run every variant under bfloat16 autocast (as a GPU model usually runs).

    Returns:
        An EndToEndReport (times per round; summary() for min/median/max and speed-ups).

    Raises:
        ValueError: a bad objective or runtime, rounds < 1, a variant named "original", or a
            plan that does not fit the model.
    """
    check_choice("objective", objective, OBJECTIVES)
    device = parse_device(device) if device is not None else None
    check_runtime(runtime, objective, device if device is not None else model_device(unwrap(model)))
    check_int("rounds", rounds, 1)
    if ORIGINAL in plans:
        raise ValueError(f"plans: the name {ORIGINAL!r} is reserved for the undecomposed model")
    model = unwrap(model)
    dtype = None if dtype is None else parse_dtype(dtype)
    variants = {ORIGINAL: _prepared(copy.deepcopy(model), objective, device, dtype)}
    for name, plan in plans.items():
        variant = copy.deepcopy(model)
        swap_modules(variant, build_modules(variant, plan, factorize=False))
        for row in plan.narrowed:  # narrowed attention runs at its new head size, as decompose leaves it
            set_head_size(variant, row)
        apply_forms(variant, plan)
        variants[name] = _prepared(variant, objective, device, dtype)
    reference = variants[ORIGINAL]
    inputs = move_inputs(example_inputs, model_device(reference), model_dtype(reference))
    placement = Placement(str(model_device(reference)), autocast_bf16, runtime=runtime, compile_mode=compile_mode)
    phase = inference_phase if objective == "infer" else training_phase
    workloads = [Workload(name, [phase(variant, inputs, placement)]) for name, variant in variants.items()]
    timings = measure_interleaved(workloads, rounds, warmup=1, min_run_time=min_run_time, alternate=True)
    times_ms = {name: [s * 1e3 for s in seconds] for name, seconds in timings.seconds.items()}
    label = runtime_label(runtime, compile_mode) if runtime == "compile" else runtime
    return EndToEndReport(objective, describe_inputs(example_inputs), times_ms, label)


def _prepared(model: nn.Module, objective: str, device, dtype) -> nn.Module:
    model.to(device=device, dtype=dtype)
    if objective == "train":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    return model
