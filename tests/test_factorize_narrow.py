"""The narrow form's math: channel selection on activation statistics and the consumer's refit."""

import pytest
import torch

from lrdaccel.factorize.narrow import SELECTIONS, refit_consumer, relative_output_error, select_channels


def _activations(rows=400, n=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(rows, n, generator=generator, dtype=torch.float64) + 0.3)


def _augmented_gram(a):
    with_one = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    return with_one.T @ with_one / a.shape[0]


def _consumer(n=12, out=5, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(out, n, generator=generator, dtype=torch.float64),
            torch.randn(out, generator=generator, dtype=torch.float64))


@pytest.mark.parametrize("method", SELECTIONS)
def test_full_width_reproduces_the_consumer(method):
    a = _activations()
    w, b = _consumer()
    kept = select_channels(_augmented_gram(a), 12, method, weight=w)
    assert kept == list(range(12))
    new_w, new_b = refit_consumer(w, b, _augmented_gram(a), kept)
    torch.testing.assert_close(new_w, w, rtol=0, atol=1e-5)
    torch.testing.assert_close(new_b, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["qr", "greedy"])  # "energy" scores channels alone: no ID
def test_dropping_duplicated_channels_loses_nothing(method):
    a = _activations(n=9)
    a = torch.cat([a, a[:, [2, 5, 7]]], 1)  # channels 9, 10, 11 duplicate 2, 5, 7
    w, b = _consumer(n=12)
    gram = _augmented_gram(a)
    kept = select_channels(gram, 9, method, weight=w)
    kept_values = {tuple(a[:, j].tolist()) for j in kept}
    assert len(kept_values) == 9  # one of each duplicated pair, every other channel
    new_w, new_b = refit_consumer(w, b, gram, kept)
    reference, narrowed = a @ w.T + b, a[:, kept] @ new_w.T + new_b
    assert (narrowed - reference).norm() / reference.norm() < 1e-5
    assert relative_output_error(w, b, gram, kept, new_w, new_b) < 1e-5


def test_refit_without_bias_and_its_error_matches_the_data():
    a = _activations()
    w, _ = _consumer()
    gram = a.T @ a / a.shape[0]
    kept = select_channels(gram, 6, "qr", constant=False)
    new_w, new_b = refit_consumer(w, None, gram, kept)
    assert new_b is None and new_w.shape == (5, 6)
    reference = a @ w.T
    measured = float((a[:, kept] @ new_w.T - reference).norm() / reference.norm())
    assert relative_output_error(w, None, gram, kept, new_w, None) == pytest.approx(measured, rel=1e-6)
    no_refit = float((a[:, kept] @ w[:, kept].T - reference).norm() / reference.norm())
    assert measured < no_refit


def test_greedy_selection_fits_no_worse_than_energy():
    a = _activations(n=16) @ torch.randn(16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = torch.relu(a)
    w, b = _consumer(n=16)
    gram = _augmented_gram(a)
    errors = {}
    for method in ("greedy", "energy"):
        kept = select_channels(gram, 6, method, weight=w)
        errors[method] = relative_output_error(w, b, gram, kept, *refit_consumer(w, b, gram, kept))
    assert errors["greedy"] <= errors["energy"] + 1e-12


@pytest.mark.parametrize("count, message", [(0, r"in \[1, 12\], got 0"), (13, r"in \[1, 12\], got 13")])
def test_a_width_out_of_range_is_refused(count, message):
    with pytest.raises(ValueError, match=message):
        select_channels(_augmented_gram(_activations()), count, "qr")


def test_unknown_or_underspecified_selection_is_refused():
    gram = _augmented_gram(_activations())
    with pytest.raises(ValueError, match="selection must be one of"):
        select_channels(gram, 3, "random")
    with pytest.raises(ValueError, match="'energy' needs the consumer's weight"):
        select_channels(gram, 3, "energy")
