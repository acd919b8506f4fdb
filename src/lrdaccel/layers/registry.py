"""Which dense layer types can be decomposed, and into what. First match wins.

One entry per supported type (PEFT-style ordered dispatch). A module no entry accepts is not a
candidate; an entry that accepts the type but not this instance (a grouped conv) says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from lrdaccel.layers.base import LowRankModule
from lrdaccel.layers.svd import SVDConv2d, SVDLinear, dense_linear_weight, is_conv1d
from lrdaccel.layers.tucker import TuckerConv2d


@dataclass(frozen=True)
class Entry:
    """How one dense layer type is decomposed."""

    kind: str
    layer_class: type[LowRankModule]
    matches: Callable[[nn.Module], bool]
    cannot: Callable[[nn.Module], str | None]  # reason this instance cannot be decomposed, or None


def _conv_cannot(module: nn.Conv2d) -> str | None:
    if module.groups == 1:
        return None
    if module.groups == module.in_channels:
        return f"depthwise conv (groups={module.groups}) has no channel mixing to factorize"
    return f"grouped conv (groups={module.groups}) is not supported"


REGISTRY: tuple[Entry, ...] = (
    Entry("svd", SVDLinear, lambda m: isinstance(m, nn.Linear) or is_conv1d(m), lambda m: None),
    Entry("svd", SVDConv2d, lambda m: type(m) is nn.Conv2d and m.kernel_size == (1, 1), _conv_cannot),
    Entry("tucker2", TuckerConv2d, lambda m: type(m) is nn.Conv2d and m.kernel_size != (1, 1), _conv_cannot),
)

SUPPORTED = "nn.Linear, transformers Conv1D, nn.Conv2d (groups=1; 1x1 -> SVD, k x k -> Tucker-2)"


def entry_for(module: nn.Module) -> Entry | None:
    for entry in REGISTRY:
        if entry.matches(module):
            return entry
    return None


def dense_shape(module: nn.Module) -> dict:
    """The geometry the plan records and checks: out, in, kernel."""
    if isinstance(module, nn.Conv2d):
        return {"out": module.out_channels, "in": module.in_channels, "kernel": list(module.kernel_size)}
    out_features, in_features = dense_linear_weight(module).shape
    return {"out": out_features, "in": in_features, "kernel": [1, 1]}
