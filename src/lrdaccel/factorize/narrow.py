"""The tensor math of the narrow form: keep k of the n channels between a producer and its
consumer, and refit the consumer in closed form so that it reproduces what all n gave.

A transformer FFN's weights are not low-rank, its activations are: after the nonlinearity the n
activations a of a calibration set are nearly spanned by a subset of them. An interpolative
decomposition picks that subset K from the activations' uncentred Gram G = E[a a^T] and writes
the dropped channels as linear combinations of the kept ones; folding those combinations into the
consumer W gives one narrower layer (one GEMM, not the two of a factorization) that
minimises E||W a - W_K' a_K||^2:

    W_K' = (W G[:, K] + lambda W[:, K]) (G[K, K] + lambda I)^-1

(ridge least squares, shrunk towards the consumer's own kept columns rather than towards zero, so
that at full width W' = W exactly, whatever lambda; a small lambda only steadies the solve).

A bias is handled by appending a constant channel 1 to a (the augmented Gram holds the mean), which
is always kept: the constant absorbs the dropped channels' means. Selecting channels commutes with
any elementwise activation, so the producer is narrowed exactly (its rows K) and all the
approximation sits where least squares solves it.

Selection methods:
- "qr": pivoted QR of the activations (through a square root of G, the same pivots as on the
  activations themselves): the classic interpolative decomposition, blind to the consumer.
- "greedy": greedy pivoting that minimises the consumer's output error after the refit
  (lrdaccel.factorize.merging.greedy_select weighted by W^T W), O(n^2) per pick.
- "energy": the channels with most output energy, sqrt(G_ii) * ||W[:, i]|| (cheapest).

Plain tensors in, float64 tensors out; no modules.
"""

from __future__ import annotations

import scipy.linalg
import torch

from lrdaccel.factorize.merging import RIDGE, greedy_select

SELECTIONS = ("qr", "greedy", "energy")


def gram_square_root(gram: torch.Tensor) -> torch.Tensor:
    """B [n, n] with B^T B = gram (a symmetric PSD matrix; negative rounding noise clipped):
    pivoted QR of B picks the same columns as pivoted QR of the activations behind the Gram."""
    values, vectors = torch.linalg.eigh(gram.double())
    return values.clamp_min(0).sqrt()[:, None] * vectors.T


def select_channels(gram: torch.Tensor, count: int, method: str = "qr",
                    weight: torch.Tensor | None = None, constant: bool = True) -> list[int]:
    """The `count` channels to keep, sorted.

    Args:
        gram: the augmented Gram E[(a;1)(a;1)^T] [n+1, n+1] of the activations with a constant
            channel last (always kept, not returned), or with constant=False the plain E[a a^T] [n, n].
        count: how many channels to keep, 1 <= count <= n.
        method: one of SELECTIONS.
        weight: the consumer's weight [out, n] ("greedy" and "energy" need it).
        constant: whether the Gram's last channel is the constant 1.

    Raises:
        ValueError: a count out of range, an unknown method, a method without its weight.
    """
    gram = gram.double()
    augmented = constant
    n = gram.shape[0] - int(augmented)
    if not 1 <= count <= n:
        raise ValueError(f"narrow: the kept width must be in [1, {n}], got {count}")
    if method not in SELECTIONS:
        raise ValueError(f"narrow: selection must be one of {list(SELECTIONS)}, got {method!r}")
    if method != "qr" and weight is None:
        raise ValueError(f"narrow: selection {method!r} needs the consumer's weight")
    if method == "qr":
        activations = gram[:n, :n]
        if augmented:  # the constant is kept: pivot on what it leaves unexplained (the centred Gram)
            mean = gram[:n, n]
            activations = activations - torch.outer(mean, mean)
        root = gram_square_root(activations).cpu().numpy()
        _, _, pivots = scipy.linalg.qr(root, mode="economic", pivoting=True)
        return sorted(int(j) for j in pivots[:count])
    w = weight.double()
    if method == "energy":
        score = gram.diagonal()[:n].clamp_min(0).sqrt() * w.norm(dim=0)
        return sorted(int(j) for j in score.topk(count).indices)
    readout = torch.zeros(gram.shape, dtype=torch.float64)
    readout[:n, :n] = w.T @ w
    return sorted(greedy_select(gram, readout, count, forced=(n,) if augmented else ()))


def interpolation(gram: torch.Tensor, kept: list[int], constant: bool, ridge: float = RIDGE) -> torch.Tensor:
    """P [n - k, k (+1)]: the dropped channels predicted from the kept ones (and the constant),
    a_rest ~= P (a_K; 1), by ridge least squares on the Gram: P = G[rest, K'] (G[K', K'] + lambda I)^-1."""
    n = gram.shape[0] - int(constant)
    columns = list(kept) + ([n] if constant else [])
    rest = [j for j in range(n) if j not in set(kept)]
    block = gram[columns][:, columns]
    load = ridge * block.diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(len(columns), dtype=torch.float64, device=block.device)
    return torch.linalg.solve(block + load * eye, gram[columns][:, rest]).T


def refit_consumer(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, kept: list[int],
                   ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The consumer reading only the `kept` channels that best reproduces it (ridge least squares).

    For a Linear consumer this is W' = (W G[:, K] + lambda W_K)(G[K, K] + lambda I)^-1, written in its
    interpolative form W' = W_K + W_rest P (the two are equal): each dropped channel's weights move
    onto the kept channels that predict it. A conv consumer [out, n, kh, kw] gets the same per tap
    (the dropped channel predicted pixel by pixel from the kept ones at the same pixel).

    Args:
        weight: the consumer W [out, n] or [out, n, kh, kw]; bias: its bias [out] or None.
        gram: E[a a^T] [n, n] without a bias, the augmented E[(a;1)(a;1)^T] [n+1, n+1] with one
            (the bias then absorbs the dropped channels' means).
        kept: the channels kept (sorted).
        ridge: lambda relative to the mean diagonal of G[K, K] (towards W's kept columns).

    Returns:
        (W' [out, k, ...], bias' [out] or None), float64: W' a_K + bias' ~= W a + bias.
    """
    w = weight.double()
    n, k = w.shape[1], len(kept)
    rest = [j for j in range(n) if j not in set(kept)]
    new_weight = w[:, kept].clone()
    new_bias = None if bias is None else bias.double().clone()
    if rest:
        predict = interpolation(gram.double(), kept, bias is not None, ridge)  # [n - k, k (+1)]
        moved = torch.einsum("oj...,jk->ok...", w[:, rest], predict)
        new_weight += moved[:, :k]
        if bias is not None:  # the constant's share: summed over the kernel taps
            new_bias += moved[:, k].reshape(w.shape[0], -1).sum(1)
    return new_weight, new_bias


def relative_output_error(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, kept: list[int],
                          new_weight: torch.Tensor, new_bias: torch.Tensor | None) -> float:
    """sqrt(E||W a + b - W' a_K - b'||^2 / E||W a + b||^2) under the Gram's distribution; for a conv
    consumer each kernel tap is taken as a separate output (the taps' inputs as independent)."""
    w = _rows(weight.double())
    n = w.shape[1]
    difference = -w.clone()
    difference[:, kept] += _rows(new_weight.double())
    if bias is not None:
        taps = w.shape[0] // bias.shape[0]
        shift = ((new_bias.double() - bias.double()) / taps).repeat_interleave(taps)
        difference = torch.cat([difference, shift[:, None]], 1)
        w = torch.cat([w, (bias.double() / taps).repeat_interleave(taps)[:, None]], 1)
    size = difference.shape[1]
    g = gram.double()[:size, :size]
    energy = torch.einsum("oi,ij,oj->", w, g, w)
    error = torch.einsum("oi,ij,oj->", difference, g, difference).clamp_min(0)
    return float((error / energy).sqrt()) if energy > 0 else float(error.sqrt())


def _rows(weight: torch.Tensor) -> torch.Tensor:
    """[out, n, *kernel] -> [out * taps, n] (a Linear's [out, n] unchanged)."""
    return weight.movedim(1, -1).reshape(-1, weight.shape[1])
