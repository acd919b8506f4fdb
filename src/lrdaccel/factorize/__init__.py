"""Tensor math only (no nn.Module): rank formulas, truncated SVD, Tucker-2.

Everything here takes and returns plain tensors so it can be tested and reused apart from any
layer or model code.
"""

from lrdaccel.factorize.ranks import (
    svd_params,
    svd_rank,
    tucker2_params,
    tucker2_ranks,
)
from lrdaccel.factorize.svd import check_finite, svd_split
from lrdaccel.factorize.tucker import tucker2

__all__ = [
    "check_finite",
    "svd_params",
    "svd_rank",
    "svd_split",
    "tucker2",
    "tucker2_params",
    "tucker2_ranks",
]
