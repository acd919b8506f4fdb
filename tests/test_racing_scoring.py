"""racing/scoring.py: the target, the first time a curve reaches it, and the speed-up over the original;
and racing/results.py pooling those over seeds."""

import math

import pytest

from lrdaccel.racing.scoring import speedup_to_target, target_accuracy, time_to_target

ORIGINAL = [[0.0, 0, 10.0], [100.0, 50, 80.0], [200.0, 100, 86.0], [300.0, 150, 87.0]]


def test_target_is_the_original_final_accuracy_minus_half_a_point():
    assert target_accuracy(87.0) == pytest.approx(86.5)
    assert target_accuracy(87.0, margin=0) == 87.0
    with pytest.raises(ValueError, match="original_final"):
        target_accuracy(120.0)


def test_time_to_target_is_the_first_point_at_or_above_it():
    assert time_to_target(ORIGINAL, 86.5) == 300.0
    assert time_to_target(ORIGINAL, 86.0) == 200.0  # "at or above": equal counts


def test_never_reached_is_none():
    assert time_to_target([[0.0, 0, 10.0], [50.0, 50, 86.4]], 86.5) is None
    assert speedup_to_target(300.0, None) is None


def test_reached_at_the_first_point():
    curve = [[12.5, 0, 90.0], [40.0, 50, 91.0]]
    assert time_to_target(curve, 89.0) == 12.5
    assert speedup_to_target(300.0, 12.5) == pytest.approx(24.0)


def test_reached_then_lost_counts_the_first_crossing():
    curve = [[0.0, 0, 10.0], [60.0, 50, 86.6], [120.0, 100, 85.0], [180.0, 150, 86.0]]
    assert time_to_target(curve, 86.5) == 60.0
    assert speedup_to_target(time_to_target(ORIGINAL, 86.5), 60.0) == pytest.approx(5.0)


def test_speedup_is_the_original_time_over_the_variant_time():
    assert speedup_to_target(300.0, 200.0) == pytest.approx(1.5)
    assert speedup_to_target(None, 200.0) is None
    assert speedup_to_target(300.0, 0.0) == math.inf  # at the target before any training
    assert speedup_to_target(0.0, 0.0) == 1.0


def _row(name, kind, time_s, speedup, accuracy=85.0):
    return {"name": name, "kind": kind, "options": {"kd": 0.0}, "lr_multiplier": 1.0, "param_count": 10,
            "trainable_params": 10, "notes": [], "final_accuracy": accuracy, "train_seconds": 100.0,
            "setup_seconds": 0.0, "infer_speedup": 1.0, "params": 1.0, "time_to_target_s": time_s,
            "time_to_target_interval_s": None if time_s is None else [0.0, time_s], "speedup_to_target": speedup,
            "curve": [[0.0, 0, 10.0], [100.0, 10, accuracy]]}


def _seed(time_s, speedup, accuracy=85.0, number=0):
    """One seed's results as combine() reads them (scored): the original and one variant."""
    return {"seed": number, "target_accuracy": 84.5, "chance_accuracy": 25.0, "reference": "original",
            "best_original": "original", "reference_at_start": False, "no_target": None, "eval_items": 400,
            "variants": [_row("original", "original", 100.0, 1.0, accuracy), _row("lrd", "lrd", time_s, speedup,
                                                                                  accuracy)]}


@pytest.mark.parametrize("seeds, time_s, speedup", [
    ([(50.0, 2.0), (None, None)], None, None),                  # one seed never: no 1.0x "median"
    ([(50.0, 2.0), (100.0, 1.0)], 75.0, 1.5),                   # both reached: the usual median
    ([(50.0, 2.0), (None, None), (100.0, 1.0)], 100.0, 1.0),    # odd count: the middle seed
    ([(None, None), (None, None), (100.0, 1.0)], None, None),   # most never: never
])
def test_pooled_seeds_never_average_a_never_into_a_speedup(seeds, time_s, speedup):
    from lrdaccel.racing.results import combine

    pooled = combine([_seed(*s) for s in seeds], header={})["variants"][1]
    assert pooled["time_to_target_s"] == time_s and pooled["speedup_to_target"] == speedup
    assert pooled["reached_target"] == sum(s[0] is not None for s in seeds)


def _scored(curves: dict, kinds: dict, margin=0.5, chance=25.0):
    from lrdaccel.racing.scoring import score_seed

    rows = [{"name": name, "kind": kinds[name], "curve": curve, "final_accuracy": curve[-1][2]}
            for name, curve in curves.items()]
    return score_seed({"variants": rows}, margin, chance)


def test_the_target_is_the_best_originals_and_the_reference_the_first_original_there():
    """original(lr=2) ends higher: it sets the target (86.5 - 0.5 = 86.0); `original` never gets
    there, so the reference is original(lr=2) and the speed-ups are over its 200 s."""
    result = _scored({"original": [[0.0, 0, 10.0], [100.0, 5, 80.0], [200.0, 10, 85.0]],
                      "original(lr=2)": [[0.0, 0, 10.0], [100.0, 5, 84.0], [200.0, 10, 86.5]],
                      "lrd": [[1.0, 0, 10.0], [60.0, 5, 86.2], [120.0, 10, 86.0]]},
                     {"original": "original", "original(lr=2)": "original", "lrd": "lrd"})
    assert result["target_accuracy"] == 86.0 and result["best_original"] == "original(lr=2)"
    assert result["reference"] == "original(lr=2)" and not result["reference_at_start"]
    original, control, decomposed = result["variants"]
    assert original["time_to_target_s"] is None and original["speedup_to_target"] is None
    assert control["speedup_to_target"] == 1.0 and control["time_to_target_interval_s"] == [100.0, 200.0]
    assert decomposed["time_to_target_interval_s"] == [1.0, 60.0]
    assert decomposed["speedup_to_target"] == pytest.approx(200.0 / 60.0)


def test_of_two_originals_at_the_target_the_sooner_is_the_reference():
    result = _scored({"original": [[0.0, 0, 10.0], [100.0, 5, 90.0], [200.0, 10, 90.0]],
                      "original(lr=2)": [[0.0, 0, 10.0], [100.0, 5, 80.0], [200.0, 10, 90.0]]},
                     {"original": "original", "original(lr=2)": "original"})
    assert result["best_original"] == "original" and result["reference"] == "original"  # a tie: the first listed


def test_a_target_at_or_below_chance_is_no_target():
    """Issue 30 item 6: an original at 0% gave a -0.5% target that every variant "reached"."""
    result = _scored({"original": [[0.0, 0, 0.0], [100.0, 5, 0.0]], "lrd": [[7.0, 0, 0.0], [90.0, 5, 0.0]]},
                     {"original": "original", "lrd": "lrd"})
    assert result["target_accuracy"] is None and "at or below chance (25.00%" in result["no_target"]
    assert all(row["time_to_target_s"] is None and row["speedup_to_target"] is None for row in result["variants"])
    at_chance = _scored({"original": [[0.0, 0, 10.0], [100.0, 5, 25.5]]}, {"original": "original"})
    assert at_chance["no_target"] and at_chance["reference"] is None
    assert _scored({"original": [[0.0, 0, 10.0], [100.0, 5, 25.6]]}, {"original": "original"})["no_target"] is None


def test_chance_is_always_answering_the_most_frequent_label():
    import torch

    from lrdaccel.racing.scoring import chance_accuracy

    assert chance_accuracy(torch.tensor([0, 1, 1, 2])) == 50.0
