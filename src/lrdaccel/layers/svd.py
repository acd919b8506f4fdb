"""SVD-decomposed Linear, GPT-2 style Conv1D, and 1x1 Conv2d: in -> rank -> out.

The first factor has no bias; the second carries the original bias. For a 1x1 conv the first
factor carries the stride, padding and padding mode, so padded positions still come out as the
bias alone, exactly as in the original layer.

A 1x1 SVDConv2d has two execution forms with the same weights and the same math: "conv" (two
1x1 convs) and "linear" (one matrix product over the channels of every pixel, through a
channels-last view: one GEMM over N*H*W rows, where eager PyTorch runs a stride-1 1x1 conv at a
small batch as N per-sample GEMMs). Which is faster depends on the machine, the shapes and the
input's memory format, so rank optimization times both (`optimize_ranks`, runtime "eager") and
the plan records the choice; `set_form` applies it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lrdaccel.factorize import check_finite, svd_split
from lrdaccel.factorize.whiten import DEFAULT_DAMPING, whitened_svd_split
from lrdaccel.layers.base import (LowRankModule, assign, copy_conv_attributes, copy_module_state, factor_weight,
                                  whitened_or_plain)


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face `transformers.pytorch_utils.Conv1D` (or a subclass): a Linear with a
    transposed weight. Matched by class name and attributes so that transformers stays optional.
    """
    return any(cls.__name__ == "Conv1D" for cls in type(module).__mro__) and hasattr(module, "nf") \
        and hasattr(module, "nx")


def dense_linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear or Conv1D as [out, in]."""
    return module.weight.T if is_conv1d(module) else module.weight


def _check_rank(name: str, rank: int, out_features: int, in_features: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= min(out_features, in_features):
        raise ValueError(
            f"layer {name!r}: SVD rank must be an int in [1, {min(out_features, in_features)}] "
            f"for weight {out_features}x{in_features}, got {rank!r}"
        )


class _TwoFactors(LowRankModule):
    """What SVDLinear and SVDConv2d share: first (in -> rank) then second (rank -> out, bias)."""

    kind = "svd"
    plain_method = "SVD"

    def _fill(self, weight: torch.Tensor, bias: torch.Tensor | None, name: str,
              input_covariance: torch.Tensor | None, damping: float) -> "_TwoFactors":
        """Set the factors from the SVD of a 2-D weight [out, in] (whitened by the input
        covariance where given) and copy the bias."""
        check_finite(weight, name)
        whitened = None
        if input_covariance is not None:
            whitened = lambda: whitened_svd_split(weight, input_covariance, self.rank, damping)  # noqa: E731
        first, second = whitened_or_plain(name, self.plain_method, whitened, lambda: svd_split(weight, self.rank))
        assign(self.first.weight, first)
        assign(self.second.weight, second)
        if bias is not None:
            assign(self.second.bias, bias)
        return self

    @property
    def factors(self) -> list[nn.Module]:
        return [self.first, self.second]

    @property
    def rank(self) -> int:
        return factor_weight(self.first).shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class SVDLinear(_TwoFactors):
    """nn.Linear (or HF Conv1D) as Linear(in, rank, bias=False) -> Linear(rank, out, bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, source: str = "Linear",
                 transposed: bool | None = None):
        super().__init__()
        _check_rank("SVDLinear", rank, out_features, in_features)
        self.in_features, self.out_features, self.source = in_features, out_features, source
        # Conv1D keeps its weight as [in, out]: dense_weight and to_dense give it back that way.
        self.transposed = source == "Conv1D" if transposed is None else transposed
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def like(cls, dense: nn.Module, rank: int, name: str = "") -> "SVDLinear":
        """The right shapes, device and dtype for `dense` at `rank`, without factorizing."""
        out_features, in_features = dense_linear_weight(dense).shape
        _check_rank(name, rank, out_features, in_features)
        layer = cls(in_features, out_features, rank, bias=dense.bias is not None, source=type(dense).__name__,
                    transposed=is_conv1d(dense))
        return copy_module_state(dense, layer)

    @classmethod
    def from_dense(cls, dense: nn.Module, rank: int, name: str = "", input_covariance: torch.Tensor | None = None,
                   damping: float = DEFAULT_DAMPING) -> "SVDLinear":
        """The factorized layer; with `input_covariance` (E[x x^T] of the layer's inputs, from
        `lrdaccel.calibration`) the factors minimise output error rather than weight error."""
        layer = cls.like(dense, rank, name)
        return layer._fill(dense_linear_weight(dense), dense.bias, name, input_covariance, damping)

    def dense_params(self) -> int:
        return self.in_features * self.out_features

    def dense_weight(self) -> torch.Tensor:
        weight = factor_weight(self.second) @ factor_weight(self.first)
        return weight.T if self.transposed else weight

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """The product as one layer, of the class it was built from (Linear or Conv1D)."""
        w = self.first.weight
        if self.transposed:
            from transformers.pytorch_utils import Conv1D

            dense = Conv1D(self.out_features, self.in_features).to(device=w.device, dtype=w.dtype)
        else:
            dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                              device=w.device, dtype=w.dtype)
        dense.weight.copy_(self.dense_weight())
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense.train(self.training)


class SVDConv2d(_TwoFactors):
    """A 1x1 nn.Conv2d (groups=1) as Conv2d(C, rank, 1, stride, padding) -> Conv2d(rank, S, 1, bias).

    Attributes:
        form: "conv" (default) or "linear" (see the module docstring; `set_form` checks it).
    """

    FORMS = ("conv", "linear")

    def __init__(self, dense: nn.Conv2d, rank: int):
        super().__init__()
        copy_conv_attributes(dense, self)
        self.first = nn.Conv2d(
            dense.in_channels, rank, kernel_size=1, stride=dense.stride, padding=dense.padding,
            dilation=dense.dilation, padding_mode=dense.padding_mode, bias=False,
        )
        self.second = nn.Conv2d(rank, dense.out_channels, kernel_size=1, bias=dense.bias is not None)
        self.form = "conv"

    def linear_form_allowed(self) -> str | None:
        """None where the "linear" form computes the same as the convs, else why not."""
        first = self.first
        if tuple(first.stride) != (1, 1) or first.padding not in ((0, 0), "valid"):
            return f"stride {tuple(first.stride)} and padding {first.padding} are not a plain per-pixel product"
        return None

    def set_form(self, form: str) -> "SVDConv2d":
        """Run as two 1x1 convs ("conv") or as one product over channels ("linear"); same weights.

        Raises:
            ValueError: an unknown form, or "linear" where stride or padding make it differ.
        """
        if form not in self.FORMS:
            raise ValueError(f"SVDConv2d form must be one of {self.FORMS}, got {form!r}")
        why = self.linear_form_allowed() if form == "linear" else None
        if why is not None:
            raise ValueError(f"SVDConv2d form 'linear': {why}")
        self.form = form
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form != "linear" or x.dim() != 4:
            return self.second(self.first(x))
        # Channels-last view: [N, H, W, C] rows; free when x is channels_last, one copy otherwise.
        y = F.linear(x.permute(0, 2, 3, 1), self.first.weight.flatten(1))
        y = F.linear(y, self.second.weight.flatten(1), self.second.bias).permute(0, 3, 1, 2)
        # Hand on the memory format that came in, so the layers after it run as they did.
        return y if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else y.contiguous()

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", form={self.form}" if self.form != "conv" else "")

    @classmethod
    def like(cls, dense: nn.Conv2d, rank: int, name: str = "") -> "SVDConv2d":
        if dense.kernel_size != (1, 1) or dense.groups != 1:
            raise ValueError(
                f"layer {name!r}: SVDConv2d needs a 1x1 conv with groups=1, got kernel "
                f"{dense.kernel_size} groups={dense.groups}"
            )
        _check_rank(name, rank, dense.out_channels, dense.in_channels)
        return copy_module_state(dense, cls(dense, rank))

    @classmethod
    def from_dense(cls, dense: nn.Conv2d, rank: int, name: str = "", input_covariance: torch.Tensor | None = None,
                   damping: float = DEFAULT_DAMPING) -> "SVDConv2d":
        """As `SVDLinear.from_dense`; the covariance is over the pixels the conv reads."""
        layer = cls.like(dense, rank, name)
        return layer._fill(dense.weight[:, :, 0, 0], dense.bias, name, input_covariance, damping)

    def dense_params(self) -> int:
        return self.in_channels * self.out_channels

    def dense_weight(self) -> torch.Tensor:
        return (factor_weight(self.second)[:, :, 0, 0] @ factor_weight(self.first)[:, :, 0, 0])[:, :, None, None]

    @torch.no_grad()
    def to_dense(self) -> nn.Conv2d:
        f = self.first
        dense = nn.Conv2d(
            self.in_channels, self.out_channels, 1, stride=f.stride, padding=f.padding, dilation=f.dilation,
            padding_mode=f.padding_mode, bias=self.bias is not None, device=f.weight.device, dtype=f.weight.dtype,
        )
        dense.weight.copy_(self.dense_weight())
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense.train(self.training)
