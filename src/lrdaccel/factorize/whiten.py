"""Activation-aware factorization: minimise the error of a layer's OUTPUT on real inputs.

Plain SVD / HOOI minimise ||W - W'||_F, which treats every input direction alike. What matters
is E||(W - W') x||^2 = ||(W - W') S||_F^2 for any S with S S^T = C = E[x x^T], the (uncentred)
second moment of the layer's inputs. So factorize W S instead of W and undo S in the factor
that reads the input (truncation-aware whitening, SVD-LLM, arXiv 2403.07378): the truncation
then drops what the inputs rarely excite.

- Linear / 1x1 conv / Conv1D: SVD of W S = U Sigma V^T, first = sqrt(Sigma_r) V_r^T S^{-1},
  second = U_r sqrt(Sigma_r) (the sqrt(Sigma) split of `svd_split`). This is the exact optimum
  of E||(W - W') x||^2 over rank-r W' (Eckart-Young in the whitened space).
- Tucker-2 (k x k conv): with the patch covariance approximated as C (x) I (channel covariance,
  spatial positions alike), the output error is ||(W - W') x_in S^T||_F^2, a plain Frobenius
  norm of the kernel weighted on its input-channel mode. So HOOI runs on W x_in S^T, whose
  mode-1 unfolding is S^T W_(1), and the input factor is mapped back by S^{-1}. For fixed factors
  the HOOI core is then already the core re-fitted to minimise the (approximated) output error,
  so no separate refit is needed.

Everything is computed in float64. `damping` adds damping * mean(diag C) to the diagonal so a
singular covariance (dead inputs, inputs in a subspace) still has a Cholesky factor; where even
that fails, `WhiteningError` tells the caller to fall back to the plain factorization.
"""

from __future__ import annotations

import math

import torch

from lrdaccel.factorize.tucker2 import tucker2

# Relative to the mean input energy: whitening follows the inputs' spectrum over two decades and
# treats directions weaker than that alike. It regularises what a few calibration batches cannot
# estimate (MiniLM's 1536-wide FFN inputs from ~500 tokens: 1e-2 matched or beat 1e-4 and 1e-6
# on held-out sentences; on the Fashion-MNIST CNN 1e-6..1e-1 gave the same accuracy).
DEFAULT_DAMPING = 1e-2


class WhiteningError(ValueError):
    """The input covariance has no usable Cholesky factor (all-zero, NaN, or not PSD)."""


def check_damping(damping: float) -> None:
    """Refuse a damping that is not a finite number >= 0."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < math.inf:
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")


def whitening_factor(covariance: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """Lower-triangular S (float64) with S S^T = C + damping * mean(diag C) * I.

    Args:
        covariance: symmetric PSD [d, d] input second moment E[x x^T].
        damping: relative diagonal loading, >= 0.

    Raises:
        ValueError: damping negative or not finite, or a covariance that is not square.
        WhiteningError: the damped covariance is not positive definite (e.g. all inputs zero).
    """
    check_damping(damping)
    if covariance.dim() != 2 or covariance.shape[0] != covariance.shape[1]:
        raise ValueError(f"covariance must be square, got shape {tuple(covariance.shape)}")
    c = covariance.detach().to(torch.float64)
    if not torch.isfinite(c).all():
        raise WhiteningError("input covariance has NaN/Inf entries")
    c = (c + c.T) / 2
    scale = c.diagonal().mean()
    if not scale > 0:
        raise WhiteningError("input covariance is zero (the layer only ever saw zero inputs)")
    c = c + (damping * scale) * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    factor, info = torch.linalg.cholesky_ex(c)
    if info.item() != 0:
        raise WhiteningError(f"damped input covariance is not positive definite (Cholesky pivot {info.item()})")
    return factor


def _undo_whitening(matrix: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """matrix @ S^{-1}, by a triangular solve (never an explicit inverse)."""
    return torch.linalg.solve_triangular(factor, matrix, upper=False, left=False)


def whitened_svd_split(
    weight: torch.Tensor,
    covariance: torch.Tensor,
    rank: int,
    damping: float = DEFAULT_DAMPING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split W [out, in] into (first [rank, in], second [out, rank]) minimising output error.

    Same shapes and sqrt(Sigma) convention as `svd_split`; at full rank second @ first == W.

    Args:
        weight: 2-D weight [out, in] (y = W x).
        covariance: [in, in] second moment of the inputs x.
        rank: 1 <= rank <= min(out, in).
        damping: see `whitening_factor`.

    Raises:
        ValueError: bad shapes or rank.
        WhiteningError: no usable whitening factor; fall back to `svd_split`.
    """
    if weight.dim() != 2:
        raise ValueError(f"whitened_svd_split expects a 2-D weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if not 0 < rank <= min(out_features, in_features):
        raise ValueError(f"rank must be in [1, {min(out_features, in_features)}], got {rank}")
    if tuple(covariance.shape) != (in_features, in_features):
        raise ValueError(f"covariance must be [{in_features}, {in_features}] for weight "
                         f"{out_features}x{in_features}, got {tuple(covariance.shape)}")
    factor = whitening_factor(covariance.to(weight.device), damping)
    w = weight.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(w @ factor, full_matrices=False)
    root = s[:rank].sqrt()
    first = _undo_whitening(root[:, None] * vh[:rank], factor)
    second = u[:, :rank] * root[None, :]
    return first.to(weight.dtype), second.to(weight.dtype)


def whitened_tucker2(
    weight: torch.Tensor,
    covariance: torch.Tensor,
    rank_in: int,
    rank_out: int,
    n_iter: int = 2,
    damping: float = DEFAULT_DAMPING,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of a conv kernel minimising output error: (U_in, core, U_out) as `tucker2` returns.

    U_in [C_in, r_in] is S^{-T} times an orthonormal basis, so it is not itself orthonormal; the
    input 1x1 conv's weight is U_in^T as with `tucker2`. At full ranks the product is exact.

    Args:
        weight: conv kernel [C_out, C_in, kh, kw].
        covariance: [C_in, C_in] second moment of the input channels over positions.
        rank_in, rank_out: ranks of the input- and output-channel modes.
        n_iter: HOOI sweeps after the (whitened) HOSVD.
        damping: see `whitening_factor`.

    Raises:
        ValueError: bad shapes or ranks.
        WhiteningError: no usable whitening factor; fall back to `tucker2`.
    """
    if weight.dim() != 4:
        raise ValueError(f"whitened_tucker2 expects a 4-D conv kernel, got shape {tuple(weight.shape)}")
    c_in = weight.shape[1]
    if tuple(covariance.shape) != (c_in, c_in):
        raise ValueError(f"covariance must be [{c_in}, {c_in}] for a kernel with {c_in} input channels, "
                         f"got {tuple(covariance.shape)}")
    factor = whitening_factor(covariance.to(weight.device), damping)
    whitened = torch.einsum("oihw,ij->ojhw", weight.detach().to(torch.float64), factor)
    u_white, core, u_out = tucker2(whitened, rank_in, rank_out, n_iter=n_iter)
    # first 1x1 weight = U^T S^{-1}; return its transpose to keep tucker2's convention.
    u_in = _undo_whitening(u_white.T, factor).T
    cast = dict(dtype=weight.dtype)
    return u_in.to(**cast), core.to(**cast), u_out.to(**cast)
