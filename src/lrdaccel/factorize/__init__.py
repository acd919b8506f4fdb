"""Tensor math only (no nn.Module): rank arithmetic, truncated SVD, Tucker-2, whitening.

Everything here takes and returns plain tensors and numbers so it can be tested and reused
apart from any layer or model code.
"""

from lrdaccel.factorize.ranks import (
    Rank,
    check_ratio,
    svd_params,
    svd_rank,
    tucker2_params,
    tucker2_ranks,
)
from lrdaccel.factorize.truncated_svd import check_finite, svd_split
from lrdaccel.factorize.tucker2 import tucker2

__all__ = [
    "Rank",
    "check_finite",
    "check_ratio",
    "svd_params",
    "svd_rank",
    "svd_split",
    "tucker2",
    "tucker2_params",
    "tucker2_ranks",
]
