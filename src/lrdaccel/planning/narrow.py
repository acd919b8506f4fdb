"""Finding narrowable widths: `producer -> elementwise activation -> consumer` in the data flow of
one recorded forward (lrdaccel.planning.dataflow), and why each near miss cannot narrow. The
producer and consumer are both Linear / HF Conv1D, or both Conv2d; between two convs the region
may also hold BatchNorms, depthwise convs (an MBConv's expanded channels: cut with the width) and
per-channel pooling.

Keeping k of the n channels between two layers and refitting the consumer (the narrow form,
lrdaccel.factorize.narrow) is exact for the producer only if every op between them acts on each
channel alone: then dropping a channel of the producer's output drops the same channel after the
activation. So from each Linear / HF Conv1D call the walk follows the ops that read its result:
elementwise ops (activations, `x * 0.5`, `pow`, `tanh`, ... as GPT-2's composed GELU does), dropout
and views that keep the channel as the last dimension form the region; a Linear / Conv1D that
reads the region is the consumer. A region with an activation is a candidate, whatever its
modules are called; it narrows only if nothing else reads the producer's output or the region
(a residual add, a second head, an op that mixes channels), exactly one layer of the width's size
reads it (for convs: not a grouped one), and neither layer nor the BatchNorm is called twice.
Otherwise `reason` says which rule failed (its activation read elsewhere, a residual add on the
width, a grouped consumer, ...).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from torch import nn

from lrdaccel.factorize.ranks import below_min_rank
from lrdaccel.layers import entry_for
from lrdaccel.layers.registry import dense_shape
from lrdaccel.planning.dataflow import ACTIVATIONS, PASS_THROUGH, Op, trace_ops
from lrdaccel.planning.narrow_heads import find_head_candidates
from lrdaccel.planning.pairs import NarrowPair
from lrdaccel.planning.rows import LayerPlan

# Ops that act on each channel alone (with scalars or broadcast constants) and views that keep the
# channel last: a channel selection commutes with them.
ELEMENTWISE = ACTIVATIONS | PASS_THROUGH | frozenset({
    "mul", "mul_", "add", "add_", "sub", "sub_", "div", "div_", "pow", "neg", "erf", "exp", "sqrt", "abs",
    "clamp", "clamp_", "clamp_min", "softplus", "__mul__", "__rmul__", "__add__", "__radd__", "__sub__",
    "__rsub__", "__truediv__", "__pow__", "to", "float", "type_as", "view", "reshape"})
# Per-channel spatial ops between convs (padding, pooling).
POOLS = frozenset({"pad", "constant_pad_nd", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
                   "adaptive_max_pool2d", "max_pool2d_with_indices"})
MAX_REGION = 64  # ops walked from one producer


@dataclass
class NarrowCandidate:
    """One width `producer -> region -> consumer`, by module name.

    Attributes:
        producer / consumer: the layers whose outputs / inputs shrink (consumer None if none was found).
        width: the producer's output width n.
        activation: the names of the region's ops, in execution order ("gelu"; "mul, pow, ... tanh").
        resized: the BatchNorms and depthwise convs in the region (between convs), in order.
        depthwise_area: the kernel area of its depthwise convs, summed.
        reason: None if the width can narrow as far as the structure goes, else why not.
    """

    producer: str
    consumer: str | None
    width: int
    activation: str
    resized: tuple[str, ...] = ()
    depthwise_area: int = 0
    reason: str | None = None
    co_producers: tuple[str, ...] = ()
    heads: int = 0
    attention: str = ""


def find_narrow_candidates(model: nn.Module, example_inputs: Any) -> list[NarrowCandidate]:
    """Every `layer -> activation -> layer` width of `model`, in execution order, each with its
    reason or None.

    Raises:
        ValueError: the model fails on the example inputs.
    """
    ops = trace_ops(model, example_inputs)
    modules = dict(model.named_modules())
    calls = Counter(op.module for op in ops if op.module is not None)
    found = []
    for op in ops:
        producer = modules.get(op.module) if op.kind in ("linear", "conv") else None
        if producer is None or entry_for(producer) is None or getattr(producer, "groups", 1) != 1:
            continue  # a grouped / depthwise conv is no producer: its outputs are tied to its inputs
        candidate = _walk(ops, op, dense_shape(producer)["out"], op.kind, modules)
        if candidate is not None:
            candidate.reason = candidate.reason or _module_reason(candidate, modules, calls)
            found.append(candidate)
    for head in find_head_candidates(ops, modules, calls):  # attention: each head keeps fewer dimensions
        if head["producer"] is not None:
            found.append(NarrowCandidate(head["producer"], head["consumer"], head["heads"] * head["head_size"],
                                         "attention", reason=head["reason"], co_producers=head["co_producers"],
                                         heads=head["heads"], attention=head["attention"]))
    return found


def _walk(ops: list[Op], start: Op, width: int, kind: str, modules: dict[str, nn.Module]) -> NarrowCandidate | None:
    """The region after `start` and what reads it; None where no activation lies on the way."""
    region, queue, consumers, outside = {start.index}, [start], [], []
    per_channel = ELEMENTWISE | (POOLS if kind == "conv" else frozenset())

    def channels(op: Op) -> int | None:
        return op.shape[-1] if kind == "linear" and op.shape else (op.shape[1] if len(op.shape) == 4 else None)

    while queue and len(region) < MAX_REGION:
        node = queue.pop(0)
        for reader in (ops[i] for i in node.readers):
            if reader.index in region:
                continue
            if reader.kind == "conv" and _is_depthwise(modules.get(reader.module), width):
                region.add(reader.index)
                queue.append(reader)
            elif reader.kind == kind and reader.inputs == [node.index]:
                consumers.append(reader)
            elif (reader.name in per_channel or (kind == "conv" and reader.kind == "bn")) and channels(reader) == width:
                region.add(reader.index)
                queue.append(reader)
            else:
                outside.append(reader)
    inner = [ops[i] for i in sorted(region - {start.index})]
    if not any(op.kind == "act" for op in inner):
        return None
    strays = [(op, ops[i]) for op in inner for i in op.inputs if i not in region]
    reasons = []
    if outside:
        reasons.append(f"the activation after {start.module} is also read by "
                       f"{', '.join(sorted({op.describe() for op in outside}))}")
    if strays:
        reasons.append(f"the activation after {start.module} is combined with "
                       + ", ".join(f"{other.describe()} by {op.name} (op {op.index})" for op, other in strays))
    names = sorted({op.module for op in consumers})
    if len(names) > 1:
        reasons.append(f"the activation after {start.module} is read by several layers ({', '.join(names)})")
    resized = tuple(op.module for op in inner if op.kind in ("bn", "conv"))
    area = sum(math.prod(modules[op.module].kernel_size) for op in inner if op.kind == "conv")
    shown = [op.describe() if op.kind in ("bn", "conv") else op.name for op in inner
             if op.kind != "pass" and op.name not in ("view", "reshape")]
    return NarrowCandidate(start.module, names[0] if names else None, width, ", ".join(shown), resized, area,
                           "; ".join(reasons) or None)


def _is_depthwise(module: nn.Module | None, width: int) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels == width


def _module_reason(candidate: NarrowCandidate, modules: dict[str, nn.Module], calls: Counter) -> str | None:
    if candidate.consumer is None:
        return f"no layer reads the activation after {candidate.producer}"
    consumer = modules[candidate.consumer]
    if entry_for(consumer) is None:
        return f"its consumer {candidate.consumer} is a {type(consumer).__name__}"
    if dense_shape(consumer)["in"] != candidate.width:
        return f"its consumer {candidate.consumer} reads {dense_shape(consumer)['in']} inputs, not {candidate.width}"
    if getattr(consumer, "groups", 1) != 1:
        return f"its consumer {candidate.consumer} is a grouped conv (groups={consumer.groups})"
    for name in candidate.resized:
        norm = modules.get(name)
        if not isinstance(norm, nn.Conv2d) and not (isinstance(norm, nn.BatchNorm2d) and norm.affine
                                                    and norm.track_running_stats):
            return f"{name} is not a BatchNorm2d with affine parameters and running statistics"
    for name in (candidate.producer, candidate.consumer, *candidate.resized):
        if name is not None and calls[name] > 1:
            return f"{name} is called {calls[name]} times (shared weights)"
    return None


def narrow_rows(context: Any, rows: list[LayerPlan], candidates: list[NarrowCandidate]) -> list[LayerPlan]:
    """The plan's rows with each narrowable width as one "narrow" row (named by its producer, the
    consumer's row absorbed) and every other changed row kept: form="narrow" changes widths only.

    `context` is the planner's (kept_because, names, ratios, ranks, full_rank, config).

    Raises:
        ValueError: an explicit width out of [1, n], naming the layer.
    """
    by_name = {row.name: row for row in rows}
    taken: dict[str, str] = {}
    narrowed = set()
    for candidate in candidates:
        producer, consumer = candidate.producer, candidate.consumer
        if producer not in by_name or producer in narrowed:
            continue  # already decomposed, or absorbed as the consumer of an earlier width
        why = candidate.reason or _clash([producer, consumer, *candidate.co_producers], taken)
        if why is None and consumer not in by_name:
            why = f"its consumer {consumer} is already decomposed or merged"
        if why is None:
            why = next((f"{name} is kept: {reason}" for name in (producer, consumer, *candidate.co_producers)
                        if (reason := context.kept_because(name, context.model.get_submodule(name)))), None)
        if why is None:
            row, why = _narrow_row(context, candidate, by_name[producer], by_name[consumer])
        if why is not None:
            by_name[producer] = by_name[producer].with_rank(None, f"not narrowed: {why}", kind="keep")
            continue
        by_name[producer] = row
        for name in (consumer, *candidate.resized, *candidate.co_producers):  # rows of their own go
            by_name.pop(name, None)
        narrowed.add(producer)
        taken.update({name: producer for name in (producer, consumer, *candidate.co_producers)})
    for name, row in by_name.items():
        if row.kind not in ("keep", "narrow"):
            by_name[name] = row.with_rank(None, "form 'narrow' changes only the width between a layer and its "
                                                "consumer", kind="keep")
    return list(by_name.values())


def _clash(names: list[str], taken: dict[str, str]) -> str | None:
    for name in names:
        if name in taken:
            return f"{name} is already narrowed with {taken[name]}"
    return None


def _narrow_row(context: Any, candidate: NarrowCandidate, producer_row: LayerPlan,
                consumer_row: LayerPlan) -> tuple[LayerPlan | None, str | None]:
    """The narrow row at the planned width, or (None, why not)."""
    name, n, heads = candidate.producer, candidate.width, max(candidate.heads, 1)
    if context.full_rank:
        width, reason = n, "full width"
    elif name in context.ranks:
        width, reason = context.ranks[name], "width set by user"
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= n or width % heads:
            what = f"a multiple of its {heads} heads " if heads > 1 else "an int "
            raise ValueError(f"plan: narrow width of {name!r} must be {what}in [1, {n}], got {width!r}")
    else:
        ratio = context.ratios.get(name, context.config.ratio)
        per_head = math.floor(n // heads / ratio)
        width, reason = per_head * heads, f"ratio {ratio:g}"
        if below_min_rank(per_head, {"out": n // heads, "in": n // heads, "kernel": [1, 1]}, context.config.min_rank):
            what = f"{per_head} per head" if heads > 1 else str(per_head)
            return None, f"{reason} gives width {what}, below min_rank {context.config.min_rank}"
    co_inputs = sum(dense_shape(context.model.get_submodule(c))["in"] for c in candidate.co_producers)
    pair = NarrowPair(candidate.consumer, consumer_row.layer_type, consumer_row.shape, candidate.resized,
                      candidate.depthwise_area, candidate.co_producers, co_inputs, candidate.heads, candidate.attention)
    through = (f"{heads} heads of {n // heads} -> {width // heads} dimensions (query/key and value/output jointly)"
               if candidate.heads else f"{n} -> {width} channels through {candidate.activation}")
    return LayerPlan(name, "narrow", width, f"{reason}; {through} into {candidate.consumer}", producer_row.layer_type,
                     producer_row.shape, ratio_rank=width, narrow=pair), None
