"""The tensor math of narrowing attention heads: every head keeps r of its d dimensions, its
query/key pair and its value/output pair each reduced jointly, whitened by the attention's input.

No nonlinearity lies inside either pair, so each is a product whose rank a joint SVD reduces:
- query/key: head h's scores are x~_i^T A_h x~_j with A_h = Wq~_h^T Wk~_h ((D+1) x (D+1), rank d;
  x~ = (x; 1) so that the biases are inside). The best rank-r A_h' for inputs of second moment
  S = E[x~ x~^T] truncates the SVD of S^1/2 A_h S^1/2 = U s V^T; then Wq~_h' = s_r^1/2 U_r^T S^-1/2
  and Wk~_h' = s_r^1/2 V_r^T S^-1/2 (weights and biases, r rows each). The score scale stays the
  original head's.
- value/output: head h adds O_h P_h (Wv_h x + bv_h) to the output; the attention probabilities P_h
  mix tokens, not channels, and each row sums to one, so the bias contributes the constant
  O_h bv_h (moved into the output's bias) and the rest is the product M_h = O_h Wv_h (D_out x D),
  truncated as the SVD of M_h S^1/2 (S = E[x x^T]): Wv_h' = s_r^1/2 V_r^T S^-1/2, O_h' = U_r s_r^1/2.
At r = d both are exact. Plain tensors in, float64 tensors out.
"""

from __future__ import annotations

import torch

DAMPING = 1e-6  # relative diagonal loading of the input's second moment before its inverse root


def _roots(second: torch.Tensor, damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """(S^1/2, S^-1/2) of a symmetric PSD matrix, damped relative to its mean diagonal."""
    second = second.double()
    load = damping * second.diagonal().mean().clamp_min(1e-30)
    values, vectors = torch.linalg.eigh(second + load * torch.eye(second.shape[0], dtype=second.dtype,
                                                                  device=second.device))
    values = values.clamp_min(load)
    return (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T


def joint_query_key(query: torch.Tensor, key: torch.Tensor, second: torch.Tensor, heads: int,
                    rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query', key') [heads * rank, D + 1] each (weight with the bias as last column).

    Args:
        query / key: [heads * d, D + 1], each head's rows together, the bias as last column.
        second: E[x~ x~^T] [D + 1, D + 1] of the attention's input with a constant 1 last.
        heads: the number of heads; rank: the dimensions each keeps (1 <= rank <= d).
    """
    root, inverse = _roots(second)
    d = query.shape[0] // heads
    new_query, new_key = [], []
    for h in range(heads):
        rows = slice(h * d, (h + 1) * d)
        left, right = root @ query[rows].double().T, key[rows].double() @ root  # [D+1, d], [d, D+1]
        u, s, vh = torch.linalg.svd(left @ right)
        scale = s[:rank].sqrt()
        new_query.append((scale[:, None] * u[:, :rank].T) @ inverse)
        new_key.append((scale[:, None] * vh[:rank]) @ inverse)
    return torch.cat(new_query), torch.cat(new_key)


def joint_value_output(value: torch.Tensor, value_bias: torch.Tensor | None, output: torch.Tensor,
                       second: torch.Tensor, heads: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(value' [heads * rank, D], output' [D_out, heads * rank], the output bias's shift [D_out]).

    Args:
        value: [heads * d, D]; value_bias: [heads * d] or None (then the new value has none to move).
        output: [D_out, heads * d]; second: E[x x^T] [D, D] of the attention's input.
        heads, rank: as `joint_query_key`. The new value's bias is zero: its share is the shift.
    """
    root, inverse = _roots(second)
    d = value.shape[0] // heads
    new_value, new_output = [], []
    shift = torch.zeros(output.shape[0], dtype=torch.float64, device=output.device)
    for h in range(heads):
        rows = slice(h * d, (h + 1) * d)
        o_h, v_h = output[:, rows].double(), value[rows].double()
        u, s, vh = torch.linalg.svd(o_h @ (v_h @ root))
        scale = s[:rank].sqrt()
        new_value.append((scale[:, None] * vh[:rank]) @ inverse)
        new_output.append(u[:, :rank] * scale)
        if value_bias is not None:
            shift += o_h @ value_bias[rows].double()
    return torch.cat(new_value), torch.cat(new_output, 1), shift
