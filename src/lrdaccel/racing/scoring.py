"""Scoring a race: the target, when a curve first reaches it, and how much sooner than the reference.

A curve is a list of points `(train_seconds, step, accuracy)` in the order they were measured;
accuracies are percentages (0-100). The target is the best original's final accuracy minus a
margin (0.5 points): close enough to call it the same accuracy, far enough that the noise of one
evaluation does not decide the race. "Best" is the variant of kind `original` (any learning rate
or distillation) with the highest final accuracy, the first listed on a tie: the bar a user could
have had without compressing. The reference is the original variant that reaches that target
first (the first listed on a tie); every speed-up to the target is its time over a variant's.

A target at or below chance (the accuracy of always answering the evaluation set's most frequent
label) is no target: nothing was learnt to reach, and no speed-up is given.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch

from lrdaccel._settings import check_number

TARGET_MARGIN = 0.5  # points below the best original's final accuracy

Point = tuple[float, int, float]


def target_accuracy(original_final: float, margin: float = TARGET_MARGIN) -> float:
    """The accuracy a variant must reach: the best original's final accuracy minus `margin` points."""
    check_number("original_final", original_final, at_least=0, at_most=100)
    check_number("margin", margin, at_least=0)
    return original_final - margin


def chance_accuracy(labels: torch.Tensor) -> float:
    """Accuracy in percent of always answering the most frequent label of `labels`."""
    if len(labels) == 0:
        return 0.0
    return 100.0 * max(Counter(labels.tolist()).values()) / len(labels)


def first_reached(curve: Sequence[Point], target: float) -> int | None:
    """Index of the first point of `curve` at or above `target` (None if never).

    The first crossing counts, also where the curve drops below the target afterwards: it is when
    a user watching the evaluations would have had the accuracy."""
    return next((i for i, point in enumerate(curve) if point[2] >= target), None)


def time_to_target(curve: Sequence[Point], target: float) -> float | None:
    """Training seconds at the first point of `curve` at or above `target` (None if never)."""
    index = first_reached(curve, target)
    return None if index is None else float(curve[index][0])


def target_interval(curve: Sequence[Point], target: float) -> list[float] | None:
    """[seconds of the evaluation before the first at the target, seconds of that one]: the target
    was reached somewhere in between (evaluations are spaced, the crossing is not seen exactly).
    Reached at the first evaluation (before any step): both ends are its seconds."""
    index = first_reached(curve, target)
    if index is None:
        return None
    return [float(curve[max(0, index - 1)][0]), float(curve[index][0])]


def speedup_to_target(original_seconds: float | None, seconds: float | None) -> float | None:
    """The reference's time to the target over a variant's (None where either never reached it).

    A variant that reaches the target before any training (seconds 0, e.g. at the first
    evaluation of a model that needs no training) is infinitely faster: `math.inf`."""
    if original_seconds is None or seconds is None:
        return None
    if seconds <= 0:
        return math.inf if original_seconds > 0 else 1.0
    return original_seconds / seconds


def score_seed(result: dict, margin: float, chance: float) -> dict:
    """One seed's race scored: `result` ({"variants": rows with name, kind, curve, final_accuracy})
    with `target_accuracy`, `chance_accuracy`, `reference`, `reference_at_start`, `no_target`
    added, and per row `time_to_target_s`, `time_to_target_interval_s`, `speedup_to_target`.

    Where the reference is at the target at its first evaluation (a trained original), no
    speed-up is given: every ratio to its ~0 s would read 0.00x.
    """
    rows = result["variants"]
    originals = [row for row in rows if row["kind"] == "original"]
    best = max(originals, key=lambda row: row["final_accuracy"])  # max keeps the first on a tie
    target = target_accuracy(best["final_accuracy"], margin)
    no_target = None
    if target <= chance:
        no_target = (f"the best original's final accuracy {best['final_accuracy']:.2f}% - {margin:g} points is at "
                     f"or below chance ({chance:.2f}%, always answering the most frequent label): nothing to reach")
    times = {row["name"]: None if no_target else time_to_target(row["curve"], target) for row in rows}
    reached = [row for row in originals if times[row["name"]] is not None]
    reference = min(reached, key=lambda row: times[row["name"]])["name"] if reached else None
    at_start = reference is not None and first_reached(next(r for r in rows if r["name"] == reference)["curve"],
                                                       target) == 0
    for row in rows:
        row["time_to_target_s"] = times[row["name"]]
        row["time_to_target_interval_s"] = None if no_target else target_interval(row["curve"], target)
        row["speedup_to_target"] = (None if at_start or reference is None else
                                    speedup_to_target(times[reference], times[row["name"]]))
    result.update({"target_accuracy": None if no_target else target, "chance_accuracy": chance,
                   "best_original": best["name"], "reference": reference, "reference_at_start": at_start,
                   "no_target": no_target})
    return result
