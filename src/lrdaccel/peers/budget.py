"""The budget a peer is matched to: the parameters of the LRD variant it races.

A pruned model matched "to LRD ratio 2" must have the whole-model parameter count that
`lrd.decompose(model, ratio=2)` gives, not the candidate layers' total of `plan.totals()`:
embeddings, norms, biases and kept layers count too. The decomposed modules are built with
empty factors (no SVD is run) and counted; the model is not changed.
"""

from __future__ import annotations

from torch import nn

from lrdaccel.decomposition.build import build_modules
from lrdaccel.measure.counting import count_params
from lrdaccel.planning import Plan, plan as make_plan


def lrd_params(model: nn.Module, plan: Plan | float) -> int:
    """Every parameter `model` would have after `lrd.decompose(model, plan)`.

    Args:
        model: the undecomposed model (not changed).
        plan: an lrd Plan for it, or a ratio (`lrd.plan(model, ratio=...)`).

    Raises:
        ValueError: a plan for another architecture or a bad ratio (from lrd.plan / the plan check).
    """
    if not isinstance(plan, Plan):
        plan = make_plan(model, ratio=plan)
    built = build_modules(model, plan, factorize=False)
    replaced = sum(count_params(model.get_submodule(name)) for name in built)
    return count_params(model) - replaced + sum(count_params(module) for module in built.values())
