"""Running a model part of the way, with hooks: which layers one forward reaches and in what
order (`probe_calls`), and a forward that stops once the layers of interest have been called
(`forward_until`). Sequential calibration and rank allocation use them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lrdaccel.calibration.batches import StopForward, call_batch


@contextmanager
def hooked(modules: dict[str, nn.Module], make: Callable, after: bool = False) -> Iterator[None]:
    """A forward pre-hook (with `after`, a forward hook) `make(name, module)` on each module, with
    kwargs, all removed on exit (also on error)."""
    handles = []
    try:
        for name, module in modules.items():
            register = module.register_forward_hook if after else module.register_forward_pre_hook
            handles.append(register(make(name, module), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


@dataclass
class CallOrder:
    """How one forward reaches a set of layers (from `probe_calls`).

    Attributes:
        groups: the layers in the order of their first call, grouped where consecutive layers
            read the very same input tensor (a transformer's query, key and value).
        calls: how many times one forward calls each layer.
        positions: output vectors (tokens or pixels) each layer produced in that forward.
        unreached: layers the forward never called.
    """

    groups: list[list[str]]
    calls: dict[str, int]
    positions: dict[str, int]
    unreached: list[str]


@torch.no_grad()
def probe_calls(model: nn.Module, modules: dict[str, nn.Module], batch: Any) -> CallOrder:
    """Run one batch (already on the model's device) with hooks on `modules` and report when and
    on what each is called. The model's modes are the caller's business."""
    order: list[str] = []
    calls: dict[str, int] = {}
    positions: dict[str, int] = {}
    inputs: dict[str, tuple] = {}

    def make(name: str, module: nn.Module) -> Callable:
        def hook(_m, args, kwargs, output) -> None:
            x = _first_tensor(args, kwargs)
            if name not in calls:
                order.append(name)
                inputs[name] = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            calls[name] = calls.get(name, 0) + 1
            out = output if isinstance(output, torch.Tensor) else _first_tensor(tuple(output), {})
            channels = out.shape[1] if isinstance(module, nn.Conv2d) else out.shape[-1]
            positions[name] = positions.get(name, 0) + out.numel() // max(1, channels)

        return hook

    with hooked(modules, make, after=True):
        call_batch(model, batch, 0)
    groups: list[list[str]] = []
    for name in order:
        if groups and inputs[groups[-1][0]] == inputs[name]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return CallOrder(groups, calls, positions, [name for name in modules if name not in calls])


def forward_until(model: nn.Module, batch: Any, index: int, modules: dict[str, nn.Module], calls: dict[str, int],
                  on_call: Callable[[str, nn.Module, torch.Tensor], None], *, outputs: bool = False) -> None:
    """Call the model on `batch` and `on_call(name, module, tensor)` at each call of a module in
    `modules` with its input (or, with `outputs`, its output); the forward stops as soon as every
    module has been called `calls[name]` times, so later layers cost nothing."""
    remaining = {name: calls[name] for name in modules}

    def make(name: str, module: nn.Module) -> Callable:
        def seen(tensor: torch.Tensor) -> None:
            on_call(name, module, tensor.detach())
            remaining[name] -= 1
            if not any(remaining.values()):
                raise StopForward

        if outputs:
            return lambda _m, args, kwargs, output: seen(output)
        return lambda _m, args, kwargs: seen(_first_tensor(args, kwargs))

    with hooked(modules, make, after=outputs):
        try:
            call_batch(model, batch, index)
        except StopForward:
            pass
