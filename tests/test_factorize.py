"""Rank formulas against the papers' test vectors; SVD and Tucker-2 numerics."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrdaccel.factorize import svd_params, svd_rank, svd_split, tucker2, tucker2_params, tucker2_ranks

# ResNet-152 at alpha = 2 (PAPER.md): (out, in, k) -> rank.
PAPER_VECTORS = [
    (64, 64, 1, 16),
    (64, 64, 3, 38),
    (256, 64, 1, 25),
    (512, 2048, 1, 204),
    (512, 512, 3, 309),
    (2048, 512, 1, 204),
    (1000, 2048, 1, 335),
]


@pytest.mark.parametrize("c_out,c_in,k,expected", PAPER_VECTORS)
def test_paper_rank_vectors(c_out, c_in, k, expected):
    if k == 1:
        assert svd_rank(c_out, c_in, 2) == expected
    else:
        assert tucker2_ranks(c_in, c_out, k * k, 2) == (expected, expected)


@given(c_out=st.integers(1, 600), c_in=st.integers(1, 600), ratio=st.floats(1.01, 20))
def test_svd_rank_is_largest_within_budget(c_out, c_in, ratio):
    r = svd_rank(c_out, c_in, ratio)
    budget = c_out * c_in / ratio
    assert svd_params(c_out, c_in, r) <= budget + 1e-6
    assert svd_params(c_out, c_in, r + 1) > budget - 1e-6


@given(c_in=st.integers(1, 300), c_out=st.integers(1, 300), k=st.sampled_from([1, 3, 5, 7]),
       ratio=st.floats(1.01, 10), beta=st.sampled_from([0.5, 1.0, 2.0]))
def test_tucker2_ranks_largest_within_budget_and_bounded(c_in, c_out, k, ratio, beta):
    r_in, r_out = tucker2_ranks(c_in, c_out, k * k, ratio, beta)
    assert 0 <= r_in <= c_in and 0 <= r_out <= c_out
    budget = c_in * c_out * k * k / ratio
    assert tucker2_params(c_in, c_out, k * k, r_in, r_out) <= budget + 1e-6
    if r_in < c_in and math.floor(beta * r_in) == r_out:  # unclamped: one more step must overflow
        assert tucker2_params(c_in, c_out, k * k, r_in + 1, math.floor(beta * (r_in + 1))) > budget - 1e-6


def test_narrow_in_wide_out_rank_is_clamped_to_channels():
    # The published formula gives r_in > C_in for a 3 -> 64 7x7 stem.
    r_in, r_out = tucker2_ranks(3, 64, 49, 2)
    assert r_in == 3 and 3 < r_out <= 64


@pytest.mark.parametrize("bad", [1, 1.0, 0.5, 0, -2, float("nan"), float("inf")])
def test_bad_ratio_rejected(bad):
    with pytest.raises(ValueError, match="ratio"):
        svd_rank(10, 10, bad)
    with pytest.raises(ValueError, match="ratio"):
        tucker2_ranks(10, 10, 9, bad)


def test_svd_split_full_rank_exact_and_truncation_optimal():
    w = torch.randn(12, 7, dtype=torch.float64)
    first, second = svd_split(w, 7)
    torch.testing.assert_close(second @ first, w, rtol=1e-12, atol=1e-12)
    # Eckart-Young: the rank-3 error equals the tail of the singular values.
    first, second = svd_split(w, 3)
    s = torch.linalg.svdvals(w)
    assert torch.isclose((w - second @ first).norm(), s[3:].norm(), rtol=1e-10)
    # Balanced split: both factors carry sqrt(Sigma).
    torch.testing.assert_close(first.norm(dim=1), second.norm(dim=0), rtol=1e-10, atol=1e-12)


def test_svd_split_keeps_dtype_and_checks_rank():
    w = torch.randn(5, 4, dtype=torch.float32)
    first, second = svd_split(w, 2)
    assert first.dtype == second.dtype == torch.float32
    assert first.shape == (2, 4) and second.shape == (5, 2)
    for bad in (0, 5):
        with pytest.raises(ValueError, match="rank"):
            svd_split(w, bad)


@settings(max_examples=25, deadline=None)
@given(c_out=st.integers(1, 12), c_in=st.integers(1, 12), kh=st.integers(1, 4), kw=st.integers(1, 4))
def test_tucker2_full_rank_exact(c_out, c_in, kh, kw):
    w = torch.randn(c_out, c_in, kh, kw, dtype=torch.float64)
    u_in, core, u_out = tucker2(w, c_in, c_out)
    rebuilt = torch.einsum("srhw,os,ir->oihw", core, u_out, u_in)
    torch.testing.assert_close(rebuilt, w, rtol=1e-10, atol=1e-10)


def test_hooi_does_not_worsen_hosvd():
    w = torch.randn(32, 24, 3, 3, dtype=torch.float64)
    errors = []
    for n_iter in (0, 1, 4):
        u_in, core, u_out = tucker2(w, 8, 10, n_iter=n_iter)
        errors.append((torch.einsum("srhw,os,ir->oihw", core, u_out, u_in) - w).norm().item())
    assert errors[1] <= errors[0] + 1e-9 and errors[2] <= errors[1] + 1e-9
    assert errors[2] < errors[0]
