"""Tucker-2 of a conv kernel on its two channel modes (the spatial modes stay whole).

W [C_out, C_in, kh, kw] ~= core x_0 U_out x_1 U_in, with U_out [C_out, r_out], U_in [C_in, r_in],
core [r_out, r_in, kh, kw]. Initialised by HOSVD, refined by HOOI (alternating, each step the
leading singular vectors of one mode's unfolding with the other mode projected).
"""

from __future__ import annotations

import torch


def _leading_left_singular_vectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    # The Gram matrix is small (channels x channels); eigh on it is much cheaper than an SVD
    # of the wide unfolding and exact enough in float64.
    gram = matrix @ matrix.T
    _, vecs = torch.linalg.eigh(gram)
    return vecs[:, -rank:].flip(-1)


def _unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def tucker2(
    weight: torch.Tensor,
    rank_in: int,
    rank_out: int,
    n_iter: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (U_in [C_in, r_in], core [r_out, r_in, kh, kw], U_out [C_out, r_out]).

    Args:
        weight: conv kernel [C_out, C_in, kh, kw].
        rank_in, rank_out: ranks of the input- and output-channel modes.
        n_iter: HOOI refinement sweeps after HOSVD (0 = plain HOSVD).
    """
    if weight.dim() != 4:
        raise ValueError(f"tucker2 expects a 4-D conv kernel, got shape {tuple(weight.shape)}")
    c_out, c_in = weight.shape[:2]
    if not 0 < rank_in <= c_in:
        raise ValueError(f"rank_in must be in [1, {c_in}], got {rank_in}")
    if not 0 < rank_out <= c_out:
        raise ValueError(f"rank_out must be in [1, {c_out}], got {rank_out}")
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    w = weight.detach().to(torch.float64)
    u_out = _leading_left_singular_vectors(_unfold(w, 0), rank_out)
    u_in = _leading_left_singular_vectors(_unfold(w, 1), rank_in)
    for _ in range(n_iter):
        projected_in = torch.einsum("oihw,ir->orhw", w, u_in)
        u_out = _leading_left_singular_vectors(_unfold(projected_in, 0), rank_out)
        projected_out = torch.einsum("oihw,os->sihw", w, u_out)
        u_in = _leading_left_singular_vectors(_unfold(projected_out, 1), rank_in)
    core = torch.einsum("oihw,os,ir->srhw", w, u_out, u_in)
    cast = dict(dtype=weight.dtype)
    return u_in.to(**cast), core.to(**cast), u_out.to(**cast)
