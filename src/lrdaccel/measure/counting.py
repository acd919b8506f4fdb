"""Parameter and MAC counts of a whole model, MACs counted by torch.utils.flop_counter."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lrdaccel._modules import call_model


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of `model` (each shared tensor once); only those with requires_grad if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, inputs: Any) -> int:
    """Multiply-accumulates of one forward of `inputs` (FLOPs / 2, as flop_counter counts 2 per MAC)."""
    return macs_by_module(model, inputs)[0]


@torch.no_grad()
def macs_by_module(model: nn.Module, inputs: Any) -> tuple[int, dict[str, int]]:
    """(whole-model MACs, MACs per qualified module name) of one forward of `inputs`.

    The model is run in eval mode (dropout and batch-norm updates do not change the count) and
    put back in the mode it was in.
    """
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, depth=None) as counter:
            call_model(model, inputs)
    finally:
        model.train(was_training)
    prefix = type(model).__name__ + "."
    per_module = {
        key[len(prefix):]: sum(counts.values()) // 2
        for key, counts in counter.get_flop_counts().items()
        if key.startswith(prefix)
    }
    return counter.get_total_flops() // 2, per_module
