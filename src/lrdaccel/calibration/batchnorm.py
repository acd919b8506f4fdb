"""BatchNorm re-estimation: running statistics recomputed on unlabeled data after decomposition.

A decomposed (or merged) layer outputs something slightly different, so every BatchNorm after it
normalizes with running statistics that describe the ORIGINAL network's activations. Recomputing
them on a few hundred unlabeled inputs is a forward-only repair (AdaBN; torch's
`swa_utils.update_bn` does the same after weight averaging):

    lrd.decompose(model, plan)
    lrd.recalibrate_batchnorm(model, [x for x, _ in loader][:20])

One pass over the batches with every BatchNorm in training mode (each normalizes by its batch's
statistics, as in training; dropout and everything else stay in eval mode). Each BatchNorm's new
running mean and variance are the exact statistics of ALL its inputs over the pass, per channel:
every sample weighs the same whatever the batch sizes, and the variance is the unbiased one torch
keeps (not momentum's running blend, and not an average of per-batch variances, which would miss
the spread of the batch means). `num_batches_tracked` becomes the number of batches.

The model is left in the modes it came in, with every hook removed; on any error (no batches, a
batch the model fails on, NaN/Inf reaching a BatchNorm) every statistic is left as it was.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from lrdaccel._modules import check_real_weights, kept_modes, model_device, move_inputs, unwrap
from lrdaccel.calibration.batches import call_batch, check_calibration
from lrdaccel.calibration.passes import hooked


@dataclass
class BatchNormReport:
    """What `recalibrate_batchnorm` re-estimated.

    Attributes:
        layers: qualified names of the BatchNorm layers whose statistics were replaced (one the
            forward never reaches keeps its own).
        batches: calibration batches used.
        samples: values per channel behind each layer's statistics (batch x positions), by name.
    """

    layers: list[str]
    batches: int
    samples: dict[str, int]

    def __str__(self) -> str:
        return f"re-estimated {len(self.layers)} BatchNorm layers on {self.batches} batches"


class _ChannelMoments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch (Chan et al.),
    in float64: stable when the mean is large against the spread."""

    def __init__(self) -> None:
        self.count, self.mean, self.squares = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().to(torch.float64).movedim(1, -1).reshape(-1, x.shape[1])
        n = rows.shape[0]
        mean = rows.mean(0)
        squares = (rows - mean).square().sum(0)
        if self.mean is None:
            self.count, self.mean, self.squares = n, mean, squares
            return
        total = self.count + n
        delta = mean - self.mean
        self.squares = self.squares + squares + delta.square() * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.count = total

    def finite(self) -> bool:
        return self.mean is None or bool(torch.isfinite(self.mean).all() and torch.isfinite(self.squares).all())


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm (1d/2d/3d, SyncBatchNorm, subclasses) that keeps running statistics."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
            and module.running_mean is not None}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], *, progress: bool = False) -> BatchNormReport:
    """Recompute the running statistics of every BatchNorm in `model` on `batches`.

    Args:
        model: any model with BatchNorm layers (wrappers are looked through).
        batches: unlabeled inputs (a list, DataLoader or other iterable), each called as
            model(tensor), model(*tuple) or model(**dict): drop labels first. Moved to the
            model's device.
        progress: a tqdm bar over batches.

    Returns:
        A BatchNormReport (layers, batches, samples per layer).

    Raises:
        ValueError: no BatchNorm with running statistics, a model on the meta device, no batches,
            a batch the model fails on, or NaN/Inf reaching a BatchNorm (naming the batch and the
            layer); every statistic is then as it was.
    """
    model = unwrap(model)
    check_real_weights(model, "recalibrate_batchnorm", "re-estimating statistics needs real weights")
    check_calibration(batches)
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer with running statistics to re-estimate")
    moments = {name: _ChannelMoments() for name in layers}

    def recorder(name: str, _module: nn.Module) -> Callable:
        return lambda _m, args, kwargs: moments[name].add(args[0] if args else next(iter(kwargs.values())))

    device = model_device(model)
    used = 0
    with kept_modes(model), _kept_statistics(layers), hooked(layers, recorder):
        model.eval()
        for layer in layers.values():
            layer.train()  # normalize by the batch's statistics, as training does
        for index, batch in enumerate(tqdm(batches, desc="BatchNorm statistics", unit="batch", disable=not progress)):
            call_batch(model, move_inputs(batch, device), index)
            used += 1
            bad = next((name for name, item in moments.items() if not item.finite()), None)
            if bad is not None:
                raise ValueError(f"calibration batch {index}: NaN/Inf reached BatchNorm {bad!r}; "
                                 f"its statistics were left as they were")
    if not used:
        raise ValueError("calibration gave no batches")
    reached = {name: layer for name, layer in layers.items() if moments[name].count}
    for name, layer in reached.items():
        item = moments[name]
        layer.running_mean.copy_(item.mean)
        layer.running_var.copy_(item.squares / (item.count - 1))
        layer.num_batches_tracked.fill_(used)
    return BatchNormReport(list(reached), used, {name: moments[name].count for name in reached})


@contextmanager
def _kept_statistics(layers: dict[str, nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """The running statistics as they were on entry, put back on exit: the training-mode pass
    updates them in passing; the exact ones are written after a successful pass."""
    saved = {layer: (layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone())
             for layer in layers.values()}
    try:
        yield
    finally:
        for layer, (mean, var, tracked) in saved.items():
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
            layer.num_batches_tracked.copy_(tracked)
