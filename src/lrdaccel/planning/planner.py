"""`plan()`: which layers to decompose, at which ranks, and why, without touching the model.

Every candidate layer (Linear, HF Conv1D, Conv2d, subclasses included) gets a row; a layer that
is not decomposed is `kind="keep"` with the first reason that applies, in this order: excluded or
not included by the user, rejected by `filter_fn`, an instance that cannot be decomposed (its own
forward, a parametrized weight, a grouped conv), a weight its parent reads directly, a weight or
bias shared with another module; then explicit ranks, or the ratio's rank unless it falls below
`min_rank` or would not reduce MACs. Weight layers of unsupported types (Conv1d, Conv3d,
transposed convs, lazy modules, embeddings, ...) get a kept row with the reason too.

With `branches=N` every Tucker-2 row becomes "tucker2_branched" (core as a grouped conv of N
branches) at the ratio's branched ranks. With `merge=True` (and example inputs to trace one
forward) every bottleneck found by lrdaccel.planning.merging becomes one "merged" row at its
k x k conv's ratio ranks, in place of the rows of its three convs; a candidate that cannot merge
keeps its rows, the k x k conv's row saying why in `merge_skipped`. With `form="narrow"` (and
example inputs) every `layer -> activation -> layer` width found by lrdaccel.planning.narrow
becomes one "narrow" row named by its producer, keeping 1/ratio of the pair's weights; every other
layer is kept, a width that cannot narrow saying why.

Example:
    >>> import torch, lrdaccel as lrd
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    >>> p = lrd.plan(model, ratio=2.0)
    >>> [(row.name, row.kind, row.rank) for row in p]
    [('0', 'svd', 16), ('2', 'keep', None)]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import nn

from lrdaccel._modules import direct_reader, unwrap, weight_owners
from lrdaccel._settings import check_choice, check_int, check_number, resolve
from lrdaccel.factorize.branched import branched_full_rank, branched_ranks, check_branched_rank
from lrdaccel.factorize.ranks import Rank, below_min_rank, check_ratio, full_rank, ratio_rank, tucker_pair
from lrdaccel.layers import LowRankModule, entry_for
from lrdaccel.layers.merged import MergedConv2d
from lrdaccel.layers.registry import dense_shape, unsupported_reason, weight_shape
from lrdaccel.planning.allocation import ALLOCATIONS, BUDGETS, allocate_ranks
from lrdaccel.planning.merging import MergeCandidate, find_merge_candidates
from lrdaccel.planning.narrow import find_narrow_candidates, narrow_rows
from lrdaccel.planning.rows import LayerPlan, Plan
from lrdaccel.planning.sensitivity import SENSITIVITIES
from lrdaccel.planning.targeting import Selector, compile_selector, resolve_per_layer

FORMS = ("factor", "narrow")


@dataclass
class PlanConfig:
    """How to plan a decomposition.

    Attributes:
        ratio: per-layer compression ratio, original weight params / decomposed; > 1.
        ratios: per-layer ratios by exact name or dotted suffix, overriding `ratio`.
        ranks: explicit ranks by name or suffix (int, or (rank_in, rank_out) for Tucker-2), or
            "full" for every candidate at full rank (an exact re-parametrisation, for checks).
            Explicit ranks are honoured even where they do not save MACs.
        include / exclude: a full regex on the module name, a list of names or dotted suffixes,
            or a callable (module, name) -> bool. Exclusion wins.
        filter_fn: an extra callable (module, name) -> bool every decomposed layer must pass.
        min_rank: a layer whose ratio rank falls below this (or below its channel count, where
            that is smaller) is kept: it saves few parameters and loses much, like a 1-channel
            image stem at Tucker ranks (1, 2). Explicit `ranks` are exempt.
        beta: Tucker-2 rank_out / rank_in.
        branches: Tucker-2 cores as grouped convs of this many branches ("tucker2_branched" rows,
            ranks multiples of it); 1 is plain Tucker-2.
        merge: merge each bottleneck (1x1 conv -> BN -> act -> k x k conv -> BN -> act -> 1x1 conv)
            into three narrower convs ("merged" rows); needs example_inputs to trace the model.
        allocate: None (one ratio for every layer) or "sensitivity": the layers the ratio would
            decompose keep together 1/ratio of their cost, spent by measured sensitivity
            (lrdaccel.planning.allocation); needs calibration batches.
        budget: what allocation keeps 1/ratio of: "params" (weight parameters) or "macs"
            (multiply-accumulates per forward of the calibration batches).
        form: "factor" (SVD / Tucker-2 factors, merged bottlenecks) or "narrow": the width between
            a layer and its consumer through an elementwise activation keeps 1/ratio of the pair's
            weights, the rest of the model is kept (needs example_inputs to trace the model; at
            `lrd.decompose`, calibration batches to choose the channels and refit the consumer).
        sensitivity: "fisher" (truncation loss weighted by the output's gradient: the task loss
            where labels are given, distillation to the original otherwise) or "output" (relative
            truncation loss of each layer alone, forward only).
    """

    ratio: float = 2.0
    ratios: Mapping[str, float] | None = None
    ranks: Mapping[str, Rank] | str | None = None
    include: Selector = None
    exclude: Selector = None
    filter_fn: Callable[[nn.Module, str], bool] | None = None
    min_rank: int = 8
    beta: float = 1.0
    branches: int = 1
    merge: bool = False
    allocate: str | None = None
    budget: str = "params"
    sensitivity: str = "fisher"
    form: str = "factor"

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_int("min_rank", self.min_rank, 1)
        check_number("beta", self.beta, above=0)
        check_int("branches", self.branches, 1)
        if not isinstance(self.merge, bool):
            raise ValueError(f"merge must be True or False, got {self.merge!r}")
        if self.allocate is not None:
            check_choice("allocate", self.allocate, ALLOCATIONS)
            if self.branches > 1 or self.merge:
                raise ValueError("allocate='sensitivity' allocates SVD and Tucker-2 ranks; it does not combine "
                                 "with branches > 1 or merge=True")
        check_choice("budget", self.budget, BUDGETS)
        check_choice("sensitivity", self.sensitivity, SENSITIVITIES)
        check_choice("form", self.form, FORMS)
        if self.form == "narrow" and (self.merge or self.branches > 1 or self.allocate is not None):
            raise ValueError("form='narrow' does not combine with merge=True, branches > 1 or allocate")
        if isinstance(self.ratios, Mapping):
            for name, value in self.ratios.items():
                check_ratio(value, f"ratios[{name!r}]")


def plan(model: nn.Module, ratio: float | None = None, *, example_inputs: Any = None,
         config: PlanConfig | None = None, calibration: Any = None, labels: Any = None, **settings: Any) -> Plan:
    """Plan the decomposition of `model` without changing it.

    Args:
        model: the trained model (DDP / torch.compile wrappers are looked through).
        ratio: shorthand for `ratio=` of the config.
        example_inputs: a tensor, tuple or dict for the model (a batch of one is enough); needed by
            merge=True, which traces one forward to find the bottlenecks.
        config: a PlanConfig; keyword `settings` (its field names) override its fields.
        calibration: unlabeled batches for allocate="sensitivity" (each called as model(batch),
            model(*tuple) or model(**dict)).
        labels: optional class labels per calibration batch: the Fisher weight then uses the
            task loss.

    Raises:
        ValueError: ratio <= 1, a bad rank, an unknown setting, a name pattern that matches no
            candidate, merge=True or form="narrow" without example_inputs (or inputs the model
            fails on), a narrow width out of [1, n],
            allocate="sensitivity" without calibration, or calibration without it.
    """
    if ratio is not None:
        settings["ratio"] = ratio
    config = resolve(PlanConfig, config, settings, "plan")
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise ValueError(f"plan: model must be a torch.nn.Module, got {type(model).__name__}")
    if config.merge and example_inputs is None:
        raise ValueError("plan: merge=True needs example_inputs (a batch for the model): the bottlenecks to "
                         "merge are found by tracing one forward")
    if config.form == "narrow" and example_inputs is None:
        raise ValueError("plan: form='narrow' needs example_inputs (a batch for the model): the widths to "
                         "narrow are found by tracing one forward")
    candidates, already, unsupported = _candidates(model)
    names = [name for name, _ in candidates]
    context = _Context(model, config, names)
    rows = [LayerPlan(name, "keep", None, f"already {'merged' if isinstance(m, MergedConv2d) else 'decomposed'}",
                      type(m).__name__, dense_shape(m if isinstance(m, MergedConv2d) else m.to_dense()))
            for name, m in already]
    rows += [LayerPlan(name, "keep", None, reason, type(m).__name__, weight_shape(m), supported=False)
             for name, m, reason in unsupported]
    rows += [context.row(name, module) for name, module in candidates]
    if config.merge:
        rows = _merge(context, rows, find_merge_candidates(model, example_inputs))
    if config.form == "narrow":
        rows = narrow_rows(context, rows, find_narrow_candidates(model, example_inputs))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    rows.sort(key=lambda row: order[row.name])
    result = Plan(rows, ratio=config.ratio, beta=config.beta, meta={"model": type(model).__name__})
    if config.allocate is None:
        if calibration is not None or labels is not None:
            raise ValueError("plan: calibration and labels are only used by allocate='sensitivity'")
        return result
    if calibration is None:
        raise ValueError("plan: allocate='sensitivity' needs calibration batches (calibration=loader_or_list)")
    return allocate_ranks(model, result, calibration, ratio=config.ratio, budget=config.budget,
                          sensitivity=config.sensitivity, labels=labels, min_rank=config.min_rank)


def _merge(context: "_Context", rows: list[LayerPlan], candidates: list[MergeCandidate]) -> list[LayerPlan]:
    """Replace the rows of each mergeable bottleneck by one merged row; note why others are not."""
    by_name = {row.name: row for row in rows}
    taken: dict[str, str] = {}  # conv name -> the merged row that absorbed it
    for candidate in candidates:
        convs = (candidate.first, candidate.middle, candidate.last)
        if any(name not in context.names for name in convs):
            continue  # part of an already decomposed or merged layer: not a candidate any more
        merged, why = None, candidate.reason
        if why is None:
            clash = next((name for name in convs if name in taken), None)
            if clash is not None:
                why = f"{clash} is already merged into the block of {taken[clash]}"
        if why is None:
            merged, why = context.merged_row(candidate, by_name[candidate.middle])
        if merged is None:
            if candidate.middle in by_name:
                by_name[candidate.middle] = dataclasses.replace(by_name[candidate.middle], merge_skipped=why)
            continue
        by_name[candidate.middle] = merged
        for name in (candidate.first, candidate.last):
            del by_name[name]
        taken.update({name: candidate.middle for name in convs})
    return list(by_name.values())


class _Context:
    """What the rules need about the whole model, resolved once."""

    def __init__(self, model: nn.Module, config: PlanConfig, names: list[str]):
        self.model, self.config, self.names = model, config, set(names)
        self.included = compile_selector(config.include, "include", names)
        self.excluded = compile_selector(config.exclude, "exclude", names)
        self.ratios = resolve_per_layer("ratios", config.ratios, names)
        self.full_rank = config.ranks == "full"
        self.ranks = {} if self.full_rank else resolve_per_layer("ranks", config.ranks, names)
        self.owners = weight_owners(model)

    def kept_because(self, name: str, module: nn.Module) -> str | None:
        """The first reason this layer stays as it is, or None."""
        filter_fn = self.config.filter_fn
        if self.excluded is not None and self.excluded(module, name):
            return "excluded by user"
        if self.included is not None and not self.included(module, name):
            return "not in include"
        if filter_fn is not None and not filter_fn(module, name):
            return "rejected by filter_fn"
        why = entry_for(module).why_not(module)
        if why is not None:
            return why
        reader = direct_reader(self.model, name)
        if reader is not None:
            return f"weight read directly by parent {reader}"
        for what in ("weight", "bias"):
            tensor = getattr(module, what)
            sharers = [] if tensor is None else [o for o in self.owners.get(id(tensor), []) if o != name]
            if sharers:
                return f"{what} shared with {', '.join(sharers)}"
        return None

    def row(self, name: str, module: nn.Module) -> LayerPlan:
        entry = entry_for(module)
        shape = dense_shape(module)
        stride = tuple(module.stride) if isinstance(module, nn.Conv2d) else (1, 1)
        layer_type = type(module).__name__

        def keep(reason: str, supported: bool = True) -> LayerPlan:
            return LayerPlan(name, "keep", None, reason, layer_type, shape, stride, supported=supported)

        why = self.kept_because(name, module)
        if why is not None:
            return keep(why, supported=entry.why_not(module) is None)
        branches = self.config.branches if entry.kind == "tucker2" else 1
        kind = "tucker2_branched" if branches > 1 else entry.kind
        if self.config.merge and entry.kind == "svd" and isinstance(self.ranks.get(name), (tuple, list)):
            # A rank pair on a 1x1 conv only makes sense as the inner conv of a merged block.
            return keep(f"rank pair {tuple(self.ranks[name])} set for a merged block")
        if (self.full_rank or name in self.ranks) and self.config.form != "narrow":  # narrow widths: narrow_rows
            rank = self._explicit_rank(name, module, entry.kind, shape, branches)
            reason = "full rank" if self.full_rank else "rank set by user"
            return LayerPlan(name, kind, rank, reason, layer_type, shape, stride, ratio_rank=rank, branches=branches)
        layer_ratio = self.ratios.get(name, self.config.ratio)
        if branches > 1:
            rank = branched_ranks(shape["in"], shape["out"], math.prod(shape["kernel"]), layer_ratio, branches,
                                  self.config.beta)
        else:
            rank = ratio_rank(entry.kind, shape, layer_ratio, self.config.beta)
        min_rank = self.config.min_rank
        if below_min_rank(rank, shape, min_rank):
            return keep(f"ratio {layer_ratio:g} gives rank {rank}, below min_rank {min_rank}")
        row = LayerPlan(name, kind, rank, f"ratio {layer_ratio:g}", layer_type, shape, stride, ratio_rank=rank,
                        branches=branches)
        if row.macs_after >= row.macs_before:
            return row.with_rank(None, f"rank {rank} does not reduce MACs "
                                       f"({row.macs_after:,} >= {row.macs_before:,} per position)", kind="keep")
        return row

    def _explicit_rank(self, name: str, module: nn.Module, kind: str, shape: dict, branches: int) -> Rank:
        """The full or user-given rank of a layer, checked against its shape."""
        if self.full_rank:
            return branched_full_rank(shape["in"], shape["out"], branches) if branches > 1 else full_rank(kind, shape)
        rank = self.ranks[name]
        if branches > 1:
            rank = tuple(rank) if isinstance(rank, (tuple, list)) else (rank, rank)
            check_branched_rank(*rank, branches, shape["in"], shape["out"], name)
            return rank
        entry_for(module).layer_class.like(module, rank, name)  # validates the rank against the shape
        return tucker_pair(rank, name, shape["in"], shape["out"]) if kind == "tucker2" else rank

    def merged_row(self, candidate: MergeCandidate, middle_row: LayerPlan) -> tuple[LayerPlan | None, str]:
        """The merged row of a structurally mergeable bottleneck, or (None, why not)."""
        for role, name in (("first", candidate.first), ("inner", candidate.middle), ("last", candidate.last)):
            why = self.kept_because(name, self.model.get_submodule(name))
            if why is not None:
                return None, f"{role} conv {name} is kept: {why}"
        name, shape = candidate.middle, middle_row.shape
        if self.full_rank:
            rank, reason = (shape["in"], shape["out"]), "full rank"
        elif name in self.ranks:
            rank, reason = tucker_pair(self.ranks[name], name, shape["in"], shape["out"]), "rank set by user"
        else:
            layer_ratio = self.ratios.get(name, self.config.ratio)
            rank, reason = ratio_rank("tucker2", shape, layer_ratio, self.config.beta), f"ratio {layer_ratio:g}"
            if below_min_rank(rank, shape, self.config.min_rank):
                return None, f"{reason} gives ranks {rank}, below min_rank {self.config.min_rank}"
        block = candidate.block(self.model)
        row = LayerPlan(name, "merged", rank, f"{reason}; merged with {block.first} and {block.last}",
                        middle_row.layer_type, shape, middle_row.stride, ratio_rank=rank, merge=block)
        if row.macs_after >= row.macs_before and reason.startswith("ratio"):
            return None, f"ranks {rank} do not reduce the block's MACs ({row.macs_after:,} >= {row.macs_before:,})"
        return row, ""


def _candidates(model: nn.Module) -> tuple[list, list, list]:
    """(dense candidate layers, already-decomposed layers, weight layers of unsupported types
    with the reason); nothing inside a decomposed layer counts."""
    candidates, already, unsupported = [], [], []
    inside = None  # named_modules is depth-first: skip the factors of the last low-rank module
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if isinstance(module, (LowRankModule, MergedConv2d)):
            already.append((name, module))
            inside = name + "."
        elif not name:
            continue
        elif entry_for(module) is not None:
            candidates.append((name, module))
        elif (reason := unsupported_reason(module)) is not None:
            unsupported.append((name, module, reason))
    return candidates, already, unsupported
