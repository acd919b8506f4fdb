"""Tucker-2 decomposed k x k Conv2d: 1x1 C_in -> r_in, k x k core r_in -> r_out, 1x1 r_out -> C_out.

The core keeps the original kernel size, stride, padding (ints, tuples, 'same', 'valid'),
dilation and padding mode; the last 1x1 carries the bias. Channel mixing commutes with every
padding mode (each is a spatial copy or zero), so the chain equals the original at full rank.
"""

from __future__ import annotations


import torch
from torch import nn

from lrdaccel.factorize import check_finite, tucker2
from lrdaccel.factorize.ranks import tucker_pair
from lrdaccel.factorize.whiten import DEFAULT_DAMPING, whitened_tucker2
from lrdaccel.layers.base import ThreeConvModule, copy_module_state, factor_weight, whitened_or_plain

DEFAULT_HOOI_ITERS = 2


class TuckerConv2d(ThreeConvModule):
    """A k x k nn.Conv2d (groups=1) as a Tucker-2 chain of three convs."""

    kind = "tucker2"
    plain_method = "Tucker-2 (HOOI)"

    @classmethod
    def like(cls, dense: nn.Conv2d, rank, name: str = "") -> "TuckerConv2d":
        """The right shapes, device and dtype for `dense` at `rank`, without factorizing."""
        if dense.groups != 1:
            raise ValueError(f"layer {name!r}: Tucker-2 needs groups=1, got groups={dense.groups}")
        rank_in, rank_out = tucker_pair(rank, name, dense.in_channels, dense.out_channels)
        return copy_module_state(dense, cls(dense, rank_in, rank_out))

    @classmethod
    def from_dense(cls, dense: nn.Conv2d, rank, name: str = "", n_iter: int | None = None,
                   input_covariance: torch.Tensor | None = None, damping: float = DEFAULT_DAMPING) -> "TuckerConv2d":
        """The factorized layer: HOOI with `n_iter` sweeps (default 2); with `input_covariance`
        (the input channels' E[x x^T] over positions, from `lrdaccel.calibration`) the kernel is
        weighted on its input-channel mode so the factors minimise output error."""
        n_iter = DEFAULT_HOOI_ITERS if n_iter is None else n_iter
        layer = cls.like(dense, rank, name)
        check_finite(dense.weight, name)
        whitened = None
        if input_covariance is not None:
            whitened = lambda: whitened_tucker2(  # noqa: E731
                dense.weight, input_covariance, *layer.rank, n_iter=n_iter, damping=damping)
        u_in, core, u_out = whitened_or_plain(name, cls.plain_method, whitened,
                                              lambda: tucker2(dense.weight, *layer.rank, n_iter=n_iter))
        return layer.fill(u_in, core, u_out, dense.bias)

    def dense_weight(self) -> torch.Tensor:
        return torch.einsum("srhw,os,ri->oihw", factor_weight(self.core), factor_weight(self.last)[:, :, 0, 0],
                            factor_weight(self.first)[:, :, 0, 0])

