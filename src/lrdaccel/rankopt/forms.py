"""The execution form of a decomposed layer: chosen by timing, recorded in the plan, applied to a model.

A 1x1 SVDConv2d can run as two 1x1 convs or as one product over channels through a
channels-last view (`SVDConv2d.set_form`): the same weights and math, different kernels. In
eager PyTorch which one is faster depends on the shapes and memory format, so the search times
the "linear" form at the rank it chose and keeps it where it saves more than the noise margin.
Compiled runtimes (inductor, ONNX Runtime) rewrite both into the same kernels, so there the
search leaves the form alone.

A plan row has no field for the form, so the choice lives in the plan's meta
(`plan.meta["rank_optimization"]["forms"]`, layer name -> form) and is saved with the plan;
`apply_forms` sets it on a decomposed model.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from lrdaccel.factorize.ranks import Rank
from lrdaccel.layers import SVDConv2d
from lrdaccel.planning import Plan
from lrdaccel.rankopt.search import Choice

FORMS_KEY = "forms"
LINEAR = "linear"


def linear_form_possible(dense: nn.Module, kind: str, rank: Rank) -> bool:
    """Whether `dense` decomposed as `kind` at `rank` is a 1x1 SVDConv2d that can run as "linear"."""
    if kind != "svd" or not isinstance(dense, nn.Conv2d):
        return False
    return SVDConv2d.like(dense, rank).linear_form_allowed() is None


def choose_form(choice: Choice, measure_form: Callable[[Rank, str], float], min_gain: float) -> Choice:
    """`choice` in the "linear" form where that is faster at its rank by more than `min_gain`
    (a fraction of its time), else unchanged. `measure_form(rank, form)` gives milliseconds."""
    linear_ms = measure_form(choice.rank, LINEAR)
    conv_ms = choice.time_ms
    if linear_ms >= conv_ms * (1 - min_gain):
        choice.reason += f"; as convs ({conv_ms:.3g} ms; one linear over channels-last: {linear_ms:.3g} ms)"
        return choice
    choice.form, choice.time_ms = LINEAR, linear_ms
    choice.reason += (f"; runs as one linear over channels-last ({linear_ms:.3g} ms vs {conv_ms:.3g} ms as convs, "
                      f"{choice.time_original_ms / linear_ms:.2f}x faster than the original)")
    return choice


def plan_forms(plan: Plan) -> dict[str, str]:
    """Layer name -> execution form recorded by `optimize_ranks` (empty when none was chosen)."""
    return dict((plan.meta.get("rank_optimization") or {}).get(FORMS_KEY) or {})


def apply_forms(model: nn.Module, plan: Plan) -> list[str]:
    """Set the execution form the plan records on each decomposed layer of `model`.

    Returns:
        The names of the layers whose form was set.

    Raises:
        ValueError: a named layer is not an SVDConv2d of the model, or cannot take its form;
            nothing is changed then.
    """
    forms = plan_forms(plan)
    layers = {}
    for name, form in forms.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            layer = None
        if not isinstance(layer, SVDConv2d):
            raise ValueError(f"plan form {form!r} for layer {name!r}: the model has no SVDConv2d there "
                             f"(decompose it with this plan first)")
        why = layer.linear_form_allowed() if form == LINEAR else None
        if why is not None or form not in SVDConv2d.FORMS:
            raise ValueError(f"plan form {form!r} for layer {name!r}: {why or 'unknown form'}")
        layers[name] = layer
    for name, layer in layers.items():
        layer.set_form(forms[name])
    return sorted(layers)
