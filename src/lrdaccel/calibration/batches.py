"""Calibration batches: checking them, holding them in memory, calling a model on one.

A calibration batch is whatever the model takes: a tensor (model(x)), a tuple (model(*x)) or a
mapping (model(**x), a tokenizer's output). Labels are dropped by the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lrdaccel._modules import call_model, model_device, move_inputs
from lrdaccel.layers import entry_for


class StopForward(Exception):
    """Raised by a hook to cut a forward short once every layer of interest has been called
    (lrdaccel.calibration.passes); `call_batch` lets it through untouched."""


def token_mask(batch: Any) -> torch.Tensor | None:
    """The [batch, tokens] boolean mask of real tokens, when the batch is a mapping holding a 2-D
    `attention_mask` (a tokenizer's output); else None."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask.bool()
    return None


def check_calibration(calibration: Any) -> None:
    """Calibration must be an iterable of batches, not one batch.

    Raises:
        ValueError: None, a single tensor or mapping, or something that is not iterable.
    """
    if calibration is None:
        raise ValueError("calibration batches are required: give a DataLoader or a list of batches")
    if isinstance(calibration, (torch.Tensor, Mapping)) or not isinstance(calibration, Iterable):
        raise ValueError(f"calibration must be an iterable of batches (a DataLoader or a list); got a single "
                         f"{type(calibration).__name__}: wrap one batch in a list, e.g. [batch]")


def batches_in_memory(model: nn.Module, calibration: Any) -> list:
    """The calibration batches as a list on the model's device, for methods that read them
    several times.

    Raises:
        ValueError: not an iterable of batches (see check_calibration), or no batches.
    """
    check_calibration(calibration)
    device = model_device(model)
    batches = [move_inputs(batch, device) for batch in calibration]
    if not batches:
        raise ValueError("calibration gave no batches")
    return batches


def layers_by_name(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """{name: module} for layers whose inputs can be collected.

    Raises:
        ValueError: a name the model does not have, or a module no decomposition applies to.
    """
    modules = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"layer {name!r}: the model has no such module") from None
        if entry_for(module) is None:
            raise ValueError(f"layer {name!r}: cannot collect input statistics of a {type(module).__name__}")
        modules[name] = module
    return modules


def call_batch(model: nn.Module, batch: Any, index: int) -> Any:
    """Call the model on one calibration batch.

    Raises:
        ValueError: whatever the model raised, naming the batch and how batches are called.
    """
    try:
        return call_model(model, batch)
    except StopForward:
        raise
    except Exception as error:  # whatever the model raises, say which batch and how it was called
        raise ValueError(
            f"calibration batch {index}: the model failed on it ({type(error).__name__}: {error}); "
            f"batches are called as model(tensor), model(*tuple) or model(**dict): drop labels first"
        ) from error
