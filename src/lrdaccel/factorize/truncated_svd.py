"""Truncated SVD split of a 2-D weight into two factors, sqrt(Sigma) on each."""

from __future__ import annotations

import torch


def check_finite(weight: torch.Tensor, name: str) -> None:
    """Refuse NaN/Inf weights: an SVD of them is garbage, silently."""
    if not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).sum().item()
        raise ValueError(f"layer {name!r}: weight has {bad} NaN/Inf value(s); cannot decompose")


def svd_split(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split W [out, in] into (first [rank, in], second [out, rank]) with W ~= second @ first.

    Computed in float64 for accuracy, returned in the weight's dtype and device. Splitting
    sqrt(Sigma) evenly keeps both factors at a similar scale, which matters when one is frozen
    and the other trains (sequential freezing).
    """
    if weight.dim() != 2:
        raise ValueError(f"svd_split expects a 2-D weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if not 0 < rank <= min(out_features, in_features):
        raise ValueError(f"rank must be in [1, {min(out_features, in_features)}], got {rank}")
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    first = root[:, None] * vh[:rank]
    second = u[:, :rank] * root[None, :]
    return first.to(weight.dtype), second.to(weight.dtype)
