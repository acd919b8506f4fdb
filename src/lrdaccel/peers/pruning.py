"""Structured channel pruning (torch-pruning) at a budget matched to an LRD variant.

    from lrdaccel import peers
    pruned, report = peers.prune(model, example_inputs, params_fraction=0.5)
    pruned, report = peers.prune(model, x, importance="taylor", target_params=n,
                                 loss_fn=peers.labelled_loss([(x, y)]))
    print(report)

The model a user would otherwise get by pruning, built so that the comparison is fair: the same
parameter count (or inference time) as the LRD model it is raced against, found by searching
the pruning ratio, with the stem, the output layers and (in transformers) the residual stream
kept. `prune` returns a pruned copy: the model passed in is never changed, also on error.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch
from torch import nn

from lrdaccel._modules import call_model, kept_modes, unwrap
from lrdaccel._settings import resolve
from lrdaccel.measure.counting import count_params
from lrdaccel.peers._extra import require_peers
from lrdaccel.peers.importance import LossFn, check_loss_fn, describe, make_importance, taylor_gradients
from lrdaccel.peers.prune_config import PruneConfig, PruneReport
from lrdaccel.peers.search import Trial, search_ratio
from lrdaccel.peers.structure import (Structure, analyse, check_supported, excluded_names, excluded_parameters,
                                      trace_options, traceable)
from lrdaccel.peers.timing import seconds_per_call, time_fraction
from lrdaccel.peers.transformer_heads import update_heads


def prune(model: nn.Module, example_inputs: Any, config: PruneConfig | None = None, *, loss_fn: LossFn | None = None,
          exclude: Any = None, **overrides) -> tuple[nn.Module, PruneReport]:
    """A structurally pruned copy of `model` at the budget asked for, and what was done.

    Args:
        model: the model (not changed).
        example_inputs: a batch in the form the model's forward takes (a tensor, a tuple of
            positional args, or a mapping of keyword args such as a tokenizer's output); traced by
            torch-pruning, and timed for a time budget.
        config: a PruneConfig; its fields may also be given as keywords, which override it
            (`prune(model, x, params_fraction=0.5, importance="taylor", loss_fn=...)`).
        loss_fn: `loss_fn(model) -> scalar loss`, for importance "taylor" only (see
            `labelled_loss`).
        exclude: modules whose output width stays: a regex on the full name, a list of names or
            dotted suffixes, a callable (module, name) -> bool, or a module type / tuple of types.

    Returns:
        (pruned copy, PruneReport). The copy keeps the model's training mode and requires_grad
        flags; its attention modules carry their new head counts.

    Raises:
        ImportError: torch-pruning is missing (before any work).
        ValueError: a bad setting naming the value (budget, importance, a target above the
            model's parameters), a model or layer torch-pruning cannot handle, or a budget no
            ratio reaches; the model is unchanged.
    """
    started = time.perf_counter()
    config = resolve(PruneConfig, config, overrides, "prune")
    tp = require_peers("prune")
    model = unwrap(model)
    check_loss_fn(config, loss_fn)
    excluded = excluded_names(model, exclude)
    check_supported(model, excluded)
    before = count_params(model)
    target = _params_target(config, before, type(model).__name__)
    structure = analyse(model, example_inputs, excluded, config.keep_stem, tp)
    grads = taylor_gradients(model, loss_fn) if loss_fn is not None else None

    def build(ratio: float) -> tuple[nn.Module, dict]:
        return pruned_copy(model, example_inputs, ratio, structure, config, grads, tp)

    ratio, value, (pruned, heads), trials = _meet_budget(build, model, example_inputs, config, before, target)
    _check_forward(pruned, example_inputs, type(model).__name__)
    quantity = "latency_fraction" if config.timed else "params"
    return pruned, PruneReport(
        model=type(model).__name__, importance=describe(config), pruning_ratio=ratio, params_before=before,
        params_after=count_params(pruned), target_params=target, latency_fraction=value if config.timed else None,
        seconds=time.perf_counter() - started, kept=dict(structure.kept), heads=heads,
        trials=[{"ratio": t.ratio, quantity: t.value} for t in trials])


def _meet_budget(build: Callable[[float], tuple], model: nn.Module, example_inputs: Any, config: PruneConfig,
                 before: int, target: int | None) -> tuple[float, float, tuple, list[Trial]]:
    """(ratio, its parameters or time fraction, build(ratio), trials): the config's ratio as it is,
    or the one the search finds for a parameter or time budget."""
    if config.pruning_ratio is not None:
        built = build(config.pruning_ratio)
        params = count_params(built[0])
        return config.pruning_ratio, params, built, [Trial(config.pruning_ratio, params)]
    if target is not None:
        return search_ratio(lambda ratio: _measured(build(ratio), count_params), target, config.tolerance, before,
                            config.max_ratio, config.max_trials, "parameters")
    goal = config.latency_fraction
    if goal is None:
        original = seconds_per_call(model, example_inputs, config)
        goal = config.target_latency / original
        if goal >= 1:
            raise ValueError(f"target_latency {config.target_latency!r} s is not below the original's measured "
                             f"{original:.4g} s per call")

    def fraction(pruned: nn.Module) -> float:
        return time_fraction(model, pruned, example_inputs, config)

    return search_ratio(lambda ratio: _measured(build(ratio), fraction), goal, config.latency_tolerance, 1.0,
                        config.max_ratio, config.max_trials, "time fraction")


def _measured(built: tuple, measure: Callable[[nn.Module], float]) -> tuple[float, tuple]:
    return measure(built[0]), built


def pruned_copy(model: nn.Module, example_inputs: Any, ratio: float, structure: Structure, config: PruneConfig,
                grads: dict[str, torch.Tensor] | None, tp) -> tuple[nn.Module, dict[str, tuple[int, int]]]:
    """One deep copy of `model` pruned at `ratio` (channels of every free group, and heads).

    Returns:
        (pruned copy, attention module -> (heads before, heads after)).

    Raises:
        ValueError: torch-pruning failed on the model (its message, with the model and ratio).
    """
    pruned = copy.deepcopy(model)
    flags = {name: parameter.requires_grad for name, parameter in pruned.named_parameters()}
    modules = dict(pruned.named_modules())
    ignored: list = [modules[name] for name in sorted(structure.ignored | structure.excluded)]
    ignored += excluded_parameters(pruned, structure.excluded)
    num_heads = {modules[p]: entry.heads for entry in structure.attention for p in entry.projections}
    if grads is not None:
        for name, parameter in pruned.named_parameters():
            parameter.grad = grads[name].clone()
    try:
        with traceable(pruned):
            pruner = tp.pruner.MetaPruner(
                pruned, example_inputs, importance=make_importance(config, tp), pruning_ratio=ratio,
                global_pruning=config.global_pruning, round_to=config.round_to, ignored_layers=ignored,
                num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=False,
                head_pruning_ratio=min(ratio, structure.max_head_ratio), **trace_options())
            pruner.step()
    except Exception as error:  # torch-pruning raises many kinds
        raise ValueError(f"torch-pruning failed on {type(model).__name__} at pruning ratio {ratio:.4f}: "
                         f"{type(error).__name__}: {error}") from None
    heads = update_heads(pruned, structure.attention)
    for name, parameter in pruned.named_parameters():
        parameter.requires_grad_(flags.get(name, True))
        parameter.grad = None
    return pruned, heads


def _params_target(config: PruneConfig, before: int, model_name: str) -> int | None:
    if config.target_params is not None:
        if config.target_params >= before:
            raise ValueError(f"target_params {config.target_params!r} is not below {model_name}'s {before:,} "
                             f"parameters")
        return config.target_params
    if config.params_fraction is not None:
        return round(config.params_fraction * before)
    return None


def _check_forward(pruned: nn.Module, example_inputs: Any, model_name: str) -> None:
    """The pruned copy must still run: a model whose widths torch-pruning got wrong fails here."""
    try:
        with kept_modes(pruned), torch.no_grad():
            pruned.eval()
            call_model(pruned, example_inputs)
    except Exception as error:
        raise ValueError(f"the pruned {model_name} fails its forward ({type(error).__name__}: {error}); "
                         f"exclude the layers involved") from None
