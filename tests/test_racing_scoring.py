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
