"""Applying narrow rows in sequence, each on the partly narrowed model (see
lrdaccel.decomposition.narrow_build for what one row builds)."""

from __future__ import annotations

from typing import Any

from torch import nn

from lrdaccel.calibration.statistics import collect_input_stats
from lrdaccel.decomposition.build import swap_modules
from lrdaccel.decomposition.narrow_build import fill_narrowed
from lrdaccel.planning.rows import LayerPlan


def narrow_in_sequence(model: nn.Module, rows: list[LayerPlan], calibration: Any, selection: str = "qr",
                       progress: bool = False) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """Narrow every row in plan order, each on the partly narrowed model, swapping as it goes.

    Returns:
        ({name: the original module}, {row name: relative output error of its consumer}); on any
        error every module swapped so far is put back before the error propagates.

    Raises:
        ValueError: a batch the model fails on, NaN/Inf activations, a consumer no batch reached.
    """
    originals: dict[str, nn.Module] = {}
    errors: dict[str, float] = {}
    try:
        for row in rows:
            consumer = row.narrow.consumer
            stats = collect_input_stats(model, [consumer], calibration, progress=progress)[consumer]
            if not stats.count:
                raise ValueError(f"narrow row {row.name!r}: no calibration batch reached its consumer {consumer!r}")
            built, errors[row.name] = fill_narrowed(model, row, stats, selection)
            originals.update(swap_modules(model, built))
    except BaseException:
        swap_modules(model, originals)
        raise
    return originals, errors
