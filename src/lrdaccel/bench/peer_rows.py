"""The peers' rows of the paper table: what a user would pick instead of LRD, at LRD's budget.

Channel pruning (`lrdaccel.peers.prune`: torch-pruning, magnitude importance, the stem and the
classifier kept) is searched until the pruned model has the whole-model parameters of an LRD
plan the table measures (`peers.lrd_params`), so the table compares two ways of spending the
same parameters, measured side by side with the other rows in every runtime. As for the
decomposed rows the weights are random: which channels go depends on the values, how many (the
same fraction of every group) and so the speed does not.

A pruned model is built once per parameter target and shared by the runtimes' tables, like the
original. A model torch-pruning cannot prune (GPT-2's Conv1D, a fused attention) gets no row: a
note says why, and the rest of the table runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lrdaccel._extras import MissingDependency
from lrdaccel.bench.config import Variant
from lrdaccel.measure.steps import Placement
from lrdaccel.peers import lrd_params, prune
from lrdaccel.planning import Plan

TOLERANCE = 0.02  # peers.prune's default: parameters within 2% of the target count as matched
MATCHED_ROW = {"ratio": "LRD (ratio ranks)", "optimized": "LRD + rank optimization"}


@dataclass
class PeerModel:
    """A peer row's model and what was done to build it, or why it has none.

    Attributes:
        model: the pruned model (placed), None where there is no row.
        info: for the results row: kind, importance, the LRD row matched, target and reached
            parameters, pruning ratio, seconds the search took, layers kept and why, attention
            heads before and after (transformers).
        note: why there is no row (the table prints it), None where there is one.
    """

    model: nn.Module | None = None
    info: dict | None = None
    note: str | None = None


class PeerModels:
    """The peer models of one model's tables, built on demand and kept by parameter target."""

    def __init__(self, original: nn.Module, inputs, placement: Placement, ratio_plan: Plan):
        self.original, self.inputs, self.placement = original, inputs, placement
        self.ratio_target = lrd_params(original, ratio_plan)
        self._pruned: dict[int, tuple[nn.Module | None, object]] = {}  # target -> (model, report) or (None, error)

    def build(self, variant: Variant, plan: Plan) -> PeerModel:
        """The model of `variant` (a peer row), matched to the whole-model parameters of `plan`."""
        target = self.ratio_target if variant.plan == "ratio" else lrd_params(self.original, plan)
        matched = MATCHED_ROW[variant.plan]
        if variant.plan != "ratio" and abs(target - self.ratio_target) <= TOLERANCE * self.ratio_target:
            return PeerModel(note=f"{variant.label}: the same as the row at LRD's parameters ({matched} has "
                                  f"{target:,} parameters, LRD (ratio ranks) {self.ratio_target:,}: within "
                                  f"{TOLERANCE:.0%})")
        if target not in self._pruned:
            self._pruned[target] = self._prune(target)
        model, outcome = self._pruned[target]
        if model is None:
            return PeerModel(note=f"{variant.label}: n/a, {outcome}")
        report = outcome
        return PeerModel(model=model, info={
            "kind": variant.peer, "importance": report.importance, "matched_to": matched, "target_params": target,
            "params": report.params_after, "pruning_ratio": report.pruning_ratio, "seconds": round(report.seconds, 2),
            "trials": len(report.trials), "kept": dict(report.kept),
            **({"heads": [sum(b for b, _ in report.heads.values()), sum(a for _, a in report.heads.values())]}
               if report.heads else {})})

    def _prune(self, target: int) -> tuple[nn.Module | None, object]:
        try:
            pruned, report = prune(self.original, self.inputs, target_params=target, importance="magnitude",
                                   tolerance=TOLERANCE)
        except MissingDependency:
            raise  # checked by BenchConfig before any work; never a note
        except ValueError as error:  # a model or layer torch-pruning cannot handle, a budget no ratio reaches
            return None, " ".join(str(error).split())
        return self.placement.place_model(pruned), report
