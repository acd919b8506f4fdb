"""The input each layer really sees inside the model: shape, dtype, memory format, device.

A layer's speed depends on its input (a 3x3 conv at 14x14 and at 56x56 are different problems),
so rank search times each layer on what one forward of the user's example inputs feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from lrdaccel._modules import call_model, kept_modes


@dataclass(frozen=True)
class InputSpec:
    """What a layer was called with (its first positional argument).

    Attributes:
        shape: the full input shape, batch included.
        dtype: the input dtype.
        device: where the input lived.
        memory_format: "channels_last" for a 4-d NHWC-contiguous input, else "contiguous".
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    memory_format: str = "contiguous"

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "InputSpec":
        channels_last = (
            tensor.dim() == 4
            and not tensor.is_contiguous()
            and tensor.is_contiguous(memory_format=torch.channels_last)
        )
        return cls(tuple(tensor.shape), tensor.dtype, tensor.device, "channels_last" if channels_last else "contiguous")


@torch.no_grad()
def capture_inputs(model: nn.Module, names: Iterable[str], example_inputs: Any) -> dict[str, InputSpec]:
    """Run `example_inputs` through `model` once and record the input of each named layer.

    The model runs in eval mode (so batch-norm statistics do not move) and is restored to each
    module's own training flag afterwards; hooks are always removed. A layer called several
    times keeps its first call. Layers the inputs never reach are absent from the result.

    Args:
        model: the model, unchanged by this call.
        names: qualified names of the layers to watch.
        example_inputs: a tensor, a tuple of positional args, or a dict of keyword args.

    Returns:
        {name: InputSpec} for every named layer that was called.

    Raises:
        ValueError: a name that is not a module of the model.
    """
    captured: dict[str, InputSpec] = {}
    handles = []
    try:
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"layer {name!r}: the model has no such module") from None
            handles.append(module.register_forward_pre_hook(_recorder(name, captured)))
        with kept_modes(model):
            model.eval()
            call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _recorder(name: str, captured: dict[str, InputSpec]):
    def hook(module: nn.Module, args: tuple) -> None:
        if name not in captured and args and isinstance(args[0], torch.Tensor):
            captured[name] = InputSpec.of(args[0])

    return hook
