"""The execution form of a decomposed layer, as a plan records it and a model applies it.

A 1x1 SVDConv2d can run as two 1x1 convs or as one product over channels through a
channels-last view (`SVDConv2d.set_form`): the same weights and math, different kernels.
Rank optimization chooses the form by timing (lrdaccel.rankopt.forms). A plan row has no field
for it, so the choice lives in the plan's meta (`plan.meta["rank_optimization"]["forms"]`, layer
name -> form) and is saved with the plan; `lrd.decompose` and `lrd.load` apply it with
`apply_forms`.
"""

from __future__ import annotations

from torch import nn

from lrdaccel.layers import SVDConv2d
from lrdaccel.planning.rows import Plan

FORMS_KEY = "forms"
LINEAR = "linear"


def plan_forms(plan: Plan) -> dict[str, str]:
    """Layer name -> execution form recorded by `optimize_ranks` (empty when none was chosen)."""
    return dict((plan.meta.get("rank_optimization") or {}).get(FORMS_KEY) or {})


def forms_meta(model: nn.Module) -> dict:
    """The plan meta that records the non-default execution forms of `model`'s layers (for a
    plan read off a decomposed model, as `lrd.save` writes)."""
    forms = {name: m.form for name, m in model.named_modules() if isinstance(m, SVDConv2d) and m.form != "conv"}
    return {"rank_optimization": {FORMS_KEY: forms}} if forms else {}


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
