"""DecomposeConfig: how `decompose` factorizes each planned layer."""

from __future__ import annotations

from dataclasses import dataclass

from lrdaccel._settings import check_choice, check_int
from lrdaccel.factorize.narrow import SELECTIONS
from lrdaccel.factorize.whiten import DEFAULT_DAMPING, DEFAULT_REFIT_DAMPING, REFITS, check_damping

METHODS = ("svd", "whiten")


@dataclass
class DecomposeConfig:
    """How `decompose` factorizes each planned layer.

    Attributes:
        method: "svd" (default): minimise weight error (plain SVD / HOOI). "whiten": minimise
            output error on calibration inputs (truncation-aware whitening for SVD layers,
            input-covariance-weighted HOOI for Tucker-2; see lrdaccel.factorize.whiten). Same
            ranks and structure either way, so optimize_ranks, freezing and save/load apply.
        n_iter: HOOI refinement sweeps for Tucker-2 (None: the default, 2), ALS sweeps for
            branched Tucker-2 (None: 4).
        damping: whitening's relative diagonal loading (method="whiten").
        sequential: with method="whiten", decompose layer by layer in execution order, each on
            the inputs of the partly decomposed model, re-solved in closed form so that its output
            matches the original layer's (lrdaccel.decomposition.sequential). SVD and Tucker-2 rows only.
        refit: what sequential calibration re-solves: "joint" (both SVD factors, reduced-rank
            regression; Tucker-2: the last 1x1), "last" (the last factor and bias, least
            squares) or "none".
        refit_damping: relative ridge of that re-solve, towards the factorization's own factors.
        selection: how narrow rows choose the channels they keep on calibration activations:
            "qr" (pivoted QR, an interpolative decomposition), "greedy" (least consumer output
            error after the refit) or "energy" (activation norm x output column norm).
    """

    method: str = "svd"
    n_iter: int | None = None
    damping: float = DEFAULT_DAMPING
    sequential: bool = False
    refit: str = "joint"
    refit_damping: float = DEFAULT_REFIT_DAMPING
    selection: str = "qr"

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_int("n_iter", self.n_iter, 0, optional=True)
        check_damping(self.damping)
        check_choice("refit", self.refit, REFITS)
        check_damping(self.refit_damping)
        check_choice("selection", self.selection, SELECTIONS)
        if not isinstance(self.sequential, bool):
            raise ValueError(f"sequential must be True or False, got {self.sequential!r}")
        if self.sequential and self.method != "whiten":
            raise ValueError("sequential=True calibrates the whitened factorization: pass method='whiten'")
