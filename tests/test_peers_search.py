"""The ratio search on stand-in functions: it meets the target, keeps the bracket, and explains
why it cannot."""

import pytest

from lrdaccel.peers.search import search_ratio


def _quadratic(ratio):
    """Parameters of a conv net fall about with the square of the kept width."""
    value = 1000 * (1 - ratio) ** 2 + 50
    return value, f"model at {ratio:.4f}"


@pytest.mark.parametrize("target", [900, 500, 200, 80])
def test_finds_a_ratio_within_tolerance_in_few_trials(target):
    ratio, value, result, trials = search_ratio(_quadratic, target, 0.02, 1050, 0.9, 30, "parameters")
    assert abs(value - target) <= 0.02 * target
    assert result == f"model at {ratio:.4f}" and trials[-1].ratio == ratio
    assert len(trials) <= 8


def test_a_target_met_at_ratio_zero_prunes_nothing():
    ratio, value, _, trials = search_ratio(_quadratic, 1040, 0.02, 1050, 0.9, 30, "parameters")
    assert ratio == 0.0 and value == 1050 and len(trials) == 1


def test_a_target_below_max_ratio_names_what_is_reachable():
    with pytest.raises(ValueError, match="parameters target 40 is below what pruning reaches.*60"):
        search_ratio(_quadratic, 40, 0.02, 1050, 0.9, 30, "parameters")


def test_a_step_the_target_falls_into_is_reported_with_the_closest_trial():
    def steps(ratio):
        return (1000.0 if ratio < 0.5 else 500.0), None

    with pytest.raises(ValueError, match=r"within 2\.0% of the target 750: the closest was 1,000|closest was 500"):
        search_ratio(steps, 750, 0.02, 1050, 0.9, 40, "parameters")


def test_the_trial_budget_is_kept():
    calls = []

    def slow(ratio):
        calls.append(ratio)
        return 1000 * (1 - ratio) ** 8 + 1, None

    with pytest.raises(ValueError, match="after 3 trials"):
        search_ratio(slow, 300, 0.0001, 1001, 0.9, 3, "parameters")
    assert len(calls) == 3 and all(0 < r <= 0.9 for r in calls)
