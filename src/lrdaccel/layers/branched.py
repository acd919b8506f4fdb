"""Branched Tucker-2 k x k Conv2d: 1x1 C_in -> r1, k x k core r1 -> r2 as a grouped conv of N
branches, 1x1 r2 -> C_out (lrdaccel.factorize.branched has the math and what is exact).

Same chain and conv geometry as TuckerConv2d, with the core's weights cut N-fold at the same
ranks; freezing and save/load treat it as a three-factor layer like Tucker-2.
"""

from __future__ import annotations


import torch
from torch import nn

from lrdaccel.factorize import check_finite
from lrdaccel.factorize.branched import DEFAULT_ALS_ITERS, branched_dense, branched_tucker2, check_branched_rank
from lrdaccel.factorize.whiten import DEFAULT_DAMPING
from lrdaccel.layers.base import ThreeConvModule, copy_module_state, factor_weight, whitened_or_plain


class BranchedTuckerConv2d(ThreeConvModule):
    """A k x k nn.Conv2d (groups=1) as 1x1 -> grouped k x k (N branches) -> 1x1."""

    kind = "tucker2_branched"
    plain_method = "branched Tucker-2 (ALS)"

    def __init__(self, dense: nn.Conv2d, rank_in: int, rank_out: int, branches: int):
        super().__init__(dense, rank_in, rank_out, groups=branches)

    @classmethod
    def like(cls, dense: nn.Conv2d, rank, name: str = "", branches: int = 2) -> "BranchedTuckerConv2d":
        """The right shapes, device and dtype for `dense` at `rank` = (r1, r2) with `branches`
        branches, without factorizing."""
        if dense.groups != 1:
            raise ValueError(f"layer {name!r}: branched Tucker-2 needs groups=1, got groups={dense.groups}")
        rank_in, rank_out = rank if isinstance(rank, (tuple, list)) and len(rank) == 2 else (rank, rank)
        check_branched_rank(rank_in, rank_out, branches, dense.in_channels, dense.out_channels, name)
        return copy_module_state(dense, cls(dense, rank_in, rank_out, branches))

    @classmethod
    def from_dense(cls, dense: nn.Conv2d, rank, name: str = "", branches: int = 2, n_iter: int | None = None,
                   input_covariance: torch.Tensor | None = None,
                   damping: float = DEFAULT_DAMPING) -> "BranchedTuckerConv2d":
        """The fitted layer: N Tucker-2 terms by deflation then `n_iter` ALS sweeps (default 4);
        with `input_covariance` (E[x x^T] of the input channels) the fit minimises output error."""
        layer = cls.like(dense, rank, name, branches)
        check_finite(dense.weight, name)
        n_iter = DEFAULT_ALS_ITERS if n_iter is None else n_iter
        fit = lambda covariance: branched_tucker2(  # noqa: E731
            dense.weight, *layer.rank, branches, n_iter=n_iter, covariance=covariance, damping=damping)
        whitened = None if input_covariance is None else (lambda: fit(input_covariance))
        u_in, core, u_out = whitened_or_plain(name, cls.plain_method, whitened, lambda: fit(None))
        return layer.fill(u_in, core, u_out, dense.bias)

    @property
    def branches(self) -> int:
        return self.core.groups

    def dense_weight(self) -> torch.Tensor:
        return branched_dense(factor_weight(self.first)[:, :, 0, 0].T, factor_weight(self.core),
                              factor_weight(self.last)[:, :, 0, 0], self.branches)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, branches={self.branches}"
