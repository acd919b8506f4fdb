"""What `form="auto"` weighs: each form's time on this runtime and its output error on calibration data.

Times: every layer of a unit (one layer, or a narrowable pair with its co-producers) is timed alone
on the input shape one forward of the example inputs feeds it, in each form: as it is, factorized at
its plan row's rank (`LayerClass.like`, as rank optimization times it: values do not change speed),
or narrowed (a plain layer of its class with the kept width as outputs, or as inputs for the
consumer, whose input shrinks with it). A unit's time is the sum over its layers. What lies between
producer and consumer (the activation, BatchNorms, depthwise convs, the attention kernel) is not
timed: it shrinks with a narrowed width, so the sum slightly understates what narrowing saves.
Identical (module, input shape) pairs are timed once.

Errors (relative output error on the calibration batches, 0 for a kept layer; the statistics of
every layer come from one pass over the batches):
- factorized layer: sqrt of the whitened truncation loss over the output energy at its rank
  (`planning.sensitivity.truncation_loss`: exact for SVD, the HOSVD bound for Tucker-2);
- narrowed pair: the consumer's relative output error after the channel selection and ridge refit
  `lrd.decompose` performs (`factorize.narrow`), on the activations of the original model;
- narrowed attention: per head, the tail of the whitened singular values of the query/key bilinear
  form and of the value/output product (`factorize.heads` truncates exactly these);
- several layers together: the root sum of squares of their errors (first order, errors of
  different stages taken as independent).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from lrdaccel._modules import call_model, kept_modes
from lrdaccel.calibration.passes import hooked
from lrdaccel.calibration.statistics import InputStats
from lrdaccel.factorize.narrow import refit_consumer, relative_output_error, select_channels
from lrdaccel.factorize.whiten import whitening_factor
from lrdaccel.layers import entry_for
from lrdaccel.layers.svd import dense_linear_weight
from lrdaccel.measure.timer import median_seconds
from lrdaccel.planning.rows import LayerPlan

LayerTimer = Callable[[nn.Module, tuple], float]
"""timer(module, input_shape) -> ms of one forward; the default is `BenchmarkLayerTimer`."""


class BenchmarkLayerTimer:
    """The median of torch.utils.benchmark's blocked_autorange over inference forwards, in ms, on a
    random input of the shape (in the module's device and dtype), after one warm-up call."""

    def __init__(self, min_run_time: float = 0.05):
        self.min_run_time = min_run_time

    def __call__(self, module: nn.Module, shape: tuple) -> float:
        weight = next(module.parameters())
        x = torch.randn(shape, device=weight.device, dtype=weight.dtype)
        module.eval()
        with torch.inference_mode():
            return median_seconds(lambda: module(x), self.min_run_time, warmup=1) * 1e3


class UnitTimes:
    """Sums of per-layer times, each distinct (module, input shape) measured once."""

    def __init__(self, timer: LayerTimer):
        self.timer, self.seen, self.timed = timer, {}, 0

    def __call__(self, modules: list[tuple[nn.Module, tuple]]) -> float:
        total = 0.0
        for module, shape in modules:
            key = (repr(module), tuple((n, tuple(p.shape)) for n, p in module.named_parameters()), shape)
            if key not in self.seen:
                ms = float(self.timer(module, shape))
                if not (math.isfinite(ms) and ms > 0):
                    raise ValueError(f"the timer gave {ms!r} ms for a {type(module).__name__} on input {shape}; a "
                                     f"time must be a finite number of milliseconds > 0")
                self.seen[key] = ms
                self.timed += 1
            total += self.seen[key]
        return total


@torch.no_grad()
def input_shapes(model: nn.Module, names: list[str], example_inputs: Any) -> dict[str, tuple]:
    """The shape of each named layer's first input on one eval forward of `example_inputs`
    (a layer the inputs do not reach is absent)."""
    shapes = {}

    def recorder(name: str, _module: nn.Module):
        def hook(_module, args, _kwargs) -> None:
            if name not in shapes and args and isinstance(args[0], torch.Tensor):
                shapes[name] = tuple(args[0].shape)
        return hook

    with hooked({name: model.get_submodule(name) for name in names}, recorder), kept_modes(model):
        model.eval()
        call_model(model, example_inputs)
    return shapes


def factorized(module: nn.Module, row: LayerPlan) -> nn.Module:
    """The layer as its factor-plan row has it: factorized at the row's rank, or itself if kept."""
    return entry_for(module).layer_class.like(module, row.rank) if row.decomposed else module


def resized(module: nn.Module, out: int | None = None, into: int | None = None) -> nn.Module:
    """A plain layer like `module` (Conv2d or Linear; an HF Conv1D is timed as the Linear it
    computes) with `out` outputs or `into` inputs."""
    bias = module.bias is not None
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d(into or module.in_channels, out or module.out_channels, module.kernel_size, module.stride,
                         module.padding, module.dilation, 1, bias, module.padding_mode,
                         device=module.weight.device, dtype=module.weight.dtype)
    out_features, in_features = dense_linear_weight(module).shape
    return nn.Linear(into or in_features, out or out_features, bias=bias, device=module.weight.device,
                     dtype=module.weight.dtype)


def narrowed_shape(module: nn.Module, shape: tuple, width: int) -> tuple:
    """The consumer's input shape with its channels cut to `width` (dim 1 of a conv, else last)."""
    channel = 1 if isinstance(module, nn.Conv2d) else len(shape) - 1
    return shape[:channel] + (width,) + shape[channel + 1:]


def _weight(module: nn.Module) -> torch.Tensor:
    return module.weight if isinstance(module, nn.Conv2d) else dense_linear_weight(module)


@torch.no_grad()
def narrow_error(consumer: nn.Module, stats: InputStats, width: int, selection: str = "qr") -> float:
    """The consumer's relative output error after keeping `width` channels and refitting, as
    `lrd.decompose` narrows it (`decomposition.narrow_build.fill_narrowed`)."""
    weight = _weight(consumer).detach().double()
    bias = None if consumer.bias is None else consumer.bias.detach().double()
    gram = _augmented(stats) if bias is not None else stats.covariance()
    readout = weight.movedim(1, -1).reshape(-1, weight.shape[1])
    kept = select_channels(gram, width, selection, weight=readout, constant=bias is not None)
    new_weight, new_bias = refit_consumer(weight, bias, gram, kept)
    return relative_output_error(weight, bias, gram, kept, new_weight, new_bias)


@torch.no_grad()
def head_error(query: nn.Module, key: nn.Module, value: nn.Module, output: nn.Module, stats: InputStats,
               heads: int, rank: int) -> float:
    """Relative error of an attention's heads kept at `rank` dimensions each: the root sum of squares
    of the query/key bilinear form's and the value/output product's whitened truncation errors."""
    def with_bias(layer: nn.Module) -> torch.Tensor:
        w = _weight(layer).detach().double()
        b = layer.bias.detach().double() if layer.bias is not None else w.new_zeros(w.shape[0])
        return torch.cat([w, b[:, None]], 1)

    root_aug = whitening_factor(_augmented(stats))
    root = whitening_factor(stats.covariance())
    q, k = with_bias(query), with_bias(key)
    v, o = _weight(value).detach().double(), _weight(output).detach().double()
    d = v.shape[0] // heads
    tails = {"qk": [0.0, 0.0], "vo": [0.0, 0.0]}
    for h in range(heads):
        rows = slice(h * d, (h + 1) * d)
        for what, matrix in (("qk", root_aug.T @ q[rows].T @ k[rows] @ root_aug), ("vo", o[:, rows] @ v[rows] @ root)):
            energy = torch.linalg.svdvals(matrix).square()
            tails[what][0] += float(energy[rank:].sum())
            tails[what][1] += float(energy.sum())
    return math.sqrt(sum(tail / total for tail, total in tails.values() if total > 0))  # squared errors add


def combined(errors) -> float:
    """Root sum of squares of relative errors."""
    return math.sqrt(sum(e * e for e in errors))


def _augmented(stats: InputStats) -> torch.Tensor:
    """E[(a; 1)(a; 1)^T] from the input's second moment and mean."""
    second, mean = stats.covariance().double(), stats.mean().double()
    return torch.cat([torch.cat([second, mean[:, None]], 1), torch.cat([mean, mean.new_ones(1)])[None]], 0)
