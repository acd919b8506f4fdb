"""Parameter and MAC counts of a whole model, MACs counted by torch.utils.flop_counter."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lrdaccel.surgery import call_model


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of `model` (each shared tensor once); only those with requires_grad if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_macs(model: nn.Module, inputs: Any) -> int:
    """Multiply-accumulates of one forward of `inputs` (FLOPs / 2, as flop_counter counts 2 per MAC).

    The model is run in eval mode (dropout and batch-norm updates do not change the count) and
    put back in the mode it was in.
    """
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            call_model(model, inputs)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
