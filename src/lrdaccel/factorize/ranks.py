"""Rank formulas: compression ratio -> rank, and parameter counts of the decomposed shapes.

`ratio` is, per layer, parameters of the original weight / parameters of the decomposed weights
(biases excluded on both sides, as in arXiv 2309.03824 and 2407.20266).
"""

from __future__ import annotations

import math


def _check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 1):
        raise ValueError(f"ratio must be a finite number > 1, got {ratio!r}")


def svd_params(out_features: int, in_features: int, rank: int) -> int:
    """Weights of the two SVD factors: in -> rank and rank -> out."""
    return rank * (in_features + out_features)


def svd_rank(out_features: int, in_features: int, ratio: float) -> int:
    """R = floor(C*S / (ratio*(C+S))): the largest rank whose factors fit the ratio's budget.

    May be 0 for a tiny layer at a high ratio; the caller decides what to do with that.
    """
    _check_ratio(ratio)
    c, s = out_features, in_features
    # Integer arithmetic where the ratio is integral keeps the floor exact (2048*1000/(2*3048)).
    return int(math.floor(c * s / (ratio * (c + s)) + 1e-9))


def tucker2_params(in_channels: int, out_channels: int, kernel_area: int, rank_in: int, rank_out: int) -> int:
    """Weights of C_in -> r_in (1x1), the k x k core r_in -> r_out, and r_out -> C_out (1x1)."""
    return in_channels * rank_in + kernel_area * rank_in * rank_out + rank_out * out_channels


def tucker2_ranks(
    in_channels: int,
    out_channels: int,
    kernel_area: int,
    ratio: float,
    beta: float = 1.0,
) -> tuple[int, int]:
    """The largest (r_in, r_out = floor(beta*r_in)) whose weights fit C_in*C_out*k^2/ratio.

    The published formula does not bound the ranks by the channel counts; a narrow-in, wide-out
    conv can ask for r_in > C_in, which adds parameters without adding expressiveness. So each
    rank is clamped to its channel count, and the freed budget is not redistributed (the
    decomposition at a clamped rank is exact on that mode).
    """
    _check_ratio(ratio)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    budget = in_channels * out_channels * kernel_area / ratio

    def cost(r: int) -> int:
        return tucker2_params(in_channels, out_channels, kernel_area, r, math.floor(beta * r))

    # Closed form of k^2*beta*r^2 + (C_in + beta*C_out)*r = budget, then fix rounding either way.
    a, b = kernel_area * beta, in_channels + beta * out_channels
    r = max(0, int((-b + math.sqrt(b * b + 4 * a * budget)) / (2 * a)))
    while r > 0 and cost(r) > budget:
        r -= 1
    while cost(r + 1) <= budget:
        r += 1
    return min(r, in_channels), min(math.floor(beta * r), out_channels)
