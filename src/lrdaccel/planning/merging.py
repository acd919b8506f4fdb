"""Finding bottlenecks to merge: `1x1 conv -> BN -> act -> conv -> BN -> act -> 1x1 conv` chains in
the data flow of one recorded forward (lrdaccel.planning.dataflow), and why each may not merge.

A chain is a candidate when, starting at a 1x1 conv, the data flows on to a conv, twice over,
and the second conv reached is 1x1. The flow follows every op that reads the previous result
as its data input and is a BatchNorm, an activation or a no-op, or takes no other traced tensor
(a pad, a pooling, a scaling: such a near miss is a candidate too, so that it says why it does
not merge); where a result is read by several such ops, each path is followed. A conv's own
padding (the pad op nn.Conv2d runs for `padding_mode="reflect"` and the like) belongs to that
conv. A candidate merges only if nothing else reads its inner activations, each side is exactly
"BatchNorm" or "BatchNorm -> activation", the inner conv is not grouped and pads with zeros,
and every conv and BatchNorm is called once; otherwise `reason` says which rule failed. Modules
are named by the weights the recorded calls read, so detection works on any architecture (HF
ResNet, plain nn.Sequential, functional forwards) and never looks at class names.
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
PAD_OPS = frozenset({"pad"})
MAX_PATHS = 16  # paths followed from one 1x1 conv (a result read by several ops branches)
MAX_STEPS = 256  # ops walked from one 1x1 conv in all


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
    found: dict[tuple[str, str, str], MergeCandidate] = {}
    for op in ops:
        if op.kind != "conv" or not _is_pointwise_conv(modules.get(op.module)):
            continue
        for between1, middle, reads1 in _follow(ops, op, modules):
            if not isinstance(modules.get(middle.module), nn.Conv2d):
                continue
            for between2, last, reads2 in _follow(ops, middle, modules):
                if not _is_pointwise_conv(modules.get(last.module)):
                    continue
                key = (op.module, middle.module, last.module)
                if key not in found:
                    found[key] = _candidate(ops, modules, calls, op, middle, last, between1, between2,
                                            reads1 + reads2)
    return list(found.values())


def _candidate(ops: list[Op], modules: dict[str, nn.Module], calls: Counter, first: Op, middle: Op, last: Op,
               between1: list[Op], between2: list[Op], reasons: list[str]) -> MergeCandidate:
    candidate = MergeCandidate(first.module, middle.module, last.module)
    reasons = list(reasons)
    for side, between, left, right in ((1, between1, first.module, middle.module),
                                       (2, between2, middle.module, last.module)):
        bn, act, why = _side(between, left, right)
        setattr(candidate, f"bn{side}", bn)
        setattr(candidate, f"act{side}", act)
        reasons += [why] if why else []
    reasons += _module_reasons(candidate, modules, calls)
    candidate.bn3 = _following_batchnorm(ops, last, modules, calls)
    candidate.reason = "; ".join(reasons) or None
    return candidate


def _is_pointwise_conv(module: nn.Module | None) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)


def _follow(ops: list[Op], start: Op, modules: dict[str, nn.Module]) -> list[tuple[list[Op], Op, list[str]]]:
    """From `start`, along the data flow, to each next conv: [(the ops passed, the conv, a
    sentence per result on the way also read off the path)], in execution order."""
    paths = []
    stack = [(start, [], [], start.module)]
    steps = 0
    while stack and len(paths) < MAX_PATHS and steps < MAX_STEPS:
        node, between, extra_reads, last_module = stack.pop()
        steps += 1
        readers = [ops[i] for i in node.readers]
        onward = [r for r in readers if r.inputs[:1] == [node.index] and (r.kind in ONWARD or len(r.inputs) == 1)]
        branches = []
        for reader in onward:
            others = [r for r in readers if r is not reader]
            reads = list(extra_reads)
            if others:
                what = node.module or f"{node.name} after {last_module}"
                reads.append(f"residual read: the output of {what} is also read by "
                             f"{', '.join(r.describe() for r in others)}, which merging would change")
            if reader.kind == "conv":
                paths.append((_without_own_padding(between, reader, modules), reader, reads))
            else:
                branches.append((reader, [*between, reader], reads, reader.module or last_module))
        stack.extend(reversed(branches))  # depth first, in execution order
    return sorted(paths, key=lambda path: path[1].index)


def _without_own_padding(between: list[Op], conv: Op, modules: dict[str, nn.Module]) -> list[Op]:
    """`between` without the pad op that is `conv`'s own padding (nn.Conv2d pads by calling F.pad
    where padding_mode is not "zeros"); the conv's padding mode is judged as the conv's."""
    module = modules.get(conv.module)
    if (between and between[-1].name in PAD_OPS and isinstance(module, nn.Conv2d)
            and module.padding_mode != "zeros" and between[-1].readers == [conv.index]):
        return between[:-1]
    return between


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
