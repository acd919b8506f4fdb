"""The budget a peer is matched to: the parameters of the LRD variant it races, and the fewest
parameters pruning can reach at all (so that a budget below it is refused before any work).

A pruned model matched "to LRD ratio 2" must have the whole-model parameter count that
`lrd.decompose(model, ratio=2)` gives, not the candidate layers' total of `plan.totals()`:
embeddings, norms, biases and kept layers count too. The decomposed modules are built with
empty factors (no SVD is run) and counted; the model is not changed.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lrdaccel.decomposition.build import build_modules
from lrdaccel.measure.counting import count_params
from lrdaccel.peers.prune_config import PruneConfig
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


def pruning_floor(model: nn.Module, example_inputs: Any, exclude: Any = None) -> int:
    """The fewest parameters `peers.prune(model, ...)` can leave: the model pruned once at the
    search's largest ratio (`PruneConfig.max_ratio`), with the layers pruning keeps whole
    (embeddings and the residual stream of a transformer, the stem, the output layers, `exclude`)
    as they are. One pruned copy is built and counted; the model is not changed.

    Raises:
        ImportError: torch-pruning is missing; ValueError: as `peers.prune`.
    """
    from lrdaccel.peers.pruning import prune  # pruning needs torch-pruning, the budgets above do not

    pruned, _ = prune(model, example_inputs, pruning_ratio=PruneConfig.max_ratio, exclude=exclude)
    return count_params(pruned)
