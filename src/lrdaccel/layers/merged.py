"""The modules of a merged bottleneck: its three convs, narrowed, stay plain convs in place.

A merge (lrdaccel.decomposition.merge_build) leaves `first (C_in -> r1) -> BN(r1) -> act -> middle (r1 -> r2) ->
BN(r2) -> act -> last (r2 -> C_out)` where the model had its bottleneck, in the model's own
modules: nothing is wrapped, so the model's forward and state-dict layout are unchanged except for
the widths. The three convs become `MergedConv2d`, an nn.Conv2d that computes exactly what
nn.Conv2d computes and records its role in the block and its shape before the merge, so the
merge can be read back from the model (save/load, planning, freezing).

`MergedBlock` is the block as the freezer sees it: its three convs as `factors`, like a
decomposed layer's. `BottleneckChain` runs a bottleneck's branch alone, to time one form of it.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lrdaccel.layers.base import is_channels_last

ROLES = ("first", "middle", "last")
ACTIVATION_FUNCTIONS = {
    "relu": F.relu, "relu6": F.relu6, "hardtanh": F.hardtanh, "gelu": F.gelu, "silu": F.silu,
    "hardswish": F.hardswish, "leaky_relu": F.leaky_relu, "elu": F.elu, "mish": F.mish,
    "sigmoid": torch.sigmoid, "tanh": torch.tanh,
}


class MergedConv2d(nn.Conv2d):
    """A conv of a merged bottleneck. Computes as nn.Conv2d; adds where it belongs.

    Attributes:
        merge_role: "first", "middle" or "last".
        merge_name: the block's name: the middle conv's qualified name when it was merged.
        dense_shape: {"out", "in", "kernel"} of the conv before the merge.
        source: the class name of the conv it replaced.
        merge_block: on the middle conv, the plan's MergeBlock record (names as at merge time).
    """

    def __init__(self, in_channels: int, out_channels: int, *args, merge_role: str, merge_name: str,
                 dense_shape: dict, source: str = "Conv2d", **kwargs):
        super().__init__(in_channels, out_channels, *args, **kwargs)
        if merge_role not in ROLES:
            raise ValueError(f"merge_role must be one of {ROLES}, got {merge_role!r}")
        self.merge_role, self.merge_name, self.dense_shape, self.source = merge_role, merge_name, dense_shape, source
        self.merge_block = None

    @classmethod
    def narrowed(cls, conv: nn.Conv2d, in_channels: int, out_channels: int, role: str, block_name: str,
                 bias: bool) -> "MergedConv2d":
        """A MergedConv2d with `conv`'s geometry, device, dtype, memory format, requires_grad and mode, new widths,
        default-initialised weights (the merge fills them)."""
        weight = conv.weight
        shape = {"out": conv.out_channels, "in": conv.in_channels, "kernel": list(conv.kernel_size)}
        new = cls(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, 1, bias,
                  conv.padding_mode, device=weight.device, dtype=weight.dtype, merge_role=role,
                  merge_name=block_name, dense_shape=shape, source=getattr(conv, "source", type(conv).__name__))
        if is_channels_last(weight):
            new.to(memory_format=torch.channels_last)
        for parameter in new.parameters():
            parameter.requires_grad_(weight.requires_grad)
        return new.train(conv.training)

    def extra_repr(self) -> str:
        before = self.dense_shape
        return f"{super().extra_repr()}, merged {self.merge_role} (was {before['in']} -> {before['out']})"


def narrowed_batchnorm(bn: nn.BatchNorm2d, channels: int) -> nn.BatchNorm2d:
    """A BatchNorm2d like `bn` (eps, momentum, affine, running statistics, device, dtype, mode) over
    `channels` channels, freshly initialised."""
    weight = bn.running_mean if bn.running_mean is not None else bn.weight
    new = nn.BatchNorm2d(channels, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=weight.device, dtype=weight.dtype)
    if bn.affine:
        for parameter in new.parameters():
            parameter.requires_grad_(bn.weight.requires_grad)
    return new.train(bn.training)


class MergedBlock:
    """A merged bottleneck as the freezer sees it: its three convs as factors, in data-flow order
    (the BatchNorms between them are the model's own layers, outside the factors)."""

    kind = "merged"

    def __init__(self, first: MergedConv2d, middle: MergedConv2d, last: MergedConv2d):
        self.factors = [first, middle, last]

    @property
    def rank(self) -> tuple[int, int]:
        return self.factors[1].in_channels, self.factors[1].out_channels

    def parameters(self) -> Iterator[nn.Parameter]:
        for conv in self.factors:
            yield from conv.parameters()


class BottleneckChain(nn.Module):
    """`first -> bn1 -> act1 -> middle -> bn2 -> act2 -> last [-> bn3]` run alone: one form of a
    bottleneck's branch (original, decomposed or merged), for timing it as a unit.

    Args:
        modules: the seven or eight modules in order (a side without activation: None); the
            convs may be decomposed layers.
        act1 / act2: activation names (keys of ACTIVATION_FUNCTIONS, a trailing "_" ignored) or None.
    """

    def __init__(self, first: nn.Module, bn1: nn.Module, middle: nn.Module, bn2: nn.Module, last: nn.Module,
                 bn3: nn.Module | None = None, act1: str | None = None, act2: str | None = None):
        super().__init__()
        self.first, self.bn1, self.middle, self.bn2, self.last = first, bn1, middle, bn2, last
        self.bn3 = bn3 if bn3 is not None else nn.Identity()
        self.act1, self.act2 = _activation(act1), _activation(act2)
        self._names = (act1, act2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.first(x)))
        x = self.act2(self.bn2(self.middle(x)))
        return self.bn3(self.last(x))

    def narrowed(self, rank: tuple[int, int], block_name: str = "") -> "BottleneckChain":
        """This block merged at `rank` = (r1, r2): the shapes, default-initialised (for timing)."""
        modules = narrowed_block(self.first, self.bn1, self.middle, self.bn2, self.last, rank, block_name,
                                 last_bias=self.last.bias is not None or isinstance(self.bn3, nn.Identity))
        bn3 = None if isinstance(self.bn3, nn.Identity) else self.bn3
        return BottleneckChain(*modules, bn3=bn3, act1=self._names[0], act2=self._names[1])

    def signature(self) -> str:
        """Everything about the block that its speed depends on, except the input (a timing cache
        key, as rankopt's layer_signature is for one layer)."""
        parts = [f"{role} {'x'.join(str(d) for d in conv.weight.shape)} stride={tuple(conv.stride)} "
                 f"padding={conv.padding} dilation={tuple(conv.dilation)} bias={conv.bias is not None}"
                 for role, conv in (("first", self.first), ("middle", self.middle), ("last", self.last))]
        return (f"merged block [{'; '.join(parts)}] act1={self._names[0]} act2={self._names[1]} "
                f"bn3={not isinstance(self.bn3, nn.Identity)}")


def narrowed_block(first: nn.Conv2d, bn1: nn.BatchNorm2d, middle: nn.Conv2d, bn2: nn.BatchNorm2d, last: nn.Conv2d,
                   rank: tuple[int, int], block_name: str, last_bias: bool) -> tuple[nn.Module, ...]:
    """(first, bn1, middle, bn2, last) of a bottleneck merged at inner widths `rank` = (r1, r2),
    default-initialised: what the merge fills, or what rank optimization times."""
    r1, r2 = rank
    return (MergedConv2d.narrowed(first, first.in_channels, r1, "first", block_name, first.bias is not None),
            narrowed_batchnorm(bn1, r1),
            MergedConv2d.narrowed(middle, r1, r2, "middle", block_name, middle.bias is not None),
            narrowed_batchnorm(bn2, r2),
            MergedConv2d.narrowed(last, r2, last.out_channels, "last", block_name, last_bias))


def _activation(name: str | None):
    if name is None:
        return lambda x: x
    function = ACTIVATION_FUNCTIONS.get(name.rstrip("_"))
    if function is None:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATION_FUNCTIONS)}")
    return function
