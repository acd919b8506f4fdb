"""Apply a Plan to a model, atomically: build every new module first, then swap them all.

On any error while building, the model is untouched; the swap itself is plain attribute
assignment and is rolled back if it fails part-way.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lrdaccel._modules import parent_and_attr, unwrap
from lrdaccel._settings import check_choice, check_int, resolve
from lrdaccel.calibrate import InputStats, collect_input_stats
from lrdaccel.factorize.whiten import DEFAULT_DAMPING, check_damping
from lrdaccel.layers import LowRankModule, TuckerConv2d, entry_for
from lrdaccel.layers.base import warn_plain
from lrdaccel.layers.registry import dense_shape
from lrdaccel.measure.counting import macs_by_module
from lrdaccel.planning import Plan
from lrdaccel.planning import plan as make_plan

METHODS = ("svd", "whiten")


@dataclass
class DecomposeConfig:
    """How `decompose` factorizes each planned layer.

    Attributes:
        method: "svd" (default): minimise weight error (plain SVD / HOOI). "whiten": minimise
            output error on calibration inputs (truncation-aware whitening for SVD layers,
            input-covariance-weighted HOOI for Tucker-2; see lrdaccel.factorize.whiten). Same
            ranks and structure either way, so optimize_ranks, freezing and save/load apply.
        n_iter: HOOI refinement sweeps for Tucker-2 (None: the default, 2).
        damping: whitening's relative diagonal loading (method="whiten").
    """

    method: str = "svd"
    n_iter: int | None = None
    damping: float = DEFAULT_DAMPING

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_int("n_iter", self.n_iter, 0, optional=True)
        check_damping(self.damping)


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
    relative_error: float  # ||W - W_hat||_F / ||W||_F


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
            lines.append(f"{r.name:<40} {r.kind:<8} {str(r.rank):<10} "
                         f"{r.params_before:>10,} -> {r.params_after:>9,} {r.relative_error:>8.4f}")
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
    row a layer that can be decomposed, on real (not meta) weights.

    Raises:
        ValueError: naming the row and what differs.
    """
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be an lrdaccel Plan (from lrd.plan or Plan.load), got {type(plan).__name__}")
    for row in plan:
        try:
            module = model.get_submodule(row.name)
        except AttributeError:
            raise ValueError(f"plan row {row.name!r}: the model has no such module; "
                             f"the plan is for another architecture") from None
        if row.reason == "already decomposed":
            if not isinstance(module, LowRankModule):
                raise ValueError(f"plan row {row.name!r}: expected a decomposed layer, the model has "
                                 f"{type(module).__name__}")
            continue
        if row.decomposed and isinstance(module, LowRankModule):
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
        if entry.kind != row.kind:
            raise ValueError(f"plan row {row.name!r}: kind {row.kind!r} does not fit a {row.layer_type} "
                             f"with kernel {shape['kernel']} (expected {entry.kind!r})")
        why = entry.why_not(module)
        if why is not None:
            raise ValueError(f"plan row {row.name!r}: cannot decompose this layer: {why}")
        if module.weight.is_meta:
            raise ValueError(f"plan row {row.name!r}: the weights are on the meta device; decompose needs real "
                             f"weights (lrd.plan works on meta, decompose and load do not)")


def build_modules(
    model: nn.Module,
    plan: Plan,
    factorize: bool = True,
    config: DecomposeConfig | None = None,
    input_stats: dict[str, InputStats] | None = None,
    progress: bool = False,
) -> dict[str, LowRankModule]:
    """New modules for every decomposed row, the model untouched.

    factorize=False builds the right shapes only (for loading weights or timing). With
    `input_stats` (from `lrdaccel.calibrate.collect_input_stats`) each layer is whitened by its
    inputs' covariance; a layer the calibration never reached falls back to the plain
    factorization with a warning naming it.
    """
    validate_plan(model, plan)
    config = config or DecomposeConfig()
    built = {}
    rows = plan.decomposed
    for row in tqdm(rows, desc="decomposing", unit="layer", disable=not progress or not rows):
        dense = model.get_submodule(row.name)
        layer_class = entry_for(dense).layer_class
        if not factorize:
            built[row.name] = layer_class.like(dense, row.rank, row.name)
            continue
        options = {"n_iter": config.n_iter} if layer_class is TuckerConv2d else {}
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
        calibration: batches for method="whiten" (a DataLoader, list or other iterable; each
            batch called as model(tensor), model(*tuple) or model(**dict), so drop labels).
        config: a DecomposeConfig (method, n_iter, damping).
        progress: show a tqdm bar.
        **settings: DecomposeConfig fields; without a plan, also PlanConfig fields
            (`decompose(model, ratio=2.0, min_rank=4)`).

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
    if plan is None:
        plan = make_plan(model, ratio=2.0 if ratio is None else ratio, **plan_settings)
    elif ratio is not None or plan_settings:
        raise ValueError("give either a plan or ratio/plan options to decompose(), not both")
    if config.method == "svd" and calibration is not None:
        raise ValueError("calibration is only used by method='whiten'; pass method='whiten' or drop it")
    input_stats = None
    if config.method == "whiten":
        if calibration is None:
            raise ValueError("method='whiten' needs calibration batches (calibration=loader_or_list)")
        validate_plan(model, plan)  # before the calibration pass, which may be long
        input_stats = collect_input_stats(model, [row.name for row in plan.decomposed], calibration,
                                          progress=progress)
    params_before = sum(p.numel() for p in model.parameters())
    macs_before = None if example_inputs is None else macs_by_module(model, example_inputs)
    built = build_modules(model, plan, config=config, input_stats=input_stats, progress=progress)
    errors = {name: _relative_error(model.get_submodule(name), new) for name, new in built.items()}
    originals = swap_modules(model, built)
    try:  # the model's own forward may fail on the new layers: then undo the swap
        macs_after = None if example_inputs is None else macs_by_module(model, example_inputs)
    except BaseException:
        swap_modules(model, originals)
        raise
    rows = []
    for row in plan.decomposed:
        before, after = row.macs_before, row.macs_after
        if macs_before is not None:
            before, after = macs_before[1].get(row.name, 0), macs_after[1].get(row.name, 0)
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


@torch.no_grad()
def _relative_error(dense: nn.Module, low_rank: LowRankModule) -> float:
    original = dense.weight.detach().to(torch.float64)
    approx = low_rank.dense_weight().to(torch.float64)  # in the dense layer's own layout
    norm = original.norm()
    return float((original - approx).norm() / norm) if norm > 0 else float((original - approx).norm())
