"""Time one layer alone, original or decomposed at a rank, on the input it sees in the model.

Timing uses torch.utils.benchmark (it synchronises CUDA, runs blocks of calls, and reports the
median), after an explicit warm-up so one-off costs (allocator, cuDNN autotuning) stay out.
`infer` is one forward under inference mode; `train` is forward plus backward with the input
requiring a gradient and every weight trainable, as for a layer inside a network being fine-tuned.
Candidates are built with `LayerClass.like` (right shapes, no SVD): values do not change speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lrdaccel._settings import check_int, check_number
from lrdaccel.factorize.ranks import Rank
from lrdaccel.layers import entry_for
from lrdaccel.layers.svd import dense_linear_weight
from lrdaccel.measure.timer import median_seconds
from lrdaccel.rankopt.capture import InputSpec


@dataclass(frozen=True, eq=False)
class TimingJob:
    """One thing to time: `dense` itself when `rank` is None, else its decomposition at `rank`.

    Attributes:
        dense: the original layer, already on `device` and in `dtype`.
        kind: "svd" or "tucker2" (how `rank` is read).
        rank: None for the original layer; an int (SVD) or (rank_in, rank_out) (Tucker-2).
        input: the layer's input as captured in the model (shape and memory format are used).
        objective: "infer" or "train".
        device, dtype: where and in what precision to time.
    """

    dense: nn.Module
    kind: str
    rank: Rank
    input: InputSpec
    objective: str
    device: torch.device
    dtype: torch.dtype

    def build(self) -> nn.Module:
        """The module to time, in the mode and memory format of the objective and input."""
        module = self.dense if self.rank is None else entry_for(self.dense).layer_class.like(self.dense, self.rank)
        module.train(self.objective == "train")
        if self.objective == "train":
            for parameter in module.parameters():
                parameter.requires_grad_(True)
        if self.input.memory_format == "channels_last":
            module = module.to(memory_format=torch.channels_last)
        return module

    def make_input(self) -> torch.Tensor:
        x = torch.randn(self.input.shape, device=self.device, dtype=self.dtype)
        if self.input.memory_format == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        return x.requires_grad_(self.objective == "train")


Timer = Callable[[TimingJob], float]
"""Anything that maps a TimingJob to milliseconds; BenchmarkTimer is the real one, tests inject fakes."""


class BenchmarkTimer:
    """The real timer: the median of torch.utils.benchmark's blocked_autorange, in milliseconds.

    Args:
        min_run_time: seconds of repeated calls per measurement (more: steadier, slower search).
        warmup: calls before measuring (blocked_autorange's block-size estimate warms up too).
    """

    def __init__(self, min_run_time: float = 0.2, warmup: int = 1):
        check_number("min_run_time", min_run_time, above=0)
        check_int("warmup", warmup, 0)
        self.min_run_time, self.warmup = min_run_time, warmup

    def __call__(self, job: TimingJob) -> float:
        module, x = job.build(), job.make_input()
        step = train_step(module, x) if job.objective == "train" else (lambda: module(x))
        return measure_ms(step, self.min_run_time, self.warmup, inference=job.objective == "infer")


def train_step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """Forward + backward to the input and every weight, without accumulating into .grad."""
    params = [p for p in module.parameters() if p.requires_grad]
    grad_out = torch.randn_like(module(x))

    def step() -> None:
        torch.autograd.grad(module(x), [x, *params], grad_out)

    return step


def measure_ms(fn: Callable[[], object], min_run_time: float, warmup: int = 1, inference: bool = False) -> float:
    """Median milliseconds of `fn()` after `warmup` calls, under inference mode if asked."""
    with torch.inference_mode() if inference else torch.enable_grad():
        return median_seconds(fn, min_run_time, warmup) * 1e3


def layer_signature(dense: nn.Module) -> str:
    """Everything about a dense layer that its speed depends on, except the input and rank."""
    if isinstance(dense, nn.Conv2d):
        weight = "x".join(str(d) for d in dense.weight.shape)
        return (f"Conv2d {weight} stride={tuple(dense.stride)} padding={dense.padding} "
                f"dilation={tuple(dense.dilation)} {dense.padding_mode} bias={dense.bias is not None}")
    out_features, in_features = dense_linear_weight(dense).shape
    return f"{type(dense).__name__} {out_features}x{in_features} bias={dense.bias is not None}"


def input_signature(spec: InputSpec) -> str:
    return f"input {'x'.join(str(d) for d in spec.shape)} {spec.memory_format}"
