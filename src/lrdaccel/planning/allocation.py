"""Rank allocation under a global budget: the layers that matter keep more rank.

One ratio for every layer treats a layer the output barely depends on like one it hangs on.
`allocate_ranks` keeps the budget of one ratio, the candidate layers together keep 1/R of their
weight parameters (`budget="params"`) or of their MACs per forward (`budget="macs"`), and
spends it where the measured loss (lrdaccel.planning.sensitivity) falls most per unit of cost:

    uniform = lrd.plan(model, ratio=1.5)
    plan = allocate_ranks(model, uniform, calibration=batches)            # same budget, other ranks

The candidates are the layers `uniform` decomposes (exclusions, filters and kept layers stay as
they are). Each may take any rank that reduces both its parameters and its MACs, at least
`min(min_rank, channels)`, or stay dense at zero loss: a layer too sensitive for any saving is
kept, with that reason. Each layer's (cost, loss) options are reduced to their lower convex hull
and the hull steps of all layers are taken in order of loss saved per unit of cost while they fit
(optimal at hull vertices for convex curves); then single rank steps fill what is left, so that
at the end no layer's next rank fits in the budget.

`choose_options` is the allocation itself, for any cost: rank optimization can pass measured
times per rank to spend a time budget by sensitivity (see NOTES for the wiring).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from lrdaccel._modules import unwrap
from lrdaccel._settings import check_choice, check_int
from lrdaccel.factorize.ranks import Rank, check_ratio, layer_cost
from lrdaccel.factorize.whiten import DEFAULT_DAMPING
from lrdaccel.planning.rows import LayerPlan, Plan
from lrdaccel.planning.sensitivity import LayerSensitivity, measure_sensitivity
from lrdaccel.planning.validation import validate_plan

BUDGETS = ("params", "macs")
ALLOCATIONS = ("sensitivity",)
# Ranks either side of the chosen one whose losses the plan keeps (meta["sensitivity"]) for rank
# optimization to trade time against: its search stays well within half and twice the start.
SENSITIVITY_WINDOW = 2.0


@dataclass(frozen=True)
class Option:
    """One way to treat a layer: its cost (parameters, MACs, time...), its loss, its rank (None:
    keep the dense layer)."""

    cost: float
    loss: float
    rank: Rank


def choose_options(options: Mapping[str, Sequence[Option]], budget: float) -> dict[str, Option]:
    """One option per layer minimising the total loss with total cost <= budget.

    Args:
        options: per layer, its options by increasing cost; the first is the cheapest allowed.
        budget: the most the chosen options may cost together.

    Raises:
        ValueError: the cheapest options together already exceed the budget.
    """
    position = {name: 0 for name in options}
    used = sum(choices[0].cost for choices in options.values())
    if used > budget:
        raise ValueError(f"the budget {budget:,.0f} is below the {used:,.0f} that the lowest allowed ranks cost "
                         f"together; lower min_rank or raise the budget")
    hulls = {name: _lower_hull(choices) for name, choices in options.items()}
    step_of = {name: 0 for name in options}
    heap: list[tuple[float, str, int]] = []

    def push(name: str) -> None:
        hull, k = hulls[name], step_of[name]
        if k + 1 < len(hull):
            here, there = options[name][hull[k]], options[name][hull[k + 1]]
            heapq.heappush(heap, (-(here.loss - there.loss) / (there.cost - here.cost), name, k))

    for name in options:
        push(name)
    while heap:
        _, name, k = heapq.heappop(heap)
        nxt = options[name][hulls[name][k + 1]]
        if used - options[name][position[name]].cost + nxt.cost <= budget:
            used += nxt.cost - options[name][position[name]].cost
            position[name], step_of[name] = hulls[name][k + 1], k + 1
            push(name)
    while True:  # fill: the next option of any layer that still fits, most loss saved per cost first
        best = None
        for name, choices in options.items():
            i = position[name]
            if i + 1 < len(choices) and used + choices[i + 1].cost - choices[i].cost <= budget:
                step = choices[i + 1].cost - choices[i].cost
                gain = (choices[i].loss - choices[i + 1].loss) / step if step > 0 else math.inf
                if best is None or gain > best[0]:
                    best = (gain, name)
        if best is None:
            return {name: options[name][position[name]] for name in options}
        name = best[1]
        used += options[name][position[name] + 1].cost - options[name][position[name]].cost
        position[name] += 1


def _lower_hull(choices: Sequence[Option]) -> list[int]:
    """Indices of the lower convex hull of (cost, loss), from the cheapest option."""
    hull: list[int] = []
    for i, option in enumerate(choices):
        if hull and option.cost <= choices[hull[-1]].cost:
            continue  # as dear as the last vertex and no better (options come sorted by cost, loss)
        while len(hull) >= 2:
            a, b = choices[hull[-2]], choices[hull[-1]]
            if (b.loss - a.loss) * (option.cost - a.cost) >= (option.loss - a.loss) * (b.cost - a.cost):
                hull.pop()  # b lies on or above the segment from a to this option
            else:
                break
        hull.append(i)
    return hull


def allocate_ranks(
    model: nn.Module,
    plan: Plan,
    calibration: Iterable[Any],
    *,
    ratio: float | None = None,
    budget: str = "params",
    sensitivity: str = "fisher",
    labels: Iterable[torch.Tensor] | None = None,
    min_rank: int = 8,
    damping: float = DEFAULT_DAMPING,
    progress: bool = False,
) -> Plan:
    """Re-rank the layers `plan` decomposes so they keep its budget, spent by sensitivity.

    Args:
        model: the undecomposed model the plan is for (not changed).
        plan: a plan from `lrd.plan(model, ratio=R)`; its decomposed layers are the candidates.
        calibration: unlabeled batches (see lrdaccel.planning.sensitivity).
        ratio: the candidates keep 1/ratio of their cost (default: the plan's ratio).
        budget: "params" (weight parameters) or "macs" (multiply-accumulates per forward, from
            the positions each layer computes in the calibration forward).
        sensitivity: "fisher" or "output" (see lrdaccel.planning.sensitivity).
        labels: class labels per batch, for the task loss's Fisher.
        min_rank: no rank below min(min_rank, channels).
        damping: whitening's relative diagonal loading.

    Returns:
        A new Plan: the candidates at their allocated ranks (`ratio_rank` too, so rank
        optimization searches around them) or kept as too sensitive; `meta["allocation"]` holds
        the budget and what was used, `meta["sensitivity"]` each layer's weight and losses for
        ranks within a factor SENSITIVITY_WINDOW of its own.

    Raises:
        ValueError: a bad setting, a plan for another model, a budget below the lowest ranks,
            or bad calibration (see measure_sensitivity).
    """

    check_choice("budget", budget, BUDGETS)
    check_int("min_rank", min_rank, 1)
    model = unwrap(model)
    validate_plan(model, plan)
    ratio = plan.ratio if ratio is None else ratio
    if ratio is None:
        raise ValueError("allocate_ranks: give ratio= (the plan has no single ratio)")
    check_ratio(ratio)
    rows = plan.decomposed
    if not rows:
        return plan
    curves = measure_sensitivity(model, [row.name for row in rows], calibration, sensitivity=sensitivity,
                                 labels=labels, damping=damping, progress=progress)
    options = {row.name: _options(row, curves[row.name], budget, min_rank, plan.beta) for row in rows}
    dense_cost = sum(choices[-1].cost for choices in options.values())
    limit = math.floor(dense_cost / ratio)
    chosen = choose_options(options, limit)
    how = f"{sensitivity} sensitivity, {budget} budget 1/{ratio:g}"
    allocated = plan
    for row in rows:
        rank = chosen[row.name].rank
        if rank is None:
            new = row.with_rank(None, f"kept: too sensitive for any saving ({how})", kind="keep")
        else:
            new = dataclasses.replace(row, rank=rank, ratio_rank=rank, reason=f"allocated by {how}")
        allocated = allocated.replace(new)
    allocated.meta = {
        **plan.meta,
        "allocation": {"sensitivity": sensitivity, "budget": budget, "ratio": ratio, "limit": limit,
                       "used": sum(option.cost for option in chosen.values()), "dense": dense_cost},
        "sensitivity": {row.name: _window(row, curves[row.name], chosen[row.name].rank, plan.beta) for row in rows},
    }
    return allocated


def _candidate_ranks(row: LayerPlan, min_rank: int, beta: float) -> list[Rank]:
    """Every rank of the row's kind from the lowest allowed up to full."""
    c_out, c_in = row.shape["out"], row.shape["in"]
    if row.kind == "svd":
        return list(range(min(min_rank, c_out, c_in), min(c_out, c_in) + 1))
    ranks, seen = [], set()
    for r in range(1, max(c_in, math.ceil(c_out / beta)) + 1):
        pair = (min(r, c_in), min(math.floor(beta * r), c_out))
        if pair[1] >= 1 and pair not in seen and pair[0] >= min(min_rank, c_in) and pair[1] >= min(min_rank, c_out):
            seen.add(pair)
            ranks.append(pair)
    return ranks


def _options(row: LayerPlan, curve: LayerSensitivity, budget: str, min_rank: int, beta: float) -> list[Option]:
    """The row's ranks that save both parameters and MACs, by increasing cost, then keeping it dense."""
    dense_params, dense_macs = layer_cost("keep", None, row.shape)
    scale = curve.positions if budget == "macs" else 1
    options = []
    for rank in _candidate_ranks(row, min_rank, beta):
        params, macs = layer_cost(row.kind, rank, row.shape, row.stride)
        if params < dense_params and macs < dense_macs:
            options.append(Option(params if budget == "params" else macs * scale, curve.loss(rank), rank))
    options.sort(key=lambda option: (option.cost, option.loss))
    options.append(Option(dense_params if budget == "params" else dense_macs * scale, 0.0, None))
    return options


def _window(row: LayerPlan, curve: LayerSensitivity, rank: Rank, beta: float) -> dict:
    """A JSON record of the layer's sensitivity near its allocated rank, for rank optimization."""
    around = row.rank if rank is None else rank
    low = around if isinstance(around, int) else around[0]
    ranks = [r for r in _candidate_ranks(row, 1, beta)
             if low / SENSITIVITY_WINDOW <= (r if isinstance(r, int) else r[0]) <= low * SENSITIVITY_WINDOW]
    return {"weight": curve.weight, "energy": curve.energy, "positions": curve.positions,
            "ranks": [list(r) if isinstance(r, tuple) else r for r in ranks],
            "loss": [float(f"{curve.loss(r):.5g}") for r in ranks]}
