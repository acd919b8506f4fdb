"""Apply a Plan to a model, atomically: build every new module first, then swap them all.

On any error while building, the model is untouched; the swap itself is plain attribute
assignment and is rolled back if it fails part-way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from lrdaccel._modules import parent_and_attr, unwrap
from lrdaccel.calibrate import whitening_factorizer
from lrdaccel.layers import LowRankModule, entry_for
from lrdaccel.layers.registry import dense_shape
from lrdaccel.plan import LayerPlan, Plan, plan as make_plan


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
        lines.append(f"model parameters: {self.model_params_before:,} -> {self.model_params_after:,} "
                     f"({self.model_params_after / self.model_params_before:.3f}x)")
        if self.model_macs_before:
            lines.append(f"model MACs per forward: {self.model_macs_before:,} -> {self.model_macs_after:,} "
                         f"({self.model_macs_after / self.model_macs_before:.3f}x)")
        lines.append(f"decomposed {len(self.layers)} layers in {self.seconds:.1f} s")
        return "\n".join(lines)


def validate_plan(model: nn.Module, plan: Plan) -> None:
    """Every row must name a layer of the right type and shape in this model."""
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
        entry = entry_for(module)
        if entry is None or type(module).__name__ != row.layer_type:
            raise ValueError(f"plan row {row.name!r}: expected {row.layer_type}, the model has "
                             f"{type(module).__name__}; the plan is for another architecture")
        shape = dense_shape(module)
        if shape != row.shape:
            raise ValueError(f"plan row {row.name!r}: expected weight {row.shape}, the model has {shape}; "
                             f"the plan is for another architecture")
        if row.decomposed and entry.kind != row.kind:
            raise ValueError(f"plan row {row.name!r}: kind {row.kind!r} does not fit a {row.layer_type} "
                             f"with kernel {shape['kernel']} (expected {entry.kind!r})")


def build_modules(
    model: nn.Module,
    plan: Plan,
    factorize: bool = True,
    n_iter: int | None = None,
    progress: bool = False,
    factorizer: Callable[[nn.Module, LayerPlan], LowRankModule] | None = None,
) -> dict[str, LowRankModule]:
    """New modules for every decomposed row, the model untouched.

    factorize=False builds the right shapes only (for loading weights or timing); a
    `factorizer(dense, row)` replaces the default SVD / HOOI factorization.
    """
    validate_plan(model, plan)
    built = {}
    rows = plan.decomposed
    for row in tqdm(rows, desc="decomposing", unit="layer", disable=not progress or not rows):
        dense = model.get_submodule(row.name)
        layer_class = entry_for(dense).layer_class
        if not factorize:
            built[row.name] = layer_class.like(dense, row.rank, row.name)
        elif factorizer is not None:
            built[row.name] = factorizer(dense, row)
        elif row.kind == "tucker2" and n_iter is not None:
            built[row.name] = layer_class.from_dense(dense, row.rank, row.name, n_iter=n_iter)
        else:
            built[row.name] = layer_class.from_dense(dense, row.rank, row.name)
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
    n_iter: int | None = None,
    factorizer: Callable[[nn.Module, LayerPlan], LowRankModule] | None = None,
    progress: bool = False,
    calibration: Any = None,
    method: str = "svd",
    **plan_kwargs: Any,
) -> DecomposeReport:
    """Decompose `model` in place according to `plan` (or `plan(model, ratio, **plan_kwargs)`).

    Args:
        model: the model to change; wrappers (DDP, torch.compile) are looked through.
        plan: from `lrd.plan` / `lrd.optimize_ranks`; give either this or `ratio`.
        example_inputs: a tensor, tuple or dict for the model; when given, MACs in the report
            are counted by torch.utils.flop_counter per forward of it.
        n_iter: HOOI refinement sweeps for Tucker-2 (default 2).
        factorizer: `factorizer(dense, row) -> LowRankModule` in place of plain SVD/HOOI.
        progress: show a tqdm bar.
        calibration: batches for method="whiten" (a DataLoader, list or other iterable; each
            batch called as model(tensor), model(*tuple) or model(**dict), so drop labels).
        method: "svd" (default): minimise weight error (plain SVD / HOOI). "whiten": minimise
            output error on the calibration inputs (truncation-aware whitening for SVD layers,
            input-covariance-weighted HOOI for Tucker-2; see lrdaccel.calibrate). Same ranks and
            structure either way, so optimize_ranks, freezing and save/load apply unchanged.

    Returns:
        A DecomposeReport: per layer parameters, MACs and relative weight error, and totals.

    Raises:
        ValueError: a plan that does not fit the model, bad ranks, NaN/Inf weights, an unknown
            method, method="whiten" without calibration (or with a factorizer), calibration
            with method="svd", calibration batches the model fails on or that give NaN/Inf;
            the model is then left exactly as it was.

    Example:
        >>> import torch, lrdaccel as lrd
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> report = lrd.decompose(model, ratio=2.0)
        >>> type(model[0]).__name__, model[0].rank
        ('SVDLinear', 16)
    """
    import time

    start = time.perf_counter()
    model = unwrap(model)
    if plan is None:
        plan = make_plan(model, ratio=2.0 if ratio is None else ratio, **plan_kwargs)
    elif ratio is not None or plan_kwargs:
        raise ValueError("give either a plan or ratio/plan options to decompose(), not both")
    if method not in ("svd", "whiten"):
        raise ValueError(f"method must be 'svd' or 'whiten', got {method!r}")
    if method == "svd" and calibration is not None:
        raise ValueError("calibration is only used by method='whiten'; pass method='whiten' or drop it")
    if method == "whiten":
        if calibration is None:
            raise ValueError("method='whiten' needs calibration batches (calibration=loader_or_list)")
        if factorizer is not None:
            raise ValueError("give either a factorizer or method='whiten', not both")
        validate_plan(model, plan)  # before the calibration pass, which may be long
        factorizer = whitening_factorizer(model, plan, calibration, n_iter=n_iter, progress=progress)
    params_before = sum(p.numel() for p in model.parameters())
    macs_before = _count_macs(model, example_inputs)
    built = build_modules(model, plan, n_iter=n_iter, factorizer=factorizer, progress=progress)
    errors = {name: _relative_error(model.get_submodule(name), new) for name, new in built.items()}
    swap_modules(model, built)
    macs_after = _count_macs(model, example_inputs)
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


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call with a tensor, a tuple of positional args, or a dict of keyword args."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@torch.no_grad()
def _count_macs(model: nn.Module, inputs: Any) -> tuple[int, dict[str, int]] | None:
    """(whole-model MACs, MACs per module name) for one forward, or None without inputs."""
    if inputs is None:
        return None
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, depth=None) as counter:
            call_model(model, inputs)
    finally:
        model.train(was_training)
    prefix = type(model).__name__ + "."
    per_module = {
        key[len(prefix):]: sum(counts.values()) // 2
        for key, counts in counter.get_flop_counts().items()
        if key.startswith(prefix)
    }
    return counter.get_total_flops() // 2, per_module
