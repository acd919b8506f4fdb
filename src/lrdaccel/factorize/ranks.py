"""Rank arithmetic, all of it: compression ratio -> rank, parameter and MAC counts of the
decomposed shapes, and the checks on ratios and ranks.

`ratio` is, per layer, parameters of the original weight / parameters of the decomposed weights
(biases excluded on both sides, as in arXiv 2309.03824 and 2407.20266). A layer's geometry is
the `shape` dict the plan records: {"out": C_out, "in": C_in, "kernel": [kh, kw]}.
"""

from __future__ import annotations

import math
from typing import Any

Rank = int | tuple[int, int] | None
"""int for SVD, (rank_in, rank_out) for Tucker-2, None for a layer kept as it is."""


def check_ratio(ratio: Any, what: str = "ratio") -> None:
    """A compression ratio must be a finite number > 1 (not a bool)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 1:
        raise ValueError(f"{what} must be a finite number > 1, got {ratio!r}")


def svd_params(out_features: int, in_features: int, rank: int) -> int:
    """Weights of the two SVD factors: in -> rank and rank -> out."""
    return rank * (in_features + out_features)


def svd_rank(out_features: int, in_features: int, ratio: float) -> int:
    """R = floor(C*S / (ratio*(C+S))): the largest rank whose factors fit the ratio's budget.

    May be 0 for a tiny layer at a high ratio; the caller decides what to do with that.
    """
    check_ratio(ratio)
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
    check_ratio(ratio)
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


def tucker_pair(rank: Any, name: str, in_channels: int, out_channels: int) -> tuple[int, int]:
    """A Tucker-2 rank as (rank_in, rank_out); an int means both. Checked against the channels.

    Raises:
        ValueError: naming the layer, unless 1 <= rank_in <= C_in and 1 <= rank_out <= C_out.
    """
    pair = (rank, rank) if isinstance(rank, int) and not isinstance(rank, bool) else rank
    try:
        pair = tuple(pair)
    except TypeError:
        pair = ()
    ok = (
        len(pair) == 2
        and all(isinstance(r, int) and not isinstance(r, bool) for r in pair)
        and 0 < pair[0] <= in_channels
        and 0 < pair[1] <= out_channels
    )
    if not ok:
        raise ValueError(
            f"layer {name!r}: Tucker-2 rank must be an int or (rank_in, rank_out) with "
            f"1 <= rank_in <= {in_channels} and 1 <= rank_out <= {out_channels}, got {rank!r}"
        )
    return pair


def weight_params(shape: dict) -> int:
    """Weights of the dense layer of this geometry."""
    return shape["out"] * shape["in"] * math.prod(shape["kernel"])


def layer_cost(kind: str, rank: Rank, shape: dict, stride: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    """(weight params, MACs per output position) of a layer of `shape` decomposed as `kind` at `rank`.

    For Tucker-2 the input 1x1 runs at input resolution: stride_h*stride_w positions per output
    position.
    """
    c_out, c_in, area = shape["out"], shape["in"], math.prod(shape["kernel"])
    if kind == "keep":
        return c_out * c_in * area, c_out * c_in * area
    if kind == "svd":
        params = svd_params(c_out, c_in, rank)
        return params, params
    r_in, r_out = rank
    params = tucker2_params(c_in, c_out, area, r_in, r_out)
    macs = c_in * r_in * stride[0] * stride[1] + area * r_in * r_out + r_out * c_out
    return params, macs


def full_rank(kind: str, shape: dict) -> Rank:
    """The rank at which a decomposition reproduces the layer exactly."""
    return min(shape["out"], shape["in"]) if kind == "svd" else (shape["in"], shape["out"])


def ratio_rank(kind: str, shape: dict, ratio: float, beta: float = 1.0) -> Rank:
    """The ratio's rank, never above the channel counts (may be 0 for a tiny layer)."""
    c_out, c_in = shape["out"], shape["in"]
    if kind == "svd":
        return min(svd_rank(c_out, c_in, ratio), c_out, c_in)
    return tucker2_ranks(c_in, c_out, math.prod(shape["kernel"]), ratio, beta)


def below_min_rank(rank: Rank, shape: dict, min_rank: int) -> bool:
    """True where a rank is under min_rank, unless it already spans its whole channel mode."""
    if isinstance(rank, int):
        return rank < min(min_rank, shape["out"], shape["in"])
    r_in, r_out = rank
    return r_in < min(min_rank, shape["in"]) or r_out < min(min_rank, shape["out"])
