"""Applying narrow rows in sequence, each on the partly narrowed model (see
lrdaccel.decomposition.narrow_build for what one row builds)."""

from __future__ import annotations

from typing import Any

from torch import nn

from lrdaccel.calibration.statistics import collect_input_stats
from lrdaccel.decomposition.build import swap_modules
from lrdaccel.decomposition.narrow_build import fill_heads, fill_narrowed, set_head_size
from lrdaccel.planning.rows import LayerPlan


def narrow_in_sequence(model: nn.Module, rows: list[LayerPlan], calibration: Any, selection: str = "qr",
                       progress: bool = False) -> tuple[dict[str, nn.Module], dict[str, float | None], list]:
    """Narrow every row in plan order, each on the partly narrowed model, swapping as it goes (an
    attention row also sets its module's head size before the next row's pass).

    Returns:
        ({name: the original module}, {row name: relative output error of its consumer, None for
        attention}, [(module, attribute, old value)] of the head sizes set); on any error every
        module swapped and attribute set so far is put back before the error propagates.

    Raises:
        ValueError: a batch the model fails on, NaN/Inf activations, a consumer no batch reached.
    """
    originals: dict[str, nn.Module] = {}
    errors: dict[str, float] = {}
    changed: list = []
    try:
        for row in rows:
            observed = row.name if row.narrow.heads else row.narrow.consumer  # attention: its input
            stats = collect_input_stats(model, [observed], calibration, progress=progress)[observed]
            if not stats.count:
                raise ValueError(f"narrow row {row.name!r}: no calibration batch reached {observed!r}")
            if row.narrow.heads:
                built, errors[row.name] = fill_heads(model, row, stats)
            else:
                built, errors[row.name] = fill_narrowed(model, row, stats, selection)
            originals.update(swap_modules(model, built))
            changed += set_head_size(model, row)  # the next rows' passes run the narrowed attention
    except BaseException:
        for owner, attribute, value in reversed(changed):
            setattr(owner, attribute, value)
        swap_modules(model, originals)
        raise
    return originals, errors, changed
