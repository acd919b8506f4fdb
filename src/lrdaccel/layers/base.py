"""What every decomposed layer shares: its factors in data-flow order, a rank, a dense view, and
filling the factors from a dense weight, plainly or whitened by the layer's input statistics."""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import nn

from lrdaccel.factorize.whiten import WhiteningError


class LowRankModule(nn.Module):
    """A decomposed layer: a chain of sub-layers (`factors`) standing in for one dense layer.

    Subclasses set `kind` ("svd" or "tucker2"), build their factors as child modules and
    implement `forward`, `to_dense` and `dense_params`.
    """

    kind: str = ""
    plain_method: str = ""  # what from_dense falls back to where whitening is impossible, for messages

    @property
    def factors(self) -> list[nn.Module]:
        """Sub-layers in data-flow order; the freezer rotates over these."""
        raise NotImplementedError

    @property
    def rank(self) -> int | tuple[int, int]:
        raise NotImplementedError

    def dense_params(self) -> int:
        """Weight parameters of the dense layer this one replaces (biases excluded)."""
        raise NotImplementedError

    def factor_params(self) -> int:
        """Weight parameters of the factors (biases excluded)."""
        return sum(factor_weight(f).numel() for f in self.factors)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight, in the replaced layer's layout (differentiable)."""
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """The equivalent dense weight, rebuilt from the factors on each access, read-only.

        Third-party code often reads `layer.weight` of the layer we replaced (HF ViT reads
        `projection.weight.dtype` every forward); this keeps such code correct. It costs a small
        matrix product, so hot paths should use the factors. Writing into it in place (e.g.
        `nn.init.zeros_(layer.weight)`) raises: the write would change nothing.
        """
        weight = self.dense_weight()
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
            return weight
        return weight.as_subclass(RebuiltWeight)

    @property
    def bias(self) -> torch.Tensor | None:
        """The original bias, carried by the last factor."""
        return self.factors[-1].bias

    def to_dense(self) -> nn.Module:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, rank={self.rank}, "
            f"compression={self.dense_params() / self.factor_params():.2f}x"
        )


def factor_weight(module: nn.Module) -> torch.Tensor:
    """A factor's weight as a float tensor: the parameter itself (differentiable), or for a layer
    quantized by torch.ao (`lrd.quantize`), which gives an int8 tensor through a method,
    `weight()`, its dequantized values; so the repr and the dense view work on a served model."""
    weight = module.weight
    weight = weight() if callable(weight) else weight
    return weight.dequantize() if weight.is_quantized else weight


CONV_ATTRIBUTES = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                   "padding_mode")


def copy_conv_attributes(dense: nn.Conv2d, target: nn.Module) -> None:
    """Give a decomposed conv the attributes code reads off the conv it replaces (with its
    values), and the name of that conv's class (`source`) for the plan and save/load."""
    for attribute in CONV_ATTRIBUTES:
        setattr(target, attribute, getattr(dense, attribute))
    target.source = type(dense).__name__


def is_channels_last(weight: torch.Tensor) -> bool:
    """A 4-d weight laid out channels_last (NHWC), e.g. by `model.to(memory_format=torch.channels_last)`.

    A 1x1 kernel is both layouts at once and reads as contiguous here.
    """
    return weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def copy_module_state(source: nn.Module, target: nn.Module) -> nn.Module:
    """Match device, dtype, memory format, requires_grad and training mode of `source` on `target`.

    The memory format matters for speed, not values: a channels_last model whose new convs had
    contiguous weights would have cuDNN convert each weight on every call (and the layers after
    them see a different layout)."""
    weight = source.weight
    target.to(device=weight.device, dtype=weight.dtype)
    if is_channels_last(weight):
        target.to(memory_format=torch.channels_last)
    for parameter in target.parameters():
        parameter.requires_grad_(weight.requires_grad)
    target.train(source.training)
    return target


@torch.no_grad()
def assign(parameter: nn.Parameter, value: torch.Tensor) -> None:
    parameter.copy_(value.reshape(parameter.shape))


class RebuiltWeight(torch.Tensor):
    """A decomposed layer's dense weight as read through `.weight`: any in-place write raises.

    Operations on it return plain tensors; only writes into it are refused, naming what to write
    into instead.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        in_place = (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS
        if in_place and args and isinstance(args[0], RebuiltWeight):
            raise RuntimeError(
                f"{name}: a decomposed layer's .weight is rebuilt from its factors on every read, so writing "
                f"into it changes nothing; write into the factors (layer.factors[i].weight) instead")
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


_IN_PLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__ipow__",
                     "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__"}


def whitened_or_plain(name: str, plain_method: str, whitened: Callable[[], object] | None,
                      plain: Callable[[], object]) -> object:
    """The whitened factorization where input statistics were given and usable, else the plain
    one; a warning naming the layer says when statistics were given but could not be used."""
    if whitened is not None:
        try:
            return whitened()
        except WhiteningError as error:
            warn_plain(name, str(error), plain_method)
    return plain()


def warn_plain(name: str, why: str, plain_method: str) -> None:
    warnings.warn(f"layer {name!r}: {why}; using plain {plain_method} instead of whitening", stacklevel=4)


class ThreeConvModule(LowRankModule):
    """1x1 C_in -> r_in, a k x k core r_in -> r_out (in `groups` branches) with the original's
    stride, padding, dilation and padding mode, 1x1 r_out -> C_out with the bias: the structure
    Tucker-2 and branched Tucker-2 share."""

    def __init__(self, dense: nn.Conv2d, rank_in: int, rank_out: int, groups: int = 1):
        super().__init__()
        copy_conv_attributes(dense, self)
        self.first = nn.Conv2d(dense.in_channels, rank_in, kernel_size=1, bias=False)
        self.core = nn.Conv2d(
            rank_in, rank_out, kernel_size=dense.kernel_size, stride=dense.stride, padding=dense.padding,
            dilation=dense.dilation, groups=groups, padding_mode=dense.padding_mode, bias=False,
        )
        self.last = nn.Conv2d(rank_out, dense.out_channels, kernel_size=1, bias=dense.bias is not None)

    @property
    def factors(self) -> list[nn.Module]:
        return [self.first, self.core, self.last]

    @property
    def rank(self) -> tuple[int, int]:
        return self.core.in_channels, self.core.out_channels

    def dense_params(self) -> int:
        return self.in_channels * self.out_channels * math.prod(self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    @torch.no_grad()
    def to_dense(self) -> nn.Conv2d:
        c = self.core
        dense = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=c.stride, padding=c.padding,
            dilation=c.dilation, padding_mode=c.padding_mode, bias=self.bias is not None,
            device=c.weight.device, dtype=c.weight.dtype,
        )
        dense.weight.copy_(self.dense_weight())
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense.train(self.training)

    def fill(self, u_in: torch.Tensor, core: torch.Tensor, u_out: torch.Tensor, bias: torch.Tensor | None):
        """Set the factors (first = u_in^T) and the original bias; returns self."""
        assign(self.first.weight, u_in.T)
        assign(self.core.weight, core)
        assign(self.last.weight, u_out)
        if bias is not None:
            assign(self.last.bias, bias)
        return self

