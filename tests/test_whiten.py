"""factorize/whiten.py: whitened SVD and Tucker-2 minimise OUTPUT error, stay exact at full rank,
and survive singular input covariances."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lrdaccel.factorize import svd_split, tucker2
from lrdaccel.factorize.whiten import (
    WhiteningError,
    whitened_svd_split,
    whitened_tucker2,
    whitening_factor,
)


def anisotropic_inputs(n, d, decades=3.0, seed=0, dtype=torch.float64):
    """Inputs whose energy falls off over `decades` along random directions, as real activations do."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dtype))
    scales = torch.logspace(0, -decades, d, dtype=dtype)
    return (torch.randn(n, d, generator=g, dtype=dtype) * scales) @ basis.T


def second_moment(x):
    return x.T @ x / x.shape[0]


def output_error(weight, approx, x):
    return ((x @ (weight - approx).T).norm() / (x @ weight.T).norm()).item()


def test_whitened_svd_has_lower_output_error_than_plain_on_anisotropic_inputs():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 64, generator=g, dtype=torch.float64)
    # One distribution, two draws: calibrate on one, measure on the other.
    calibration, held_out = anisotropic_inputs(6144, 64, seed=2).split([4096, 2048])
    for rank in (4, 12, 24):
        first, second = svd_split(weight, rank)
        w_first, w_second = whitened_svd_split(weight, second_moment(calibration), rank)
        plain, whitened = output_error(weight, second @ first, held_out), output_error(weight, w_second @ w_first, held_out)
        assert whitened < plain, (rank, whitened, plain)
    # And by a wide margin where the inputs are this skewed.
    assert whitened < 0.5 * plain


def test_whitened_svd_reaches_the_eckart_young_bound_in_the_whitened_space():
    """Without damping, the error on the calibration set is exactly the tail of W S's spectrum."""
    weight = torch.randn(20, 30, dtype=torch.float64)
    x = anisotropic_inputs(500, 30, decades=2)
    covariance = second_moment(x)
    rank = 7
    first, second = whitened_svd_split(weight, covariance, rank, damping=0.0)
    achieved = ((x @ (weight - second @ first).T) ** 2).sum() / x.shape[0]
    singular = torch.linalg.svdvals(weight @ torch.linalg.cholesky(covariance))
    torch.testing.assert_close(achieved, (singular[rank:] ** 2).sum(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
@pytest.mark.parametrize("singular", [False, True])
def test_full_rank_whitened_svd_is_exact(shape, singular):
    out_features, in_features = shape
    weight = torch.randn(out_features, in_features, dtype=torch.float64)
    x = anisotropic_inputs(400, in_features, decades=4)
    if singular:
        x[:, : in_features // 2] = 0  # half the input channels dead: a singular covariance
    first, second = whitened_svd_split(weight, second_moment(x), min(shape))
    assert first.shape == (min(shape), in_features) and second.shape == (out_features, min(shape))
    torch.testing.assert_close(second @ first, weight, rtol=1e-9, atol=1e-9)


def test_whitened_svd_keeps_dtype_and_sqrt_sigma_split():
    weight = torch.randn(16, 12)
    first, second = whitened_svd_split(weight, torch.eye(12), 5, damping=0.0)
    assert first.dtype == second.dtype == torch.float32
    # Identity covariance: whitening is a no-op, so this is exactly svd_split.
    plain_first, plain_second = svd_split(weight, 5)
    torch.testing.assert_close(second @ first, plain_second @ plain_first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first.norm(dim=1), second.norm(dim=0), rtol=1e-4, atol=1e-5)


def test_singular_covariance_is_handled_by_damping():
    weight = torch.randn(32, 32, dtype=torch.float64)
    # Inputs that live in a 6-dimensional subspace: rank-6 covariance.
    x = torch.randn(1000, 6, dtype=torch.float64) @ torch.randn(6, 32, dtype=torch.float64)
    covariance = second_moment(x)
    assert torch.linalg.matrix_rank(covariance) == 6
    plain_first, plain_second = svd_split(weight, 6)
    plain_error = output_error(weight, plain_second @ plain_first, x)
    first, second = whitened_svd_split(weight, covariance, 6)  # default damping
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    assert output_error(weight, second @ first, x) < 0.5 * plain_error
    # Rank 6 on inputs of rank 6 with light damping: the outputs come back almost exactly.
    first, second = whitened_svd_split(weight, covariance, 6, damping=1e-8)
    assert output_error(weight, second @ first, x) < 1e-3 < plain_error


def test_covariance_without_cholesky_factor_raises_whitening_error():
    covariance = torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))  # a dead channel
    with pytest.raises(WhiteningError, match="not positive definite"):
        whitening_factor(covariance, damping=0.0)
    whitening_factor(covariance)  # damped: fine
    with pytest.raises(WhiteningError, match="zero"):
        whitened_svd_split(torch.randn(4, 3), torch.zeros(3, 3), 2)
    with pytest.raises(WhiteningError, match="NaN"):
        whitening_factor(torch.full((3, 3), float("nan")))
    assert issubclass(WhiteningError, ValueError)


@pytest.mark.parametrize("damping", [-1e-3, float("nan"), float("inf"), True, "0.1"])
def test_bad_damping_is_a_value_error(damping):
    with pytest.raises(ValueError, match="damping"):
        whitening_factor(torch.eye(3), damping)


def test_bad_shapes_and_ranks_are_value_errors():
    with pytest.raises(ValueError, match=r"covariance must be \[12, 12\]"):
        whitened_svd_split(torch.randn(8, 12), torch.eye(8), 2)
    with pytest.raises(ValueError, match="rank must be in"):
        whitened_svd_split(torch.randn(8, 12), torch.eye(12), 9)
    with pytest.raises(ValueError, match="2-D"):
        whitened_svd_split(torch.randn(8, 12, 1), torch.eye(12), 2)
    with pytest.raises(ValueError, match=r"covariance must be \[6, 6\]"):
        whitened_tucker2(torch.randn(4, 6, 3, 3), torch.eye(4), 2, 2)
    with pytest.raises(ValueError, match="rank_in"):
        whitened_tucker2(torch.randn(4, 6, 3, 3), torch.eye(6), 7, 2)


@settings(max_examples=25, deadline=None)
@given(out_features=st.integers(2, 12), in_features=st.integers(2, 12), data=st.data())
def test_whitened_never_worse_than_plain_on_its_own_calibration_inputs(out_features, in_features, data):
    rank = data.draw(st.integers(1, min(out_features, in_features)))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g, dtype=torch.float64)
    x = anisotropic_inputs(200, in_features, decades=2, seed=seed)
    first, second = whitened_svd_split(weight, second_moment(x), rank, damping=0.0)
    plain_first, plain_second = svd_split(weight, rank)
    whitened_sq = ((x @ (weight - second @ first).T) ** 2).sum()
    plain_sq = ((x @ (weight - plain_second @ plain_first).T) ** 2).sum()
    assert whitened_sq <= plain_sq * (1 + 1e-9) + 1e-12


# ---- Tucker-2 ----------------------------------------------------------------------------------


def anisotropic_images(n, channels, size, seed=0):
    """Feature maps whose channels are strongly correlated (energy over 3 decades), spatially smooth."""
    rows = anisotropic_inputs(n * size * size, channels, decades=3, seed=seed)
    images = rows.reshape(n, size, size, channels).movedim(-1, 1)
    return F.avg_pool2d(images, 3, stride=1, padding=1)


def conv_output_error(weight, approx, x):
    reference = F.conv2d(x, weight, padding=1)
    return ((reference - F.conv2d(x, approx, padding=1)).norm() / reference.norm()).item()


def reconstruct(u_in, core, u_out):
    return torch.einsum("srhw,os,ir->oihw", core, u_out, u_in)


def test_activation_aware_tucker2_beats_plain_hooi_on_output_error():
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(32, 24, 3, 3, generator=g, dtype=torch.float64)
    calibration, held_out = anisotropic_images(48, 24, 8, seed=5).split([32, 16])
    covariance = second_moment(calibration.movedim(1, -1).reshape(-1, 24))
    for ranks in [(6, 8), (12, 12), (18, 20)]:
        plain = reconstruct(*tucker2(weight, *ranks))
        aware = reconstruct(*whitened_tucker2(weight, covariance, *ranks))
        plain_error, aware_error = conv_output_error(weight, plain, held_out), conv_output_error(weight, aware, held_out)
        assert aware_error < plain_error, (ranks, aware_error, plain_error)
        # The price: a larger weight error (it is the output that is optimised).
        assert (weight - aware).norm() > (weight - plain).norm()


@pytest.mark.parametrize("singular", [False, True])
def test_full_rank_whitened_tucker2_is_exact(singular):
    weight = torch.randn(10, 7, 3, 3, dtype=torch.float64)
    x = anisotropic_inputs(300, 7, decades=4)
    if singular:
        x[:, 0] = 0
    u_in, core, u_out = whitened_tucker2(weight, second_moment(x), 7, 10)
    assert u_in.shape == (7, 7) and core.shape == (10, 7, 3, 3) and u_out.shape == (10, 10)
    torch.testing.assert_close(reconstruct(u_in, core, u_out), weight, rtol=1e-9, atol=1e-9)


def test_whitened_tucker2_with_identity_covariance_is_plain_hooi():
    weight = torch.randn(12, 9, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(reconstruct(*whitened_tucker2(weight, torch.eye(9, dtype=torch.float64), 4, 5, damping=0.0)),
                               reconstruct(*tucker2(weight, 4, 5)), rtol=1e-9, atol=1e-9)


# ---- closed-form re-solves (sequential calibration) ------------------------------------------------


def test_last_factor_least_squares_keeps_the_prior_when_inputs_did_not_change():
    """z and y from the original layer itself: the answer is the factorization's own last factor
    and bias, whatever the damping."""
    from lrdaccel.factorize.whiten import least_squares_last_factor

    weight, bias = torch.randn(9, 12, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    x = anisotropic_inputs(300, 12) + 0.5
    first, second = whitened_svd_split(weight, second_moment(x), 4)
    z, y = x @ first.T, x @ (second @ first).T + bias
    for damping in (0.0, 1e-3, 1.0):
        last, fitted_bias = least_squares_last_factor(second_moment(z), y.T @ z / 300, second, z.mean(0), y.mean(0),
                                                      damping)
        torch.testing.assert_close(last, second)
        torch.testing.assert_close(fitted_bias, bias)


def test_reduced_rank_fit_is_the_whitened_svd_when_inputs_did_not_change_and_exact_at_full_rank():
    from lrdaccel.factorize.whiten import reduced_rank_fit

    weight, bias = torch.randn(10, 8, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    x = anisotropic_inputs(400, 8, decades=2) + 1.0
    mean = x.mean(0)
    centred = second_moment(x - mean)
    first, second, new_bias = reduced_rank_fit(weight, bias, second_moment(x), second_moment(x), 3, mean, mean,
                                               damping=0.0)
    w_first, w_second = whitened_svd_split(weight, centred, 3, damping=0.0)
    torch.testing.assert_close(second @ first, w_second @ w_first)
    torch.testing.assert_close(new_bias, bias + (weight - second @ first) @ mean)
    # A changed input, full rank: W' x_hat + c reproduces W x + b exactly when x = T x_hat.
    transform = torch.randn(8, 8, dtype=torch.float64)
    x_hat = x @ torch.linalg.inv(transform).T
    first, second, new_bias = reduced_rank_fit(weight, bias, second_moment(x_hat), x.T @ x_hat / 400, 8,
                                               x_hat.mean(0), mean, damping=0.0)
    torch.testing.assert_close(x_hat @ (second @ first).T + new_bias, x @ weight.T + bias)


def test_least_squares_last_factor_refuses_a_singular_system():
    from lrdaccel.factorize.whiten import least_squares_last_factor

    z = torch.zeros(50, 3, dtype=torch.float64)
    z[:, 0] = torch.randn(50, dtype=torch.float64)
    with pytest.raises(WhiteningError, match="singular"):
        least_squares_last_factor(second_moment(z), torch.randn(4, 3, dtype=torch.float64),
                                  torch.zeros(4, 3, dtype=torch.float64), damping=0.0)
    with pytest.raises(ValueError, match="both"):
        least_squares_last_factor(second_moment(z), torch.randn(4, 3, dtype=torch.float64),
                                  torch.zeros(4, 3, dtype=torch.float64), factor_mean=z.mean(0))
