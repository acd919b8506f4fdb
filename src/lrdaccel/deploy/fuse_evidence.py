"""What a real forward shows about the pairs `fuse_batchnorm` would fold, and the check after folding.

torch.fx proves a pair only inside the graph it traced. Where an ancestor did not trace, its
forward may call the conv again or read its weight; one forward on example inputs then gives the
evidence: every call of the conv, of the BatchNorm and of the traced module that holds them
(forward hooks), and every torch call that reads one of the tensors folding rewrites while
neither module that owns it is running (a `TorchFunctionMode`, as lrdaccel.planning.dataflow
records). A pair folds only if the conv and the BatchNorm each ran exactly as often as the graph
predicts for the calls of its module, and nothing else read their tensors.

The same forward gives the reference outputs. After folding, the model runs again on the same
inputs, and every floating output must agree within sqrt(eps) of its dtype relative to its
largest value; `fuse_batchnorm` undoes every fold otherwise (a second line behind the proof).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from lrdaccel._modules import call_model, model_device, move_inputs
from lrdaccel.deploy.fuse_rules import reads_values


@dataclass
class Evidence:
    """One forward, recorded.

    Attributes:
        outputs: the floating output tensors, in order (the reference for `compare`).
        calls: id(module) -> times it ran.
        foreign: id(tensor) -> the torch functions that read it while its owner was not running.
    """

    outputs: list[torch.Tensor]
    calls: Counter = field(default_factory=Counter)
    foreign: dict[int, list[str]] = field(default_factory=dict)


class _Reads(TorchFunctionMode):
    """Records reads of watched tensors made while the module that owns them is not running."""

    def __init__(self, owners: dict[int, int], active: Counter, foreign: dict[int, list[str]]):
        super().__init__()
        self.owners, self.active, self.foreign = owners, active, foreign

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not reads_values(func, result):
            return result  # metadata (.shape, .dtype, .dim()): nothing is computed from the values
        for tensor in tree_flatten((args, kwargs))[0]:
            owner = self.owners.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
            if owner is not None and not self.active[owner]:
                self.foreign.setdefault(id(tensor), []).append(getattr(func, "__name__", str(func)))
        return result


@torch.no_grad()
def observe(model: nn.Module, example_inputs: Any, counted: list[nn.Module],
            watched: dict[int, nn.Module]) -> Evidence:
    """Run `model` once on `example_inputs` (moved to its device), counting the calls of each module
    in `counted` and the reads of each tensor in `watched` (id(tensor) -> the module whose own
    call may read it) made outside that module's call.

    Raises:
        ValueError: the model fails on the inputs.
    """
    calls: Counter = Counter()
    active: Counter = Counter()
    foreign: dict[int, list[str]] = {}

    def enter(module, _args):
        calls[id(module)] += 1
        active[id(module)] += 1

    def leave(module, _args, _output):
        active[id(module)] -= 1

    owners = {key: id(owner) for key, owner in watched.items()}
    with ExitStack() as stack:
        for module in {id(m): m for m in counted}.values():
            stack.callback(module.register_forward_pre_hook(enter).remove)
            stack.callback(module.register_forward_hook(leave, always_call=True).remove)
        try:
            with _Reads(owners, active, foreign):
                output = call_model(model, move_inputs(example_inputs, model_device(model)))
        except Exception as error:  # whatever the model raises on the inputs: say so in one line
            raise ValueError(f"fuse_batchnorm: the model fails on example_inputs ({type(error).__name__}: "
                             f"{error})") from error
    return Evidence(floating_outputs(output), calls, foreign)


@torch.no_grad()
def rerun(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    """The model's floating outputs on `example_inputs` (moved to its device)."""
    return floating_outputs(call_model(model, move_inputs(example_inputs, model_device(model))))


def floating_outputs(output: Any) -> list[torch.Tensor]:
    """Every floating tensor in an output: a tensor, or tensors in tuples, lists and mappings
    (a Hugging Face ModelOutput is a mapping)."""
    if isinstance(output, torch.Tensor):
        return [output.detach()] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in floating_outputs(value)]
    if isinstance(output, (tuple, list)):
        return [t for value in output for t in floating_outputs(value)]
    return []


def tolerance(dtype: torch.dtype) -> float:
    """The relative difference folding may make in `dtype`: sqrt(eps), half its significant digits
    (float32: 3.5e-4; a wrong fold moves outputs by their own size)."""
    return float(torch.finfo(dtype).eps) ** 0.5


def compare(before: list[torch.Tensor], after: list[torch.Tensor]) -> tuple[float, float] | None:
    """None if every output agrees within `tolerance`, else (worst difference, what was allowed)."""
    if len(before) != len(after):
        return float("inf"), 0.0
    for old, new in zip(before, after):
        if old.shape != new.shape:
            return float("inf"), 0.0
        if not old.numel():
            continue
        new = new.to(old.dtype)
        same_nan = torch.isnan(old) & torch.isnan(new)  # NaN where there was NaN is no change
        finite = old[torch.isfinite(old)]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        allowed = tolerance(old.dtype) * (scale if scale > 0 else 1.0)
        difference = (new - old).abs().masked_fill(same_nan | (old == new), 0.0)
        worst = float(difference.max())
        if not worst <= allowed:  # a new NaN counts as a difference
            return worst, allowed
    return None
