"""Scoring a race: the target, when a curve first reaches it, and how much sooner than the original.

A curve is a list of points `(train_seconds, step, accuracy)` in the order they were measured;
accuracies are percentages (0-100). The target is the original's final accuracy minus a margin
(0.5 points): close enough to call it the same accuracy, far enough that the noise of one
evaluation does not decide the race.
"""

from __future__ import annotations

import math
from typing import Sequence

from lrdaccel._settings import check_number

TARGET_MARGIN = 0.5  # points below the original's final accuracy

Point = tuple[float, int, float]


def target_accuracy(original_final: float, margin: float = TARGET_MARGIN) -> float:
    """The accuracy a variant must reach: the original's final accuracy minus `margin` points."""
    check_number("original_final", original_final, at_least=0, at_most=100)
    check_number("margin", margin, at_least=0)
    return original_final - margin


def time_to_target(curve: Sequence[Point], target: float) -> float | None:
    """Training seconds at the first point of `curve` at or above `target` (None if never).

    The first crossing counts, also where the curve drops below the target afterwards: it is when
    a user watching the evaluations would have had the accuracy."""
    for seconds, _step, accuracy in curve:
        if accuracy >= target:
            return float(seconds)
    return None


def speedup_to_target(original_seconds: float | None, seconds: float | None) -> float | None:
    """The original's time to the target over a variant's (None where either never reached it).

    A variant that reaches the target before any training (seconds 0, e.g. at the first
    evaluation of a model that needs no training) is infinitely faster: `math.inf`."""
    if original_seconds is None or seconds is None:
        return None
    if seconds <= 0:
        return math.inf if original_seconds > 0 else 1.0
    return original_seconds / seconds
