"""Calibration statistics of planned bottlenecks, gathered from the ORIGINAL model before merging.

What each merged side needs (lrdaccel.decomposition.merge_build): the inner conv's input moments,
its input patches' second moments where the input side is merged by selection, the last conv's
input moments where the output side is, and the inner conv's output moments where that side is
linear. Several blocks share a calibration pass up to PASS_BYTES of statistics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrdaccel._modules import kept_modes, model_device, move_inputs
from lrdaccel.calibration.batches import call_batch, check_calibration
from lrdaccel.planning.rows import LayerPlan

# Patch second moments of several blocks are gathered in one calibration pass up to this size;
# more blocks take more passes (ResNet-152's inner 3x3 convs need ~2 GiB in all).
PASS_BYTES = 512 << 20
SAMPLE_ITEMS = 4  # items of the first calibration batch kept per block to report the merge's error


@dataclass
class BlockStats:
    """Calibration statistics of one bottleneck, float64, from the ORIGINAL model.

    Attributes:
        h_mean / h_second: E[h], E[h h^T] over positions of the inner conv's input h [M], [M, M].
        patch_second: E[p p^T] over its k x k input patches (F.unfold layout), where the input
            side is merged by selection; else None.
        g_second: E[g1 g1^T] of the last conv's input with a constant 1 appended [M'+1, M'+1],
            where the output side is merged by selection; else None.
        y_mean / y_second: E[y], E[y y^T] of the inner conv's output, where the output side is
            linear (for the new BatchNorm's statistics); else None.
        sample: the first calibration batch's input to the first conv, its first few items (to
            report the merge's error).
    """

    h_mean: torch.Tensor
    h_second: torch.Tensor
    patch_second: torch.Tensor | None = None
    g_second: torch.Tensor | None = None
    y_mean: torch.Tensor | None = None
    y_second: torch.Tensor | None = None
    sample: torch.Tensor | None = None


class _Moments:
    """Streamed sums of x and x x^T over rows, float64."""

    def __init__(self):
        self.total = self.outer = None
        self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().double()
        if self.outer is None:
            self.total = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
            self.outer = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
        self.total += rows.sum(0)
        self.outer.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    def mean(self) -> torch.Tensor:
        return self.total / self.count

    def second(self) -> torch.Tensor:
        return self.outer / self.count


def _channel_rows(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _patch_rows(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    patches = F.unfold(x.double(), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _with_constant(rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([rows.double(), torch.ones(rows.shape[0], 1, dtype=torch.float64, device=rows.device)], 1)


def _stats_bytes(model: nn.Module, row: LayerPlan) -> int:
    middle = model.get_submodule(row.name)
    side = middle.in_channels * math.prod(middle.kernel_size)
    return 8 * (side * side if row.merge.act1 else 0) + 8 * (middle.in_channels + middle.out_channels + 1) ** 2


def collect_block_stats(model: nn.Module, rows: Iterable[LayerPlan], calibration: Iterable[Any], *,
                        max_bytes: int = PASS_BYTES) -> dict[str, BlockStats]:
    """Run the calibration batches through `model` and gather each merged row's BlockStats.

    Blocks are grouped into passes over the batches so that no pass holds more than `max_bytes`
    of patch statistics (a block larger than that gets a pass of its own).

    Raises:
        ValueError: no batches, a batch the model fails on (naming its index), NaN/Inf statistics.
    """
    check_calibration(calibration)
    rows = list(rows)
    passes: list[list[LayerPlan]] = []
    size = 0
    for row in rows:
        need = _stats_bytes(model, row)
        if not passes or size + need > max_bytes:
            passes.append([])
            size = 0
        passes[-1].append(row)
        size += need
    stats: dict[str, BlockStats] = {}
    for group in passes:
        stats.update(_collect(model, group, calibration))
    return stats


@torch.no_grad()
def _collect(model: nn.Module, rows: list[LayerPlan], calibration: Iterable[Any]) -> dict[str, BlockStats]:
    moments: dict[str, dict[str, _Moments]] = {}
    samples: dict[str, torch.Tensor] = {}
    hooks = []
    for row in rows:
        block, middle = row.merge, model.get_submodule(row.name)
        found = moments[row.name] = {"h": _Moments()}
        if block.act1:
            found["patch"] = _Moments()
        found["g" if block.act2 else "y"] = _Moments()

        def on_middle(module, args, output, found=found):
            found["h"].add(_channel_rows(args[0]))
            if "patch" in found:
                found["patch"].add(_patch_rows(module, args[0]))
            if "y" in found:
                found["y"].add(_channel_rows(output))

        def on_first(module, args, name=row.name):
            samples.setdefault(name, args[0][:SAMPLE_ITEMS].detach().clone())

        hooks.append(middle.register_forward_hook(on_middle))
        hooks.append(model.get_submodule(block.first).register_forward_pre_hook(on_first))
        if block.act2:
            hooks.append(model.get_submodule(block.last).register_forward_pre_hook(
                lambda module, args, found=found: found["g"].add(_with_constant(_channel_rows(args[0])))))
    run_batches(model, calibration, hooks)
    result = {}
    for row in rows:
        found = moments[row.name]
        if not found["h"].count:
            raise ValueError(f"merged row {row.name!r}: no calibration batch reached this block")
        values = {key: (m.mean(), m.second()) for key, m in found.items()}
        for key, (mean, second) in values.items():
            if not (torch.isfinite(mean).all() and torch.isfinite(second).all()):
                raise ValueError(f"merged row {row.name!r}: its calibration activations contain NaN/Inf")
        result[row.name] = BlockStats(
            *values["h"], patch_second=values["patch"][1] if "patch" in values else None,
            g_second=values["g"][1] if "g" in values else None,
            y_mean=values["y"][0] if "y" in values else None, y_second=values["y"][1] if "y" in values else None,
            sample=samples.get(row.name))
    return result


def run_batches(model: nn.Module, calibration: Iterable[Any], hooks: list) -> int:
    """Call `model` on every batch in eval mode without gradients, then remove `hooks` and
    restore every module's training flag (also on error). Returns the number of batches.

    Raises:
        ValueError: no batches, or a batch the model fails on (naming its index).
    """
    device = model_device(model)
    count = 0
    try:
        with kept_modes(model), torch.no_grad():
            model.eval()
            for index, batch in enumerate(calibration):
                call_batch(model, move_inputs(batch, device), index)
                count += 1
    finally:
        for hook in hooks:
            hook.remove()
    if not count:
        raise ValueError("calibration gave no batches")
    return count
