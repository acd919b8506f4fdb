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

Sequential calibration (lrdaccel.decomposition.sequential) needs two closed-form re-solves for a layer whose
inputs x_hat differ from the original's x: `least_squares_last_factor` (the last factor and bias
given the others) and `reduced_rank_fit` (both SVD factors at once, reduced-rank regression).

Everything is computed in float64. `damping` adds damping * mean(diag C) to the diagonal so a
singular covariance (dead inputs, inputs in a subspace) still has a Cholesky factor; where even
that fails, `WhiteningError` tells the caller to fall back to the plain factorization.
"""

from __future__ import annotations

import math

import torch

from lrdaccel.factorize.tucker2 import _leading_left_singular_vectors, _unfold, tucker2

# Relative to the mean input energy: whitening follows the inputs' spectrum over two decades and
# treats directions weaker than that alike. It regularises what a few calibration batches cannot
# estimate (MiniLM's 1536-wide FFN inputs from ~500 tokens: 1e-2 matched or beat 1e-4 and 1e-6
# on held-out sentences; on the Fashion-MNIST CNN 1e-6..1e-1 gave the same accuracy).
DEFAULT_DAMPING = 1e-2


# What sequential calibration (lrdaccel.decomposition.sequential) re-solves in closed form: both SVD factors
# ("joint", reduced-rank regression; Tucker-2: the last 1x1), the last factor and bias ("last",
# least squares), or nothing ("none").
REFITS = ("joint", "last", "none")
# The re-solve's ridge, relative to the mean energy of what the re-solved factor reads; it pulls
# towards the factorization's own factors. 1e-3 on MiniLM's 1024 calibration sentences beat 1e-2
# and matched 1e-4.
DEFAULT_REFIT_DAMPING = 1e-3


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
    first, second = _truncated_unwhitened(weight.detach().to(torch.float64) @ factor, factor, rank)
    return first.to(weight.dtype), second.to(weight.dtype)


def _truncated_unwhitened(whitened: torch.Tensor, factor: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) of the rank-r SVD of a whitened weight W S (sqrt(Sigma) split), with the
    whitening undone in `first`: second @ first is the best rank-r W' for E||(W - W') x||^2."""
    u, s, vh = torch.linalg.svd(whitened, full_matrices=False)
    root = s[:rank].sqrt()
    return _undo_whitening(root[:, None] * vh[:rank], factor), u[:, :rank] * root[None, :]


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


# ---- closed-form re-solves for sequential calibration (lrdaccel.decomposition.sequential) ---------------------
#
# A layer of a partly decomposed model sees inputs x_hat where the original saw x. Given streamed
# moments of the pairs, these fit the new layer so that its output on x_hat matches the original
# layer's output on x, y = W x + b, in the least-squares sense.


def _relative_load(matrix: torch.Tensor, damping: float) -> float:
    """damping * mean(diag matrix): the ridge, relative to the mean energy, as in whitening."""
    return damping * float(matrix.diagonal().mean())


def least_squares_last_factor(
    factor_second_moment: torch.Tensor,
    target_cross: torch.Tensor,
    prior: torch.Tensor,
    factor_mean: torch.Tensor | None = None,
    target_mean: torch.Tensor | None = None,
    damping: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The last factor B [m, r] (and bias c [m] where means are given) that best maps what the
    earlier factors output, z, to the target y:

        min over B, c of  E||y - B z - c||^2 + lam ||B - B0||^2,   lam = damping * mean(diag E[z z^T])

    The ridge pulls B towards `prior` B0 (the factorization's own last factor), not towards 0:
    directions the calibration data never excites keep their factorized values, and when z and y
    come from the original layer itself the answer is B0 whatever lam. The normal equations
    [B c] [[E zz^T + lam I, E z], [E z^T, 1]] = [E yz^T + lam B0, E y] are solved by Cholesky in
    float64.

    Args:
        factor_second_moment: E[z z^T], [r, r].
        target_cross: E[y z^T], [m, r].
        prior: B0, [m, r].
        factor_mean / target_mean: E[z] [r] and E[y] [m]; both or neither (no bias).
        damping: >= 0.

    Raises:
        WhiteningError: the system is singular (z confined to a subspace and damping 0) or the
            statistics are not finite.
    """
    check_damping(damping)
    if (factor_mean is None) != (target_mean is None):
        raise ValueError("give both factor_mean and target_mean (a bias to fit) or neither")
    zz = factor_second_moment.to(torch.float64)
    rank = zz.shape[0]
    gram = zz + _relative_load(zz, damping) * torch.eye(rank, dtype=zz.dtype, device=zz.device)
    rhs = target_cross.to(torch.float64) + _relative_load(zz, damping) * prior.to(torch.float64)
    if factor_mean is not None:
        z_mean = factor_mean.to(torch.float64)
        gram = torch.cat([torch.cat([gram, z_mean[:, None]], 1),
                          torch.cat([z_mean, z_mean.new_ones(1)])[None, :]], 0)
        rhs = torch.cat([rhs, target_mean.to(torch.float64)[:, None]], 1)
    if not (torch.isfinite(gram).all() and torch.isfinite(rhs).all()):
        raise WhiteningError("the factor statistics have NaN/Inf entries")
    cholesky, info = torch.linalg.cholesky_ex(gram)
    if info.item() != 0:
        raise WhiteningError(f"the least-squares system for the last factor is singular (its input is confined "
                             f"to a subspace; pivot {info.item()}): give more calibration data or damping > 0")
    solution = torch.cholesky_solve(rhs.T, cholesky).T
    return (solution[:, :rank], solution[:, rank]) if factor_mean is not None else (solution, None)


def reduced_rank_fit(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    covariance: torch.Tensor,
    cross: torch.Tensor,
    rank: int,
    mean: torch.Tensor | None = None,
    original_mean: torch.Tensor | None = None,
    damping: float = DEFAULT_DAMPING,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Both SVD factors at once: the rank-r W' (and bias c) minimising E||W x + b - W' x_hat - c||^2,
    reduced-rank regression in closed form.

    With centred moments (where there is a bias; raw ones otherwise) C = Cov(x_hat) and
    X = Cov(x, x_hat), the full-rank least-squares map is M = W X C^{-1}, and the error of any W'
    is a constant plus ||(M - W') S||_F^2 for S S^T = C: the truncated SVD of M S, mapped back by
    S^{-1}, is the optimum. The ridge pulls M towards W, M = (W X + lam W)(C + lam I)^{-1}, so
    M = W exactly when x_hat = x (this is then the whitened SVD) and directions the calibration
    never excites keep W. c = b + W E[x] - W' E[x_hat].

    Args:
        weight: W [m, d]; bias: b [m] or None.
        covariance: E[x_hat x_hat^T] [d, d]; cross: E[x x_hat^T] [d, d].
        rank: 1 <= rank <= min(m, d).
        mean / original_mean: E[x_hat], E[x] (required with a bias).
        damping: see `whitening_factor`.

    Returns:
        (first [rank, d], second [m, rank], bias [m] or None), float64.

    Raises:
        ValueError: bad shapes or rank, or a bias without the means.
        WhiteningError: no usable whitening factor.
    """
    w = weight.detach().to(torch.float64)
    out_features, in_features = w.shape
    if not 0 < rank <= min(out_features, in_features):
        raise ValueError(f"rank must be in [1, {min(out_features, in_features)}], got {rank}")
    c, x = covariance.to(torch.float64), cross.to(torch.float64)
    if bias is not None:
        if mean is None or original_mean is None:
            raise ValueError("a layer with a bias needs mean and original_mean")
        mean, original_mean = mean.to(torch.float64), original_mean.to(torch.float64)
        c = c - torch.outer(mean, mean)
        x = x - torch.outer(original_mean, mean)
    factor = whitening_factor(c, damping)
    load = _relative_load((c + c.T) / 2, damping)
    # M S = (W X + lam W) S^{-T}, by a triangular solve.
    regression = torch.linalg.solve_triangular(factor, (w @ x + load * w).T, upper=False).T
    first, second = _truncated_unwhitened(regression, factor, rank)
    new_bias = None
    if bias is not None:
        new_bias = bias.detach().to(torch.float64) + w @ original_mean - second @ (first @ mean)
    return first, second, new_bias


# ---- truncation loss at every rank (rank allocation, lrdaccel.planning.allocation) --------------


def whitened_svd_truncation_loss(weight: torch.Tensor, covariance: torch.Tensor,
                                 damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """E||(W - W_r) x||^2 for the best rank-r W_r, for every r = 0 .. min(out, in) (float64).

    By Eckart-Young in the whitened space this is the tail sum of the squared singular values of
    W S (S S^T = C): exact for the whitened SVD of `whitened_svd_split` (with damping, for the
    damped covariance). Index r holds the loss at rank r; index 0 is E||W x||^2.
    """
    factor = whitening_factor(covariance.to(weight.device), damping)
    energy = torch.linalg.svdvals(weight.detach().to(torch.float64) @ factor).square()
    tail = energy.flip(0).cumsum(0).flip(0)
    return torch.cat([tail, tail.new_zeros(1)])


def whitened_tucker2_truncation_loss(weight: torch.Tensor, covariance: torch.Tensor,
                                     damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """The output error of a Tucker-2 truncation at every (rank_out, rank_in), float64
    [C_out + 1, C_in + 1]: entry [s, r] is what truncating the whitened kernel's HOSVD to output
    rank s and input rank r loses, ||W~||^2 - ||core[:s, :r]||^2 (the HOSVD error, an upper
    bound on HOOI's at the same ranks). Per output position, under the C (x) I approximation of
    `whitened_tucker2`.
    """
    factor = whitening_factor(covariance.to(weight.device), damping)
    whitened = torch.einsum("oihw,ij->ojhw", weight.detach().to(torch.float64), factor)
    c_out, c_in = whitened.shape[:2]
    u_out = _leading_left_singular_vectors(_unfold(whitened, 0), c_out)
    u_in = _leading_left_singular_vectors(_unfold(whitened, 1), c_in)
    kept = torch.einsum("oihw,os,ir->srhw", whitened, u_out, u_in).square().sum((2, 3)).cumsum(0).cumsum(1)
    kept = torch.nn.functional.pad(kept, (1, 0, 1, 0))
    return (whitened.square().sum() - kept).clamp_min(0)
