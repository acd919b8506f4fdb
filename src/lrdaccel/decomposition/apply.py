"""Apply a Plan to a model, atomically: build every new module first, then swap them all.

On any error while building, the model is untouched; the swap itself is plain attribute
assignment and is rolled back if it fails part-way. Merged rows (lrdaccel.decomposition.merge_build)
replace a bottleneck's three convs and two BatchNorms at once, and are followed by re-estimating
every BatchNorm's statistics on the calibration batches; that too is undone on error. Narrow rows
(lrdaccel.decomposition.narrow_apply) are filled after the swap, in sequence on the partly
changed model, and undone on error like the rest.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Any

from torch import nn

from lrdaccel._modules import unwrap
from lrdaccel._settings import resolve
from lrdaccel.calibration.batchnorm import recalibrate_batchnorm
from lrdaccel.calibration.statistics import collect_input_stats
from lrdaccel.decomposition.build import build_modules, relative_error, swap_modules
from lrdaccel.decomposition.config import DecomposeConfig
from lrdaccel.decomposition.merge_build import merge_error
from lrdaccel.decomposition.merge_statistics import collect_block_stats
from lrdaccel.decomposition.narrow_apply import narrow_in_sequence
from lrdaccel.decomposition.narrow_build import narrow_config
from lrdaccel.decomposition.report import DecomposeReport, LayerReport
from lrdaccel.decomposition.sequential import build_sequential
from lrdaccel.measure.counting import macs_by_module
from lrdaccel.planning import Plan
from lrdaccel.planning import plan as make_plan
from lrdaccel.planning.forms import apply_forms
from lrdaccel.planning.validation import validate_plan


def decompose(
    model: nn.Module,
    plan: Plan | None = None,
    *,
    ratio: float | None = None,
    example_inputs: Any = None,
    calibration: Any = None,
    config: DecomposeConfig | None = None,
    progress: bool = False,
    **settings: Any,
) -> DecomposeReport:
    """Decompose `model` in place according to `plan` (or `lrd.plan(model, ratio, **plan settings)`).

    Args:
        model: the model to change; wrappers (DDP, torch.compile) are looked through.
        plan: from `lrd.plan` / `lrd.optimize_ranks`; give either this or `ratio`.
        example_inputs: a tensor, tuple or dict for the model; when given, MACs in the report
            are counted by torch.utils.flop_counter per forward of it.
        calibration: batches for method="whiten", for merged and narrow rows and, without a plan, for
            allocate="sensitivity" (a DataLoader, list or other iterable; each batch called as
            model(tensor), model(*tuple) or model(**dict), so drop labels). Merging uses them to
            choose what to keep and to re-estimate every BatchNorm's statistics afterwards
            (several passes: a generator is read into a list first); use about a thousand samples.
        config: a DecomposeConfig (method, n_iter, damping, sequential, refit, refit_damping, selection).
        progress: show a tqdm bar.
        **settings: DecomposeConfig fields; without a plan, also PlanConfig fields
            (`decompose(model, ratio=2.0, min_rank=4)`; `merge=True` traces `example_inputs`).

    Returns:
        A DecomposeReport: per layer parameters, MACs and relative weight error, and totals.

    Raises:
        ValueError: a plan that does not fit the model, bad ranks, NaN/Inf weights, an unknown
            method or setting, method="whiten" without calibration, calibration with
            method="svd", calibration batches the model fails on or that give NaN/Inf; the model
            is then left exactly as it was.

    Example:
        >>> import torch, lrdaccel as lrd
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> report = lrd.decompose(model, ratio=2.0)
        >>> type(model[0]).__name__, model[0].rank
        ('SVDLinear', 16)
    """
    start = time.perf_counter()
    model = unwrap(model)
    if isinstance(plan, (str, os.PathLike)):
        plan = Plan.load(plan)
    decompose_fields = {f.name for f in dataclasses.fields(DecomposeConfig)}
    plan_settings = {k: v for k, v in settings.items() if k not in decompose_fields}
    config = resolve(DecomposeConfig, config, {k: v for k, v in settings.items() if k in decompose_fields},
                     "decompose")
    allocating = plan is None and plan_settings.get("allocate") is not None
    if plan is None:
        if allocating and isinstance(calibration, Iterator):
            calibration = list(calibration)  # read again by the statistics
        plan = make_plan(model, ratio=2.0 if ratio is None else ratio, example_inputs=example_inputs,
                         calibration=calibration if allocating else None, **plan_settings)
    elif ratio is not None or plan_settings:
        raise ValueError("give either a plan or ratio/plan options to decompose(), not both")
    validate_plan(model, plan)  # before any pass over the calibration batches, which may be long
    if isinstance(calibration, Iterator):
        calibration = list(calibration)  # read by several passes (statistics, BatchNorms)
    merged = plan.merged
    input_stats, block_stats = _statistics(model, plan, calibration, config, progress, allocating)
    params_before = sum(p.numel() for p in model.parameters())
    macs_before = None if example_inputs is None else macs_by_module(model, example_inputs)
    if config.sequential:
        built = build_sequential(model, plan, calibration, refit=config.refit, damping=config.damping,
                                 refit_damping=config.refit_damping, n_iter=config.n_iter, progress=progress)
    else:
        built = build_modules(model, plan, config=config, input_stats=input_stats, progress=progress,
                              block_stats=block_stats)
    errors = {row.name: merge_error(model, row, built, block_stats) if row.kind == "merged"
              else relative_error(model.get_submodule(row.name), built[row.name])
              for row in plan.changed if row.kind != "narrow"}
    originals = swap_modules(model, built)
    narrowed, config_before = {}, []
    try:  # the model's own forward may fail on the new layers: then undo the swap
        if plan.narrowed:  # undoes its own swaps on error
            narrowed, narrow_errors, config_before = narrow_in_sequence(model, plan.narrowed, calibration,
                                                                        config.selection, progress)
            errors.update(narrow_errors)
            config_before += narrow_config(model, plan)
        apply_forms(model, plan)
        macs_after = None if example_inputs is None else macs_by_module(model, example_inputs)
        if (merged or any(row.narrow.resized for row in plan.narrowed)) and calibration is not None:
            # restores the statistics itself on error
            recalibrate_batchnorm(model, calibration)
    except BaseException:
        for owner, attribute, value in reversed(config_before):
            setattr(owner, attribute, value)
        swap_modules(model, narrowed)
        swap_modules(model, originals)
        raise
    rows = []
    for row in plan.changed:
        before, after = row.macs_before, row.macs_after
        if macs_before is not None:
            names = [row.name, *(row.merge.convs if row.merge else ()), *([row.narrow.consumer] if row.narrow else [])]
            before = sum(macs_before[1].get(name, 0) for name in names)
            after = sum(macs_after[1].get(name, 0) for name in names)
        rows.append(LayerReport(row.name, row.kind, row.rank, row.params_before, row.params_after,
                                before, after, errors[row.name]))
    return DecomposeReport(
        layers=rows,
        model_params_before=params_before,
        model_params_after=sum(p.numel() for p in model.parameters()),
        model_macs_before=None if macs_before is None else macs_before[0],
        model_macs_after=None if macs_after is None else macs_after[0],
        macs_unit="per output position" if macs_before is None else "per forward",
        seconds=time.perf_counter() - start,
        plan=plan,
    )


def _statistics(model: nn.Module, plan: Plan, calibration: Any, config: DecomposeConfig, progress: bool,
                allocating: bool):
    """(input statistics for whitening, block statistics for merges), each None where the plan
    and method do not need it (sequential calibration collects its own).

    Raises:
        ValueError: calibration missing where needed or given where nothing reads it.
    """
    merged, narrowed = plan.merged, [row.name for row in plan.narrowed]
    approximate = [row.name for row in merged if row.merge.act1 or row.merge.act2]
    if config.method == "svd" and calibration is not None and not merged and not narrowed and not allocating:
        raise ValueError("calibration is only used by method='whiten', by merged and narrow rows and by "
                         "allocate='sensitivity'; pass method='whiten' or drop it")
    if narrowed and calibration is None:
        raise ValueError(f"narrow rows {narrowed[:3]}{' ...' if len(narrowed) > 3 else ''} choose their channels on "
                         f"calibration activations: pass calibration=batches (a loader or list)")
    if approximate and calibration is None:
        raise ValueError(f"merged rows {approximate[:3]}{' ...' if len(approximate) > 3 else ''} merge across an "
                         f"activation, which needs calibration batches (calibration=loader_or_list)")
    input_stats = block_stats = None
    if config.method == "whiten":
        if calibration is None:
            raise ValueError("method='whiten' needs calibration batches (calibration=loader_or_list)")
        if config.sequential:
            others = [f"{row.name} ({row.kind})" for row in plan.changed if row.kind not in ("svd", "tucker2")]
            if others:
                raise ValueError(f"sequential=True calibrates SVD and Tucker-2 rows; the plan also has "
                                 f"{', '.join(others[:3])}{' ...' if len(others) > 3 else ''}: use sequential=False")
            return None, None
        whitened = [row.name for row in plan.changed if row.kind not in ("merged", "narrow")]
        input_stats = collect_input_stats(model, whitened,
                                          calibration, progress=progress)
    if merged and calibration is not None:
        block_stats = collect_block_stats(model, merged, calibration)
    return input_stats, block_stats
