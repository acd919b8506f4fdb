"""racing/verdict.py: standard errors of the final accuracy and verdicts that never call a
difference within two standard errors a win or a loss (issue 27, item 3), on constructed races."""

import math

import pytest

from lrdaccel.racing.results import combine
from lrdaccel.racing.verdict import final_accuracy_se


def _row(name, kind, final, interval, speedup=None):
    return {"name": name, "kind": kind, "options": {"kd": 0.0}, "lr_multiplier": 1.0, "param_count": 10,
            "trainable_params": 10, "notes": {}, "final_accuracy": final, "train_seconds": 300.0,
            "setup_seconds": 0.0, "infer_speedup": 1.5, "params": 0.75,
            "time_to_target_s": None if interval is None else interval[1], "time_to_target_interval_s": interval,
            "speedup_to_target": speedup, "curve": [[0.0, 0, 10.0], [300.0, 10, final]]}


def _race(lrd_final, lrd_interval, speedup, eval_items=600, target=87.33):
    seed = {"seed": 0, "target_accuracy": target, "chance_accuracy": 20.0, "reference": "original",
            "best_original": "original", "reference_at_start": False, "no_target": None, "eval_items": eval_items,
            "variants": [_row("original", "original", 87.83, [300.0, 355.0], 1.0),
                         _row("lrd", "lrd", lrd_final, lrd_interval, speedup)]}
    return combine([seed], header={})


def test_the_standard_error_is_binomial_over_the_items_and_adds_the_seeds_spread():
    p = (0.9 * 600 + 0.5) / 601
    assert final_accuracy_se([90.0], 600) == pytest.approx(100 * math.sqrt(p * (1 - p) / 600))
    spread = (math.sqrt(2) / math.sqrt(2))  # stdev of 89 and 91 is sqrt(2), over sqrt(2) seeds
    assert final_accuracy_se([89.0, 91.0], 600) == pytest.approx(math.hypot(final_accuracy_se([90.0], 600), spread))
    assert final_accuracy_se([100.0], 40) > 0  # 40 of 40 right still carries an error


def test_a_pair_within_noise_is_called_within_noise_not_a_loss():
    """The issue's own race: 0.67 points apart on 600 items is about one standard error."""
    results = _race(87.17, [300.0, 345.0], 355.0 / 345.0)
    row = results["variants"][1]
    assert row["vs_reference"]["within_noise"] and row["vs_reference"]["difference"] == pytest.approx(-0.66)
    assert "(within noise: 2 SE = " in row["verdict"] and "less accurate" not in row["verdict"]
    assert "about as soon" in row["verdict"] and "sooner" not in row["verdict"]  # 300-345 s overlaps 300-355 s
    assert "race more seeds to tell (--seeds 3)" in row["verdict"]
    assert row["final_accuracy_se"] == pytest.approx(final_accuracy_se([87.17], 600))


def test_a_difference_beyond_noise_is_called_and_a_clear_lead_to_the_target_is_sooner():
    results = _race(80.0, [100.0, 150.0], 355.0 / 150.0, eval_items=2000)
    row = results["variants"][1]
    assert not row["vs_reference"]["within_noise"] and ": less accurate" in row["verdict"]
    assert "reached the target sooner (100-150 s vs 300-355 s, 2.37x)" in row["verdict"]
    assert "--seeds" not in row["verdict"]


def test_a_miss_by_less_than_noise_says_so():
    results = _race(87.17, None, None)  # target 87.33: missed by 0.16 points, one item in 600
    assert "never reached the target (missed by 0.16 points, within noise)" in results["variants"][1]["verdict"]


def test_pooled_seeds_that_disagree_still_give_a_verdict():
    """Of two seeds the reference reached the target in one: its pooled median is never, and lrd's
    verdict says what is known instead of failing on the missing interval."""
    first = _race(88.5, [100.0, 150.0], 355.0 / 150.0)["seeds"][0]
    second = _race(88.5, [100.0, 150.0], None)["seeds"][0]
    second["seed"] = 1
    second["variants"][0].update(time_to_target_s=None, time_to_target_interval_s=None, speedup_to_target=None)
    pooled = combine([first, second], header={})
    assert pooled["variants"][0]["time_to_target_interval_s"] is None
    assert "reached the target at 100-150 s (the reference's median never did)" in pooled["variants"][1]["verdict"]


def test_an_interval_whose_ends_round_alike_reads_once():
    from lrdaccel.racing.verdict import interval_text

    assert interval_text([3.6, 4.4]) == "4 s" and interval_text([300.0, 345.2]) == "300-345 s"
