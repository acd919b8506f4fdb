"""Did the per-layer rank choices pay off for the whole model? Time whole models side by side.

Layer times add up imperfectly (caches, memory traffic, the layers that were not touched), so
after a search the models are compared whole: the original and one decomposed model per plan,
each timed in turn within every round (the order reversing each round so slow drift in a shared
machine's load falls on all alike), and speed-ups taken round by round against the original.
Decomposed copies are built with `like` shapes (no SVD); the user's model is not touched.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from lrdaccel._modules import unwrap
from lrdaccel.plan import Plan
from lrdaccel.rankopt.timing import OBJECTIVES, measure_ms, parse_dtype
from lrdaccel.surgery import build_modules, call_model, swap_modules

ORIGINAL = "original"


@dataclass
class EndToEndReport:
    """Per-round whole-model times (ms) for each variant, the original first.

    Attributes:
        objective: "infer" or "train".
        batch: a description of the example inputs.
        times_ms: variant name -> one median time per round.
    """

    objective: str
    batch: str
    times_ms: dict[str, list[float]] = field(default_factory=dict)

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
        lines = [f"whole model, {self.objective}, {self.batch}, {rounds} interleaved rounds",
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

    Returns:
        An EndToEndReport (times per round; summary() for min/median/max and speed-ups).

    Raises:
        ValueError: a bad objective, rounds < 1, a variant named "original", or a plan that does
            not fit the model.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if ORIGINAL in plans:
        raise ValueError(f"plans: the name {ORIGINAL!r} is reserved for the undecomposed model")
    model = unwrap(model)
    dtype = None if dtype is None else parse_dtype(dtype)
    variants = {ORIGINAL: _prepared(copy.deepcopy(model), objective, device, dtype)}
    for name, plan in plans.items():
        variant = copy.deepcopy(model)
        swap_modules(variant, build_modules(variant, plan, factorize=False))
        variants[name] = _prepared(variant, objective, device, dtype)
    reference = variants[ORIGINAL]
    first = next(reference.parameters(), None)
    inputs = _moved(example_inputs, first.device if first is not None else None,
                    first.dtype if first is not None else None)
    steps = {name: _step(variant, inputs, objective) for name, variant in variants.items()}
    report = EndToEndReport(objective, _describe(example_inputs), {name: [] for name in variants})
    order = list(variants)
    for round_index in range(rounds):
        for name in order if round_index % 2 == 0 else reversed(order):
            warmup = 1 if round_index == 0 else 0  # blocked_autorange's block-size estimate warms up too
            report.times_ms[name].append(measure_ms(steps[name], min_run_time, warmup, objective == "infer"))
    return report


def _prepared(model: nn.Module, objective: str, device, dtype) -> nn.Module:
    model.to(device=device, dtype=dtype)
    model.train(objective == "train")
    if objective == "train":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    return model


def _step(model: nn.Module, inputs: Any, objective: str):
    if objective == "infer":
        return lambda: call_model(model, inputs)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        _first_tensor(call_model(model, inputs)).float().sum().backward()

    return train_step


def _first_tensor(output: Any) -> torch.Tensor:
    """The first tensor in a model output (a tensor, a tuple, or a dict / HF ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError(f"the model returned {type(output).__name__} with no tensor to back-propagate from")


def _moved(inputs: Any, device, dtype) -> Any:
    """Inputs on the model's device; floating tensors in the model's dtype."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device=device, dtype=dtype if inputs.is_floating_point() else None)
    if isinstance(inputs, Mapping):
        return {k: _moved(v, device, dtype) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_moved(v, device, dtype) for v in inputs)
    return inputs


def _describe(inputs: Any) -> str:
    if isinstance(inputs, torch.Tensor):
        return "input " + "x".join(str(d) for d in inputs.shape)
    if isinstance(inputs, Mapping):
        return ", ".join(f"{k} {'x'.join(str(d) for d in v.shape)}" for k, v in inputs.items()
                         if isinstance(v, torch.Tensor))
    if isinstance(inputs, (tuple, list)):
        return ", ".join(_describe(v) for v in inputs)
    return type(inputs).__name__
