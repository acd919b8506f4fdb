"""What every contestant of a race is made of: its spec, what its builder may use, and what the
builder hands the race (`VariantSpec`, `BuildContext`, `Built`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lrdaccel.training.freezer import SequentialFreezer


@dataclass(frozen=True)
class VariantSpec:
    """One contestant: `name` as written, its `kind`, and its options (defaults filled in)."""

    name: str
    kind: str
    options: dict = field(default_factory=dict)


@dataclass
class BuildContext:
    """What builders may use: batches of the task, and what the race fixes for every variant.

    Attributes:
        calibration: training inputs (labels dropped), on the device, for whitening, allocation,
            importance.
        calibration_labels: their labels.
        example_inputs: one training batch's inputs.
        keep: module names no variant compresses (the new head).
        steps: the race's training steps.
        built: models of the variants built so far, by name (a peer matches one of them).
        kinds: the kind of each variant built so far, by name.
        serve: how the race serves the trained variants (RaceConfig.serve): `lrd(optimize=infer)`
            times its candidate ranks in that runtime.
    """

    calibration: list[Any]
    calibration_labels: list[torch.Tensor]
    example_inputs: Any
    keep: list[str]
    steps: int
    built: dict[str, nn.Module] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    serve: str = "eager"


@dataclass
class Built:
    """A variant ready to train.

    Attributes:
        model: what trains (the starting classifier's copy, changed by the variant).
        freezer: drives sequential freezing, stepped after every optimizer step; or None.
        lr_scale: the variant's learning rate over the race's.
        kd: weight of distillation from the starting classifier's logits (0: none).
        served: the model a user would serve after training (default: `model` itself; LoRA
            merges its adapters).
        notes: what the builder decided, for the report (ranks, pruning ratio, ...).
    """

    model: nn.Module
    freezer: SequentialFreezer | None = None
    lr_scale: float = 1.0
    kd: float = 0.0
    served: Callable[[nn.Module], nn.Module] | None = None
    notes: dict = field(default_factory=dict)
