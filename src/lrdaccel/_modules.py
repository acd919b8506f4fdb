"""Model walking shared by every step: wrappers, parents, tied weights, calling a model, its output.

One rule each, used everywhere: how a model is called on example inputs (`call_model`), which
tensor of its output counts (`output_tensor`), how inputs move to a device (`move_inputs`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# Parents whose forward always reads a child Linear's `.weight` instead of calling it: decomposing
# that child buys nothing (LowRankModule.weight would rebuild the dense weight every call).
# nn.TransformerEncoderLayer is not listed: only its eval-mode fast path reads linear1/linear2.weight
# (getting the rebuilt dense weight, so still correct); training calls the factors.
DIRECT_WEIGHT_READERS: dict[type, tuple[str, ...]] = {
    nn.MultiheadAttention: ("out_proj",),
}

# Name prefixes that wrappers add to parameter names: DDP's `module.`, torch.compile's `_orig_mod.`.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def clean_name(name: str) -> str:
    """A parameter name without the leading `module.` (DDP) and `_orig_mod.` (torch.compile) parts."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every module name that holds it directly (tied weights show up twice)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(name)
    return owners


def direct_reader(model: nn.Module, name: str) -> str | None:
    """Name the parent that reads this module's weight directly, if any."""
    if not name:
        return None
    parent, attr = parent_and_attr(model, name)
    for parent_type, attrs in DIRECT_WEIGHT_READERS.items():
        if isinstance(parent, parent_type) and attr in attrs:
            return type(parent).__name__
    return None


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call with a tensor, a tuple or list of positional args, or a mapping of keyword args
    (a dict, or a transformers BatchEncoding)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def output_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model's output: the tensor itself, `.logits`, `.last_hidden_state`,
    else the first tensor of a tuple, list or mapping (an HF ModelOutput is both).

    Raises:
        ValueError: the output holds no tensor.
    """
    if isinstance(output, torch.Tensor):
        return output
    for attr in ("logits", "last_hidden_state"):
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError(f"the model returned {type(output).__name__}: cannot find the output tensor "
                     f"(a tensor, .logits, .last_hidden_state, or a tensor in a tuple or dict)")


def move_inputs(inputs: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                channels_last: bool = False) -> Any:
    """Inputs (a tensor, or tensors nested in tuples, lists and mappings) on `device`; floating
    tensors cast to `dtype`; 4-d tensors in channels_last memory format if asked. Other values
    pass through; a mapping comes back as a dict."""
    if isinstance(inputs, torch.Tensor):
        moved = inputs.to(device=device, dtype=dtype if dtype is not None and inputs.is_floating_point() else None)
        if channels_last and moved.dim() == 4:
            moved = moved.contiguous(memory_format=torch.channels_last)
        return moved
    if isinstance(inputs, Mapping):
        return {key: move_inputs(value, device, dtype, channels_last) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(move_inputs(value, device, dtype, channels_last) for value in inputs)
    return inputs


def describe_inputs(inputs: Any) -> str:
    """'input 8x3x224x224' / 'input_ids 8x128, attention_mask 8x128': for reports."""
    if isinstance(inputs, torch.Tensor):
        return "input " + "x".join(str(d) for d in inputs.shape)
    if isinstance(inputs, Mapping):
        return ", ".join(f"{k} {'x'.join(str(d) for d in v.shape)}" for k, v in inputs.items()
                         if isinstance(v, torch.Tensor))
    if isinstance(inputs, (tuple, list)):
        return ", ".join(describe_inputs(v) for v in inputs)
    return type(inputs).__name__


def model_device(model: nn.Module, default: str = "cpu") -> torch.device:
    """Where the model's parameters live (its first parameter's device)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device(default)


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The dtype torch.autocast is running `device`'s type in here, or None where it is off:
    code called inside `with torch.autocast("cuda", dtype=torch.bfloat16)` runs in bfloat16."""
    device_type = torch.device(device).type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def model_dtype(model: nn.Module) -> torch.dtype:
    """The model's floating dtype (its first floating parameter's), float32 if it has none."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


@contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Every module's training flag as it was on entry, restored on exit (also on error)."""
    modes = {module: module.training for module in model.modules()}
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def check_real_weights(model: nn.Module, verb: str, need: str = "load real weights first") -> None:
    """Refuse a model with a parameter or buffer on the meta device (shapes only, no values).

    Raises:
        ValueError: "<verb>: <tensor> is on the meta device (no values); <need>".
    """
    meta = next((name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta), None)
    if meta is not None:
        raise ValueError(f"{verb}: {meta} is on the meta device (no values); {need}")
