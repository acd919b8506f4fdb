"""The tensor math of layer merging (arXiv 2407.20266): folding a Tucker-2 factor of a bottleneck's
k x k conv into the 1x1 conv before or after it.

A bottleneck `A (1x1) -> BN1 -> act1 -> B (k x k) -> BN2 -> act2 -> C (1x1)` keeps three convs
after merging: A' (C_in -> r1), B' (r1 -> r2), C' (r2 -> C_out). What may be folded across each
side depends on what lies between the convs:

- A linear side (a BatchNorm, in eval mode an affine map, and no activation) folds a Tucker-2
  factor exactly: U^T BN1(A x) = (U^T diag(s1) A) x + U^T t1', so A' = U^T diag(s1) A and the
  constant goes to the new, narrower BatchNorm (`fold_input_factor`, `fold_output_factor`).
- Across an activation nothing but a channel SELECTION folds exactly (U^T act(z) = act(U^T z)
  for every z only if each row of U^T picks one channel), so the approximate merge keeps r1 of
  B's inputs and r2 of its outputs and puts all the approximation where least squares solves it
  on calibration statistics:
  * output side (`select_outputs`): the r2 channels of g = act2(BN2(B h)) kept are chosen greedily
    to leave the least error in C's output when the dropped ones are predicted linearly from
    the kept ones (plus a constant); C' = C[:, T] + C[:, rest] Q absorbs that prediction.
  * input side (`select_inputs`): the r1 channels of h = act1(BN1(A x)) kept are chosen greedily
    the same way, weighted by what the kept outputs read; then the core is the least-squares fit
    of B's kept outputs from the kept inputs' k x k patches (`patch_least_squares`), which uses
    the full patch covariance (neighbouring pixels predict each other too).
  A' = A[S] and BN1' = BN1[S], BN2' = BN2[T] are exact sub-layers, so their statistics stay valid.

All arithmetic is float64 on the inputs' device; inputs are plain tensors (no modules), results are
float64 tensors there.
"""

from __future__ import annotations

import torch

RIDGE = 1e-6  # relative diagonal loading of every least-squares solve


def batchnorm_affine(weight: torch.Tensor | None, bias: torch.Tensor | None, running_mean: torch.Tensor,
                     running_var: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) with BN(x) = s * x + t per channel in eval mode, float64."""
    var = running_var.detach().double()
    scale = torch.ones_like(var) if weight is None else weight.detach().double()
    shift = torch.zeros_like(var) if bias is None else bias.detach().double()
    s = scale / (var + eps).sqrt()
    return s, shift - s * running_mean.detach().double()


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """gram^-1 rhs for a symmetric PSD gram, with diagonal loading relative to its mean diagonal."""
    n = gram.shape[0]
    load = ridge * gram.diagonal().mean().clamp_min(1e-30)
    return torch.linalg.solve(gram + load * torch.eye(n, dtype=gram.dtype, device=gram.device), rhs)


def greedy_select(second_moment: torch.Tensor, weight_gram: torch.Tensor, count: int,
                  forced: tuple[int, ...] = ()) -> list[int]:
    """`count` channels (besides `forced`) that best predict all channels linearly, for a readout.

    Minimises tr(K R_S) with R_S = Sigma - Sigma[:, S] Sigma[S, S]^-1 Sigma[S, :], i.e. the error
    min_P E||W (x - P x_S)||^2 (K = W^T W) left when the dropped channels of x are predicted from
    the kept ones: greedy pivoting, O(n^2) per pick (a rank-one update of R and K R).

    Args:
        second_moment: E[x x^T] [n, n] (uncentred; a constant channel in it gives an intercept).
        weight_gram: K [n, n], how much each channel pair matters to what reads x.
        count: channels to choose.
        forced: channels chosen first and not returned (e.g. the constant channel).

    Returns:
        The chosen channel indices in the order picked.
    """
    residual = second_moment.double().clone()
    gram = weight_gram.double()
    k_residual = gram @ residual
    chosen: list[int] = []
    floor = residual.diagonal().max().clamp_min(1e-300) * 1e-12

    def pivot(j: int) -> None:
        d = residual[j, j].clamp_min(1e-300)
        column = residual[:, j].clone()
        k_column = gram @ column
        residual.sub_(torch.outer(column, column) / d)
        k_residual.sub_(torch.outer(k_column, column) / d)
        chosen.append(j)

    for j in forced:
        pivot(j)
    while len(chosen) < count + len(forced):
        diag = residual.diagonal().clone()
        gain = (residual * k_residual).sum(0) / diag.clamp_min(1e-300)
        gain[diag <= floor] = -1.0  # already explained by the chosen (or dead): only as a last resort
        gain[chosen] = -float("inf")
        pivot(int(gain.argmax()))
    forced_set = set(forced)
    return [j for j in chosen if j not in forced_set]


def select_outputs(g_second: torch.Tensor, last_weight: torch.Tensor, out_scale: torch.Tensor,
                   count: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Which `count` channels of g the narrowed C' reads, and C' itself.

    Args:
        g_second: E[g1 g1^T] [n+1, n+1] of C's input g with a constant 1 appended (last index).
        last_weight: C as a matrix [C_out, n].
        out_scale: per output channel weight of C's output error (a following BatchNorm's scale, or ones).
        count: r2.

    Returns:
        (T sorted, C' [C_out, r2], const [C_out]): C g ~= C' g_T + const.
    """
    n = last_weight.shape[1]
    c = last_weight.double()
    gram = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=c.device)
    scaled = out_scale.double()[:, None] * c
    gram[:n, :n] = scaled.T @ scaled
    kept = sorted(greedy_select(g_second, gram, count, forced=(n,)))
    rest = [j for j in range(n) if j not in set(kept)]
    if not rest:
        return kept, c[:, kept], torch.zeros(c.shape[0], dtype=torch.float64, device=c.device)
    with_constant = kept + [n]
    predict = ridge_solve(g_second[with_constant][:, with_constant], g_second[with_constant][:, rest]).T
    new_weight = c[:, kept] + c[:, rest] @ predict[:, :count]
    return kept, new_weight, c[:, rest] @ predict[:, count]


def select_inputs(h_second: torch.Tensor, target_kernel: torch.Tensor, count: int) -> list[int]:
    """Which `count` input channels of the k x k conv to keep: those that best predict the rest
    for the conv's (weighted) output `target_kernel` [r2, n, kh, kw]. Returns them sorted."""
    w = target_kernel.double()
    gram = torch.einsum("oihw,ojhw->ij", w, w)
    return sorted(greedy_select(h_second, gram, count))


def patch_least_squares(target_kernel: torch.Tensor, patch_second: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """The k x k core [r2, r1, kh, kw] reading only the `kept` input channels that best reproduces
    `target_kernel` [r2, n, kh, kw] on the calibration patches.

    patch_second is E[p p^T] over im2col patches p of the conv's input (channel-major, as
    F.unfold lays them out: index = channel * kh * kw + tap).
    """
    r2, n, kh, kw = target_kernel.shape
    area = kh * kw
    columns = torch.tensor([i * area + a for i in kept for a in range(area)], device=patch_second.device)
    unfolded = target_kernel.double().reshape(r2, n * area)
    cross = unfolded @ patch_second[:, columns]
    core = ridge_solve(patch_second[columns][:, columns], cross.T).T
    return core.reshape(r2, len(kept), kh, kw)


def fold_input_factor(first_weight: torch.Tensor, first_bias: torch.Tensor | None, scale: torch.Tensor,
                      shift: torch.Tensor, factor_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact: factor_t @ BN(A x + a) = A' x + c for an eval-mode BN (s, t) and no activation.

    Args:
        first_weight: A as a matrix [M, C_in]; first_bias: its bias [M] or None.
        scale, shift: the BN's (s, t) from `batchnorm_affine`.
        factor_t: the Tucker-2 input factor as the 1x1 weight [r1, M].

    Returns:
        (A' [r1, C_in], c [r1]).
    """
    f = factor_t.double()
    bias = shift.double() if first_bias is None else scale * first_bias.double() + shift
    return f @ (scale[:, None] * first_weight.double()), f @ bias


def fold_output_factor(last_weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                       factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact: C BN(V w) = C' w + const for an eval-mode BN (s, t) and no activation.

    Args:
        last_weight: C as a matrix [C_out, M']; factor: V [M', r2].

    Returns:
        (C' [C_out, r2], const [C_out]).
    """
    c = last_weight.double()
    return c @ (scale[:, None] * factor.double()), c @ shift
