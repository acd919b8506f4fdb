"""Branched Tucker-2: a k x k conv kernel as a sum of N Tucker-2 terms (a block-term decomposition).

    W ~= sum_n  G_n x_out V_n x_in U_n       U_n [C_in, R1], G_n [R2, R1, kh, kw], V_n [C_out, R2]

Stacking U = [U_1 .. U_N] (C_in x r1) and V = [V_1 .. V_N] (C_out x r2), r1 = N R1, r2 = N R2, this
is a Tucker-2 of ranks (r1, r2) whose core is block-diagonal, so it runs as 1x1 (C_in -> r1),
k x k with groups=N (r1 -> r2), 1x1 (r2 -> C_out): the grouped conv computes the N branches at once,
exactly. At the same ranks the core has N times fewer weights than a dense Tucker-2 core.

What is exact and what is not. The grouped conv equals the sum of its N branches (an identity).
A generic kernel is not a sum of N small blocks at (r1, r2) = (C_in, C_out); it is at
(C_in, N C_out): branch n reads the n-th group of input channels (U = identity) and writes every
output (V = N stacked identities), G_n = W[:, group n]. That is the branched form's full rank
(`branched_full_rank`), where it reproduces any kernel; below it, the fit is an approximation.

The fit: "deflation" (one Tucker-2 term of ranks (R1, R2) at a time on the residual, which is
already exact at full rank), then alternating least squares over U, V and the block-diagonal core.
With the conv's input covariance the kernel is whitened on its input mode first, as in
lrdaccel.factorize.whiten, so the factors minimise output error rather than weight error.
"""

from __future__ import annotations

import math

import torch

from lrdaccel.factorize.ranks import check_ratio
from lrdaccel.factorize.tucker2 import tucker2
from lrdaccel.factorize.whiten import DEFAULT_DAMPING, whitening_factor

DEFAULT_ALS_ITERS = 4


def branched_params(in_channels: int, out_channels: int, kernel_area: int, rank_in: int, rank_out: int,
                    branches: int) -> int:
    """Weights of C_in -> r1 (1x1), the grouped k x k core r1 -> r2 (N groups), r2 -> C_out (1x1)."""
    return in_channels * rank_in + kernel_area * rank_in * rank_out // branches + rank_out * out_channels


def branched_ranks(in_channels: int, out_channels: int, kernel_area: int, ratio: float, branches: int,
                   beta: float = 1.0) -> tuple[int, int]:
    """The largest (r1, r2) = (N R, N floor(beta R)) whose weights fit C_in C_out k^2 / ratio, each then
    clamped to its channel count rounded down to a multiple of N (as `tucker2_ranks` clamps, the
    freed budget is not redistributed); (0, 0) where not even R = 1 fits or a side has fewer
    channels than branches."""
    check_ratio(ratio)
    budget = in_channels * out_channels * kernel_area / ratio

    def cost(per_branch: int) -> int:
        return branched_params(in_channels, out_channels, kernel_area, branches * per_branch,
                               branches * max(1, math.floor(beta * per_branch)), branches)

    per_branch = 0
    while cost(per_branch + 1) <= budget:
        per_branch += 1
    limit_in, limit_out = in_channels - in_channels % branches, out_channels - out_channels % branches
    if per_branch == 0 or limit_in == 0 or limit_out == 0:
        return 0, 0
    return (min(branches * per_branch, limit_in),
            min(branches * max(1, math.floor(beta * per_branch)), limit_out))


def branched_full_rank(in_channels: int, out_channels: int, branches: int) -> tuple[int, int]:
    """Ranks at which the branched form reproduces every kernel: (C_in, N C_out) (each branch reads
    one group of C_in / N inputs and writes every output); C_in must be divisible by N."""
    if in_channels % branches:
        raise ValueError(f"branched Tucker-2 full rank needs C_in={in_channels} divisible by {branches} branches")
    return in_channels, branches * out_channels


def branched_dense(u: torch.Tensor, core: torch.Tensor, v: torch.Tensor, branches: int) -> torch.Tensor:
    """The dense kernel [C_out, C_in, kh, kw] of the factors in layer layout: U [C_in, r1],
    core [r2, r1 / N, kh, kw] (grouped-conv layout), V [C_out, r2]."""
    c_in, r1 = u.shape
    c_out, r2 = v.shape
    blocks = core.reshape(branches, r2 // branches, r1 // branches, *core.shape[2:])
    return torch.einsum("inr,nsrhw,ons->oihw", u.reshape(c_in, branches, r1 // branches), blocks,
                        v.reshape(c_out, branches, r2 // branches))


def branched_tucker2(weight: torch.Tensor, rank_in: int, rank_out: int, branches: int,
                     n_iter: int = DEFAULT_ALS_ITERS, covariance: torch.Tensor | None = None,
                     damping: float = DEFAULT_DAMPING) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit N Tucker-2 terms to a conv kernel: (U [C_in, r1], core [r2, r1/N, kh, kw], V [C_out, r2]).

    Args:
        weight: conv kernel [C_out, C_in, kh, kw].
        rank_in, rank_out: r1, r2; multiples of `branches`, R1 = r1/N <= C_in, R2 = r2/N <= C_out.
        branches: N >= 1 (1 is plain Tucker-2 by HOOI-initialised ALS).
        n_iter: alternating least-squares sweeps after the deflation start.
        covariance: E[x x^T] of the conv's input channels: minimise output error (input whitening).
        damping: see lrdaccel.factorize.whiten.whitening_factor.

    Raises:
        ValueError: bad shapes, ranks or branch count.
        WhiteningError: a covariance without usable Cholesky factor (the caller falls back).
    """
    if weight.dim() != 4:
        raise ValueError(f"branched_tucker2 expects a 4-D conv kernel, got shape {tuple(weight.shape)}")
    c_out, c_in = weight.shape[:2]
    check_branched_rank(rank_in, rank_out, branches, c_in, c_out)
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    w = weight.detach().double()
    factor = None
    if covariance is not None:
        factor = whitening_factor(covariance.to(w.device), damping)
        w = torch.einsum("oihw,ij->ojhw", w, factor)
    per_in, per_out = rank_in // branches, rank_out // branches
    us, gs, vs, residual = [], [], [], w.clone()
    for _ in range(branches):
        u, g, v = tucker2(residual, per_in, per_out, n_iter=2)
        us.append(u), gs.append(g), vs.append(v)
        residual = residual - torch.einsum("ir,srhw,os->oihw", u, g, v)
    u, g, v = torch.stack(us, 1), torch.stack(gs), torch.stack(vs, 1)
    for _ in range(n_iter):
        u, g, v = _als_sweep(w, u, g, v)
    u_flat = u.reshape(c_in, rank_in)
    if factor is not None:  # the first 1x1 reads x, not S^T x: U = S^-T U_white (cf. whitened_tucker2)
        u_flat = torch.linalg.solve_triangular(factor, u_flat.T, upper=False, left=False).T
    core = g.reshape(rank_out, per_in, *w.shape[2:])
    cast = dict(dtype=weight.dtype)
    return u_flat.to(**cast), core.to(**cast), v.reshape(c_out, rank_out).to(**cast)


def check_branched_rank(rank_in: int, rank_out: int, branches: int, in_channels: int, out_channels: int,
                        name: str = "") -> None:
    """Ranks must be positive multiples of N with at most C_in inputs and C_out outputs per branch."""
    where = f"layer {name!r}: " if name else ""
    if isinstance(branches, bool) or not isinstance(branches, int) or branches < 1:
        raise ValueError(f"{where}branches must be an int >= 1, got {branches!r}")
    ok = all(isinstance(r, int) and not isinstance(r, bool) and r > 0 and r % branches == 0
             for r in (rank_in, rank_out))
    if not ok or rank_in // branches > in_channels or rank_out // branches > out_channels:
        raise ValueError(f"{where}branched Tucker-2 ranks must be multiples of {branches} branches with at most "
                         f"{in_channels} inputs and {out_channels} outputs per branch, got ({rank_in!r}, {rank_out!r})")


def _als_sweep(w: torch.Tensor, u: torch.Tensor, g: torch.Tensor, v: torch.Tensor):
    """One sweep: U, then V, then the block-diagonal core by least squares; blocks re-orthonormalised."""
    c_out, c_in = w.shape[:2]
    n, per_out, per_in = g.shape[:3]
    # U: W_(in) [C_in, C_out*area] ~= U_flat [C_in, r1] Z [r1, C_out*area]
    z = torch.einsum("nsrhw,ons->nrohw", g, v).reshape(n * per_in, -1)
    u = _solve_right(w.transpose(0, 1).reshape(c_in, -1), z).reshape(c_in, n, per_in)
    y = torch.einsum("nsrhw,inr->nsihw", g, u).reshape(n * per_out, -1)
    v = _solve_right(w.reshape(c_out, -1), y).reshape(c_out, n, per_out)
    u, v = _orthonormal_blocks(u), _orthonormal_blocks(v)
    return u, _block_core(w, u, v), v


def _solve_right(b: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """argmin_X ||B - X Z||_F = B Z^T (Z Z^T)^-1."""
    gram = z @ z.T
    load = 1e-12 * gram.diagonal().mean().clamp_min(1e-300)
    return torch.linalg.solve(gram + load * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), z @ b.T).T


def _orthonormal_blocks(factor: torch.Tensor) -> torch.Tensor:
    """Each branch's factor [dim, N, R] replaced by an orthonormal basis of its span (the core absorbs the rest)."""
    return torch.stack([torch.linalg.qr(factor[:, i])[0] for i in range(factor.shape[1])], 1)


def _block_core(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, iterations: int = 15) -> torch.Tensor:
    """The least-squares block-diagonal core for fixed U, V (orthonormal per branch), all blocks
    jointly: conjugate gradients on the normal equations sum_m (V_n^T V_m) G_m (U_m^T U_n) = V_n^T W U_n,
    started from the per-branch projections (the exact answer where branches' subspaces are orthogonal)."""
    n = u.shape[1]
    vtv = torch.einsum("onp,oms->nmps", v, v)
    utu = torch.einsum("imr,inq->mnrq", u, u)
    rhs = torch.stack([_project(w, u[:, i], v[:, i]) for i in range(n)]).flatten(3)

    def normal(g: torch.Tensor) -> torch.Tensor:
        mixed_out = torch.einsum("nmps,msra->nmpra", vtv, g)
        return torch.einsum("nmpra,mnrq->npqa", mixed_out, utu)

    g = rhs.clone()
    if n > 1:
        residual = rhs - normal(g)
        direction = residual.clone()
        size = (residual * residual).sum()
        scale = (rhs * rhs).sum().clamp_min(1e-300)
        for _ in range(iterations):
            if size <= 1e-28 * scale:
                break
            applied = normal(direction)
            step = size / (direction * applied).sum().clamp_min(1e-300)
            g, residual = g + step * direction, residual - step * applied
            new_size = (residual * residual).sum()
            direction, size = residual + (new_size / size) * direction, new_size
    return g.reshape(*g.shape[:3], *w.shape[2:])


def _project(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """V^T W U on the channel modes: [C_out, C_in, kh, kw] -> [R2, R1, kh, kw]."""
    out = (v.T @ w.flatten(1)).reshape(v.shape[1], *w.shape[1:])
    return torch.einsum("sihw,ir->srhw", out, u)


