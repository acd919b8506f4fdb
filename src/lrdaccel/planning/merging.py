"""Finding bottlenecks to merge: `1x1 conv -> BN -> act -> conv -> BN -> act -> 1x1 conv` chains in
the data flow of one recorded forward (lrdaccel.planning.dataflow), and why each may not merge.

A chain is a candidate when, starting at a 1x1 conv, each result is read onward by exactly one
BatchNorm / activation / no-op until a conv, twice over, and the second conv reached is 1x1. A
candidate merges only if nothing else reads its inner activations, each side is exactly
"BatchNorm" or "BatchNorm -> activation", the inner conv is not grouped, and every conv and
BatchNorm is called once; otherwise `reason` says which rule failed. Modules are named by the
weights the recorded calls read, so detection works on any architecture (HF ResNet, plain
nn.Sequential, functional forwards) and never looks at class names.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from torch import nn

from lrdaccel.layers.registry import dense_shape
from lrdaccel.planning.dataflow import Op, trace_ops
from lrdaccel.planning.rows import MergeBlock

ONWARD = ("conv", "bn", "act", "pass")


@dataclass
class MergeCandidate:
    """One chain `first -> bn1 -> act1 -> middle -> bn2 -> act2 -> last`, by module name.

    Attributes:
        reason: None if the chain can be merged as far as its structure goes, else why not.
        bn1 / bn2: the BatchNorm on each side (None where there is none).
        act1 / act2: the activation on each side (the torch function's name), None where none.
        bn3: a BatchNorm that alone reads `last`'s output, if any.
    """

    first: str
    middle: str
    last: str
    bn1: str | None = None
    bn2: str | None = None
    act1: str | None = None
    act2: str | None = None
    bn3: str | None = None
    reason: str | None = None

    def block(self, model: nn.Module) -> MergeBlock:
        """The plan's record of this chain (its 1x1 convs' geometry read off `model`)."""
        first, last = model.get_submodule(self.first), model.get_submodule(self.last)
        return MergeBlock(self.first, self.bn1, self.bn2, self.last, dense_shape(first), dense_shape(last),
                          self.act1, self.act2, self.bn3, tuple(first.stride))


def find_merge_candidates(model: nn.Module, example_inputs: Any) -> list[MergeCandidate]:
    """Every mergeable-looking chain in `model`, in execution order, each with its reason or None.

    Args:
        model: the model (run once in eval mode; parameters, buffers and modes are left as they were).
        example_inputs: a tensor, tuple or dict for the model; a batch of one is enough.

    Raises:
        ValueError: the model fails on the example inputs.
    """
    ops = trace_ops(model, example_inputs)
    modules = dict(model.named_modules())
    calls = Counter(op.module for op in ops if op.module is not None)
    found = []
    for op in ops:
        if op.kind != "conv" or not _is_pointwise_conv(modules.get(op.module)):
            continue
        between1, middle, reads1 = _follow(ops, op)
        if middle is None or not isinstance(modules.get(middle.module), nn.Conv2d):
            continue
        between2, last, reads2 = _follow(ops, middle)
        if last is None or not _is_pointwise_conv(modules.get(last.module)):
            continue
        candidate = MergeCandidate(op.module, middle.module, last.module)
        reasons = reads1 + reads2
        for side, between, left, right in ((1, between1, op.module, middle.module),
                                           (2, between2, middle.module, last.module)):
            bn, act, why = _side(between, left, right)
            setattr(candidate, f"bn{side}", bn)
            setattr(candidate, f"act{side}", act)
            reasons += [why] if why else []
        reasons += _module_reasons(candidate, modules, calls)
        candidate.bn3 = _following_batchnorm(ops, last, modules, calls)
        candidate.reason = "; ".join(reasons) or None
        found.append(candidate)
    return found


def _is_pointwise_conv(module: nn.Module | None) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)


def _follow(ops: list[Op], start: Op) -> tuple[list[Op], Op | None, list[str]]:
    """From `start`, through the one onward reader of each result, to the next conv.

    Returns (the ops passed, the conv reached or None, a sentence per result also read elsewhere).
    """
    between: list[Op] = []
    extra_reads: list[str] = []
    node, last_module = start, start.module
    while True:
        readers = [ops[i] for i in node.readers]
        onward = [r for r in readers if r.kind in ONWARD and r.inputs[:1] == [node.index]]
        if len(onward) != 1:
            return between, None, extra_reads
        others = [r for r in readers if r is not onward[0]]
        if others:
            what = node.module or f"{node.name} after {last_module}"
            extra_reads.append(f"residual read: the output of {what} is also read by "
                               f"{', '.join(r.describe() for r in others)}, which merging would change")
        node = onward[0]
        last_module = node.module or last_module
        if node.kind == "conv":
            return between, node, extra_reads
        between.append(node)


def _side(between: list[Op], left: str, right: str) -> tuple[str | None, str | None, str | None]:
    """(BatchNorm module, activation name, reason or None) of the ops between two convs."""
    core = [op for op in between if op.kind != "pass"]
    kinds = [op.kind for op in core]
    bn = next((op.module for op in core if op.kind == "bn"), None)
    act = next((op.name.rstrip("_") for op in core if op.kind == "act"), None)
    if kinds in (["bn"], ["bn", "act"]):
        return bn, act, None
    if "bn" not in kinds:
        return None, act, f"missing BatchNorm: no BatchNorm between {left} and {right}"
    sequence = " -> ".join(op.describe() if op.kind == "bn" else op.name for op in core)
    return bn, act, f"between {left} and {right} is {sequence}, not BatchNorm -> activation"


def _module_reasons(candidate: MergeCandidate, modules: dict[str, nn.Module], calls: Counter) -> list[str]:
    first, middle, last = (modules[n] for n in (candidate.first, candidate.middle, candidate.last))
    reasons = []
    if middle.groups != 1:
        reasons.append(f"grouped inner conv {candidate.middle} (groups={middle.groups}): Tucker-2 needs groups=1")
    for name, conv in ((candidate.first, first), (candidate.last, last)):
        if conv.groups != 1:
            reasons.append(f"grouped 1x1 conv {name} (groups={conv.groups})")
        if conv.padding != (0, 0) or conv.padding_mode != "zeros":
            reasons.append(f"1x1 conv {name} pads its input (padding={conv.padding})")
    if last.stride != (1, 1):
        reasons.append(f"last 1x1 conv {candidate.last} is strided (stride={last.stride})")
    if isinstance(middle.padding, str) or middle.padding_mode != "zeros":
        reasons.append(f"inner conv {candidate.middle} uses padding={middle.padding!r}, padding_mode="
                       f"{middle.padding_mode!r}; the merge's patch statistics need numeric zero padding")
    for name in (candidate.first, candidate.middle, candidate.last, candidate.bn1, candidate.bn2):
        if name is not None and calls[name] > 1:
            reasons.append(f"{name} is called {calls[name]} times (shared weights)")
    for name in (candidate.bn1, candidate.bn2):
        if name is None:
            continue
        bn = modules[name]
        if not isinstance(bn, nn.BatchNorm2d) or not bn.affine or not bn.track_running_stats:
            reasons.append(f"{name} is not a BatchNorm2d with affine parameters and running statistics")
    return reasons


def _following_batchnorm(ops: list[Op], last: Op, modules: dict[str, nn.Module], calls: Counter) -> str | None:
    """The BatchNorm2d that alone reads the last conv's output (it absorbs constants), if any."""
    readers = [ops[i] for i in last.readers]
    if len(readers) != 1 or readers[0].kind != "bn" or readers[0].inputs[:1] != [last.index]:
        return None
    bn = modules.get(readers[0].module)
    ok = isinstance(bn, nn.BatchNorm2d) and bn.affine and bn.track_running_stats and calls[readers[0].module] == 1
    return readers[0].module if ok else None
