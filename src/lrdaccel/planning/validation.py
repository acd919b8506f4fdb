"""Does a plan fit a model? Checked before anything reads calibration data or changes a module:
every row names a layer of the right type and shape, every decomposed row a layer that can be
decomposed at that rank and form, every merged row its whole bottleneck, every narrow row its
consumer at a width in [1, n]."""

from __future__ import annotations

from typing import Any

from torch import nn

from lrdaccel.factorize.branched import check_branched_rank
from lrdaccel.layers import LowRankModule, entry_for
from lrdaccel.layers.merged import MergedConv2d
from lrdaccel.layers.registry import dense_shape, layer_class_for
from lrdaccel.planning.rows import LayerPlan, Plan


def validate_plan(model: nn.Module, plan: Plan) -> None:
    """Every row must name a layer of the right type and shape in this model; every decomposed
    row a layer that can be decomposed, on real (not meta) weights; every merged row its whole
    bottleneck, no module of which another row claims.

    Raises:
        ValueError: naming the row and what differs.
    """
    _check_plan_type(plan)
    claimed: dict[str, str] = {}
    for row in plan:
        absorbed = (row.merge.module_names() if row.merge else []) + (row.narrow.module_names() if row.narrow else [])
        for name in [row.name, *absorbed]:
            if name in claimed:
                raise ValueError(f"plan row {row.name!r}: module {name!r} is also claimed by row {claimed[name]!r}")
            claimed[name] = row.name
    for row in plan:
        try:
            module = model.get_submodule(row.name)
        except AttributeError:
            raise ValueError(f"plan row {row.name!r}: the model has no such module; "
                             f"the plan is for another architecture") from None
        if row.reason in ("already decomposed", "already merged"):
            if not isinstance(module, (LowRankModule, MergedConv2d)):
                raise ValueError(f"plan row {row.name!r}: expected a decomposed layer, the model has "
                                 f"{type(module).__name__}")
            continue
        if row.decomposed and isinstance(module, (LowRankModule, MergedConv2d)):
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
        _check_form(model, module, row)


def _check_plan_type(plan: Any) -> None:
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be an lrdaccel Plan (from lrd.plan or Plan.load), got {type(plan).__name__}")


def _check_form(model: nn.Module, module: nn.Module, row) -> None:
    """The row's kind and ranks fit the layer (and, for a merged row, its neighbours)."""
    entry = entry_for(module)
    if row.kind == "narrow":
        why = narrow_check(model, row)
        if why is not None:
            raise ValueError(f"plan row {row.name!r}: {why}")
        convs = [module, model.get_submodule(row.narrow.consumer)]
    elif row.kind == "merged":
        if not isinstance(module, nn.Conv2d):
            raise ValueError(f"plan row {row.name!r}: a merged row must name a Conv2d, got {row.layer_type}")
        why = merged_shape_check(model, row)
        if why is not None:
            raise ValueError(f"plan row {row.name!r}: {why}; the plan is for another architecture")
        r1, r2 = row.rank
        if not (0 < r1 <= row.shape["in"] and 0 < r2 <= row.shape["out"]):
            raise ValueError(f"plan row {row.name!r}: merged ranks must be in [1, {row.shape['in']}] x "
                             f"[1, {row.shape['out']}], got {row.rank}")
        convs = [module] + [model.get_submodule(n) for n in row.merge.convs]
    else:
        if layer_class_for(module, row.kind) is None:
            raise ValueError(f"plan row {row.name!r}: kind {row.kind!r} does not fit a {row.layer_type} "
                             f"with kernel {row.shape['kernel']} (expected {entry.kind!r})")
        if row.kind == "tucker2_branched":
            check_branched_rank(*row.rank, row.branches, row.shape["in"], row.shape["out"], row.name)
        convs = [module]
    for conv in convs:
        why = entry_for(conv).why_not(conv) if entry_for(conv) is not None else "not a supported layer"
        if why is not None:
            raise ValueError(f"plan row {row.name!r}: cannot decompose this layer: {why}")
        if conv.weight.is_meta:
            raise ValueError(f"plan row {row.name!r}: the weights are on the meta device; decompose needs real "
                             f"weights (lrd.plan works on meta, decompose and load do not)")


def merged_shape_check(model: nn.Module, row: LayerPlan) -> str | None:
    """Why `model` cannot take this merged row (its neighbours differ from the plan's), or None."""
    block = row.merge
    checks = [(block.first, block.first_shape, "first"), (block.last, block.last_shape, "last")]
    for name, shape, role in checks:
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            return f"the model has no {role} conv {name!r}"
        if type(conv) is MergedConv2d or not isinstance(conv, nn.Conv2d):
            return f"{role} conv {name!r} is a {type(conv).__name__}, expected an undecomposed Conv2d"
        if dense_shape(conv) != shape:
            return f"{role} conv {name!r} has weight {dense_shape(conv)}, the plan says {shape}"
    if tuple(model.get_submodule(block.first).stride) != tuple(block.first_stride):
        return f"first conv {block.first!r} has another stride than the plan's {block.first_stride}"
    for name, channels in ((block.bn1, row.shape["in"]), (block.bn2, row.shape["out"]),
                           (block.bn3, block.last_shape["out"])):
        if name is None:
            continue
        try:
            bn = model.get_submodule(name)
        except AttributeError:
            return f"the model has no BatchNorm {name!r}"
        if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != channels:
            return f"{name!r} is not a BatchNorm2d over {channels} channels"
    return None


def narrow_check(model: nn.Module, row: LayerPlan) -> str | None:
    """Why `model` cannot take this narrow row (a width out of range, a consumer that differs from
    the plan's), or None."""
    width, n = row.rank, row.shape["out"]
    if not 1 <= width <= n:
        return f"narrow width must be in [1, {n}] (the layer's {n} outputs), got {width}"
    pair = row.narrow
    consumer = _submodule(model, pair.consumer)
    if consumer is None:
        return f"the model has no consumer {pair.consumer!r}; the plan is for another architecture"
    if type(consumer).__name__ != pair.consumer_type or entry_for(consumer) is None:
        return (f"consumer {pair.consumer!r} is a {type(consumer).__name__}, the plan says {pair.consumer_type}; "
                f"the plan is for another architecture")
    if dense_shape(consumer) != pair.consumer_shape or pair.consumer_shape["in"] != n:
        return (f"consumer {pair.consumer!r} has weight {dense_shape(consumer)}, the plan says "
                f"{pair.consumer_shape}; the plan is for another architecture")
    if pair.heads and width % pair.heads:
        return f"narrow width must be a multiple of its {pair.heads} heads, got {width}"
    for name in pair.co_producers:
        layer = _submodule(model, name)
        if layer is None:
            return f"the model has no layer {name!r}; the plan is for another architecture"
        if entry_for(layer) is None or dense_shape(layer)["out"] != n:
            return f"{name!r} is not a layer with {n} outputs; the plan is for another architecture"
    for name in pair.resized:
        module = _submodule(model, name)
        if module is None:
            return f"the model has no module {name!r} to resize; the plan is for another architecture"
        norm = isinstance(module, nn.BatchNorm2d) and module.num_features == n
        depthwise = isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels == n
        if not (norm or depthwise):
            return (f"{name!r} is neither a BatchNorm2d nor a depthwise conv over {n} channels; the plan is for "
                    f"another architecture")
    return None


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    """The named module, or None where the model has none (a plan for another architecture)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
