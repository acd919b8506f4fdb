"""Apply a Plan to a model, atomically: build every new module first, then swap them all.

On any error while building, the model is untouched; the swap itself is plain attribute
assignment and is rolled back if it fails part-way. Merged rows (lrdaccel.block_merge) replace
a bottleneck's three convs and two BatchNorms at once, and are followed by re-estimating every
BatchNorm's statistics on the calibration batches; that too is undone on error.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lrdaccel._modules import parent_and_attr, unwrap
from lrdaccel._settings import check_choice, check_int, resolve
from lrdaccel.block_merge import (
    BlockStats,
    build_merged,
    collect_block_stats,
    merge_error,
    merged_like,
    merged_shape_check,
)
from lrdaccel.calibrate import InputStats, collect_input_stats
from lrdaccel.factorize.branched import check_branched_rank
from lrdaccel.factorize.whiten import DEFAULT_DAMPING, DEFAULT_REFIT_DAMPING, REFITS, check_damping
from lrdaccel.layers import LowRankModule, entry_for
from lrdaccel.layers.base import warn_plain
from lrdaccel.layers.merged import MergedConv2d
from lrdaccel.layers.registry import dense_shape, layer_class_for
from lrdaccel.measure.counting import macs_by_module
from lrdaccel.planning import Plan
from lrdaccel.planning import plan as make_plan
from lrdaccel.planning.forms import apply_forms
from lrdaccel.recalibrate import recalibrate_batchnorm

METHODS = ("svd", "whiten")


@dataclass
class DecomposeConfig:
    """How `decompose` factorizes each planned layer.

    Attributes:
        method: "svd" (default): minimise weight error (plain SVD / HOOI). "whiten": minimise
            output error on calibration inputs (truncation-aware whitening for SVD layers,
            input-covariance-weighted HOOI for Tucker-2; see lrdaccel.factorize.whiten). Same
            ranks and structure either way, so optimize_ranks, freezing and save/load apply.
        n_iter: HOOI refinement sweeps for Tucker-2 (None: the default, 2), ALS sweeps for
            branched Tucker-2 (None: 4).
        damping: whitening's relative diagonal loading (method="whiten").
        sequential: with method="whiten", decompose layer by layer in execution order, each on
            the inputs of the partly decomposed model, re-solved in closed form so that its output
            matches the original layer's (lrdaccel.sequential). SVD and Tucker-2 rows only.
        refit: what sequential calibration re-solves: "joint" (both SVD factors, reduced-rank
            regression; Tucker-2: the last 1x1), "last" (the last factor and bias, least
            squares) or "none".
        refit_damping: relative ridge of that re-solve, towards the factorization's own factors.
    """

    method: str = "svd"
    n_iter: int | None = None
    damping: float = DEFAULT_DAMPING
    sequential: bool = False
    refit: str = "joint"
    refit_damping: float = DEFAULT_REFIT_DAMPING

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_int("n_iter", self.n_iter, 0, optional=True)
        check_damping(self.damping)
        check_choice("refit", self.refit, REFITS)
        check_damping(self.refit_damping)
        if not isinstance(self.sequential, bool):
            raise ValueError(f"sequential must be True or False, got {self.sequential!r}")
        if self.sequential and self.method != "whiten":
            raise ValueError("sequential=True calibrates the whitened factorization: pass method='whiten'")


@dataclass
class LayerReport:
    """What decomposing one layer did. MACs are per forward of the example input when one was
    given (counted by torch.utils.flop_counter), else per output position (analytic)."""

    name: str
    kind: str
    rank: Any
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    # ||W - W_hat||_F / ||W||_F; for a merged block, the relative error of the block's output on the
    # first calibration batch before BatchNorm re-estimation (None without calibration)
    relative_error: float | None


@dataclass
class DecomposeReport:
    layers: list[LayerReport]
    model_params_before: int
    model_params_after: int
    model_macs_before: int | None = None  # whole model, per forward of example_inputs
    model_macs_after: int | None = None
    macs_unit: str = "per output position"
    seconds: float = 0.0
    plan: Plan | None = field(default=None, repr=False)

    def totals(self) -> dict[str, int]:
        keys = ("params_before", "params_after", "macs_before", "macs_after")
        return {k: sum(getattr(row, k) for row in self.layers) for k in keys}

    def __str__(self) -> str:
        lines = [f"{'layer':<40} {'kind':<8} {'rank':<10} {'params':>23} {'rel.err':>8}"]
        for r in self.layers:
            error = "-" if r.relative_error is None else f"{r.relative_error:.4f}"
            lines.append(f"{r.name:<40} {r.kind:<8} {str(r.rank):<10} "
                         f"{r.params_before:>10,} -> {r.params_after:>9,} {error:>8}")
        lines.append(f"model parameters: {self.model_params_before:,} -> {self.model_params_after:,}"
                     + (f" ({self.model_params_after / self.model_params_before:.3f}x)"
                        if self.model_params_before else ""))
        if self.model_macs_before:
            lines.append(f"model MACs per forward: {self.model_macs_before:,} -> {self.model_macs_after:,} "
                         f"({self.model_macs_after / self.model_macs_before:.3f}x)")
        lines.append(f"decomposed {len(self.layers)} layers in {self.seconds:.1f} s")
        return "\n".join(lines)


def validate_plan(model: nn.Module, plan: Plan) -> None:
    """Every row must name a layer of the right type and shape in this model; every decomposed
    row a layer that can be decomposed, on real (not meta) weights; every merged row its whole
    bottleneck, no module of which another row claims.

    Raises:
        ValueError: naming the row and what differs.
    """
    _check_plan_type(plan)
    claimed: dict[str, str] = {}
    for row in plan:
        for name in [row.name, *(row.merge.module_names() if row.merge else [])]:
            if name in claimed:
                raise ValueError(f"plan row {row.name!r}: module {name!r} is also claimed by row {claimed[name]!r}")
            claimed[name] = row.name
    for row in plan:
        try:
            module = model.get_submodule(row.name)
        except AttributeError:
            raise ValueError(f"plan row {row.name!r}: the model has no such module; "
                             f"the plan is for another architecture") from None
        if row.reason in ("already decomposed", "already merged"):
            if not isinstance(module, (LowRankModule, MergedConv2d)):
                raise ValueError(f"plan row {row.name!r}: expected a decomposed layer, the model has "
                                 f"{type(module).__name__}")
            continue
        if row.decomposed and isinstance(module, (LowRankModule, MergedConv2d)):
            raise ValueError(f"plan row {row.name!r}: the model's layer is already decomposed "
                             f"({type(module).__name__}); apply the plan to an undecomposed model")
        if type(module).__name__ != row.layer_type:
            raise ValueError(f"plan row {row.name!r}: expected {row.layer_type}, the model has "
                             f"{type(module).__name__}; the plan is for another architecture")
        entry = entry_for(module)
        if entry is None or not row.supported:
            continue
        shape = dense_shape(module)
        if shape != row.shape:
            raise ValueError(f"plan row {row.name!r}: expected weight {row.shape}, the model has {shape}; "
                             f"the plan is for another architecture")
        if not row.decomposed:
            continue
        _check_form(model, module, row)


def _check_plan_type(plan: Any) -> None:
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be an lrdaccel Plan (from lrd.plan or Plan.load), got {type(plan).__name__}")


def _check_form(model: nn.Module, module: nn.Module, row) -> None:
    """The row's kind and ranks fit the layer (and, for a merged row, its neighbours)."""
    entry = entry_for(module)
    if row.kind == "merged":
        if not isinstance(module, nn.Conv2d):
            raise ValueError(f"plan row {row.name!r}: a merged row must name a Conv2d, got {row.layer_type}")
        why = merged_shape_check(model, row)
        if why is not None:
            raise ValueError(f"plan row {row.name!r}: {why}; the plan is for another architecture")
        r1, r2 = row.rank
        if not (0 < r1 <= row.shape["in"] and 0 < r2 <= row.shape["out"]):
            raise ValueError(f"plan row {row.name!r}: merged ranks must be in [1, {row.shape['in']}] x "
                             f"[1, {row.shape['out']}], got {row.rank}")
        convs = [module] + [model.get_submodule(n) for n in row.merge.convs]
    else:
        if layer_class_for(module, row.kind) is None:
            raise ValueError(f"plan row {row.name!r}: kind {row.kind!r} does not fit a {row.layer_type} "
                             f"with kernel {row.shape['kernel']} (expected {entry.kind!r})")
        if row.kind == "tucker2_branched":
            check_branched_rank(*row.rank, row.branches, row.shape["in"], row.shape["out"], row.name)
        convs = [module]
    for conv in convs:
        why = entry_for(conv).why_not(conv) if entry_for(conv) is not None else "not a supported layer"
        if why is not None:
            raise ValueError(f"plan row {row.name!r}: cannot decompose this layer: {why}")
        if conv.weight.is_meta:
            raise ValueError(f"plan row {row.name!r}: the weights are on the meta device; decompose needs real "
                             f"weights (lrd.plan works on meta, decompose and load do not)")


def build_modules(
    model: nn.Module,
    plan: Plan,
    factorize: bool = True,
    config: DecomposeConfig | None = None,
    input_stats: dict[str, InputStats] | None = None,
    progress: bool = False,
    block_stats: dict[str, BlockStats] | None = None,
) -> dict[str, nn.Module]:
    """New modules for every row that changes the model, by qualified name, the model untouched
    (a merged row gives its three convs, two BatchNorms and, where it folds into it, bn3).

    factorize=False builds the right shapes only (for loading weights or timing). With
    `input_stats` (from `lrdaccel.calibrate.collect_input_stats`) each layer is whitened by its
    inputs' covariance; a layer the calibration never reached falls back to the plain
    factorization with a warning naming it. Merged rows need `block_stats`
    (`lrdaccel.block_merge.collect_block_stats`) unless both their sides are linear.
    """
    validate_plan(model, plan)
    config = config or DecomposeConfig()
    built = {}
    rows = plan.changed
    for row in tqdm(rows, desc="decomposing", unit="layer", disable=not progress or not rows):
        if row.kind == "merged":
            if not factorize:
                built.update(merged_like(model, row))
            else:
                built.update(build_merged(model, row, (block_stats or {}).get(row.name), config.damping))
            continue
        dense = model.get_submodule(row.name)
        layer_class = layer_class_for(dense, row.kind)
        form = {"branches": row.branches} if row.kind == "tucker2_branched" else {}
        if not factorize:
            built[row.name] = layer_class.like(dense, row.rank, row.name, **form)
            continue
        options = {"n_iter": config.n_iter, **form} if row.kind in ("tucker2", "tucker2_branched") else {}
        if input_stats is not None:
            stats = input_stats.get(row.name)
            if stats is None or not stats.count:
                warn_plain(row.name, "no calibration input reached it", layer_class.plain_method)
            else:
                options.update(input_covariance=stats.covariance(), damping=config.damping)
        built[row.name] = layer_class.from_dense(dense, row.rank, row.name, **options)
    return built


def swap_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put each replacement in place; return the originals. All or nothing."""
    originals: dict[str, nn.Module] = {}
    try:
        for name, module in replacements.items():
            parent, attr = parent_and_attr(model, name)
            originals[name] = getattr(parent, attr)
            setattr(parent, attr, module)
    except BaseException:
        for name, module in originals.items():
            parent, attr = parent_and_attr(model, name)
            setattr(parent, attr, module)
        raise
    return originals


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
        calibration: batches for method="whiten", for merged rows and, without a plan, for
            allocate="sensitivity" (a DataLoader, list or other iterable; each batch called as
            model(tensor), model(*tuple) or model(**dict), so drop labels). Merging uses them to
            choose what to keep and to re-estimate every BatchNorm's statistics afterwards
            (several passes: a generator is read into a list first); use about a thousand samples.
        config: a DecomposeConfig (method, n_iter, damping, sequential, refit, refit_damping).
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
        from lrdaccel.sequential import build_sequential  # sequential imports this module

        built = build_sequential(model, plan, calibration, refit=config.refit, damping=config.damping,
                                 refit_damping=config.refit_damping, n_iter=config.n_iter, progress=progress)
    else:
        built = build_modules(model, plan, config=config, input_stats=input_stats, progress=progress,
                              block_stats=block_stats)
    errors = {row.name: merge_error(model, row, built, block_stats) if row.kind == "merged"
              else _relative_error(model.get_submodule(row.name), built[row.name]) for row in plan.changed}
    originals = swap_modules(model, built)
    try:  # the model's own forward may fail on the new layers: then undo the swap
        apply_forms(model, plan)
        macs_after = None if example_inputs is None else macs_by_module(model, example_inputs)
        if merged and calibration is not None:  # restores the statistics itself on error
            recalibrate_batchnorm(model, calibration)
    except BaseException:
        swap_modules(model, originals)
        raise
    rows = []
    for row in plan.changed:
        before, after = row.macs_before, row.macs_after
        if macs_before is not None:
            names = [row.name, *(row.merge.convs if row.merge else ())]
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
    merged = plan.merged
    approximate = [row.name for row in merged if row.merge.act1 or row.merge.act2]
    if config.method == "svd" and calibration is not None and not merged and not allocating:
        raise ValueError("calibration is only used by method='whiten', by merged rows and by "
                         "allocate='sensitivity'; pass method='whiten' or drop it")
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
        input_stats = collect_input_stats(model, [row.name for row in plan.changed if row.kind != "merged"],
                                          calibration, progress=progress)
    if merged and calibration is not None:
        block_stats = collect_block_stats(model, merged, calibration)
    return input_stats, block_stats


@torch.no_grad()
def _relative_error(dense: nn.Module, low_rank: LowRankModule) -> float:
    original = dense.weight.detach().to(torch.float64)
    approx = low_rank.dense_weight().to(torch.float64)  # in the dense layer's own layout
    norm = original.norm()
    return float((original - approx).norm() / norm) if norm > 0 else float((original - approx).norm())
