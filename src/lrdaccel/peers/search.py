"""Find the pruning ratio that meets a budget: a bracketing search on a falling quantity.

Parameters (and, noisily, inference time) fall as the pruning ratio rises, so the ratio is found
like a root: start from the bracket [0, max_ratio], interpolate inside it (parameters fall
roughly with the square of the kept width, so interpolation needs a few trials where plain
bisection needs many), keep the guess at least a tenth of the bracket from either end so the
bracket always shrinks, and stop at the first ratio whose value is within tolerance.
Each trial builds a pruned copy; only the one returned is kept alive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

MIN_WIDTH = 1e-6  # a bracket narrower than this holds no other channel count


@dataclass(frozen=True)
class Trial:
    ratio: float
    value: float


def search_ratio(evaluate: Callable[[float], tuple[float, Any]], target: float, tolerance: float, start: float,
                 max_ratio: float, max_trials: int, what: str) -> tuple[float, float, Any, list[Trial]]:
    """The first ratio in [0, max_ratio] whose value is within `tolerance` (relative) of `target`.

    Args:
        evaluate: ratio -> (value, result); the value falls as the ratio rises.
        target: the value wanted (below `start`).
        tolerance: |value - target| <= tolerance * target counts as met.
        start: the value at ratio 0 (the unpruned model), known without a trial.
        max_ratio: the bracket's upper end.
        max_trials: calls of `evaluate` allowed.
        what: the quantity, for error messages ("parameters").

    Returns:
        (ratio, value, result, trials) of the ratio found, and every trial made.

    Raises:
        ValueError: even max_ratio leaves the value above the target, or no trial met it.
    """
    trials: list[Trial] = []

    def met(value: float) -> bool:
        return abs(value - target) <= tolerance * target

    def run(ratio: float) -> tuple[float, Any]:
        value, result = evaluate(ratio)
        trials.append(Trial(ratio, value))
        return value, result

    if met(start):
        value, result = run(0.0)
        return 0.0, value, result, trials
    lo, f_lo, hi = 0.0, start, max_ratio
    f_hi, result = run(hi)
    if met(f_hi):
        return hi, f_hi, result, trials
    if f_hi > target:
        raise ValueError(f"{what} target {_number(target)} is below what pruning reaches: at the largest ratio tried "
                         f"(max_ratio={max_ratio}) the model still has {_number(f_hi)}; kept layers hold the rest "
                         f"(see exclude / keep_stem), or raise max_ratio")
    while len(trials) < max_trials and hi - lo > MIN_WIDTH:
        width = hi - lo
        guess = lo + (f_lo - target) / (f_lo - f_hi) * width if f_lo != f_hi else lo + width / 2
        ratio = min(max(guess, lo + width / 10), hi - width / 10)
        value, result = run(ratio)
        if met(value):
            return ratio, value, result, trials
        if value > target:
            lo, f_lo = ratio, value
        else:
            hi, f_hi = ratio, value
        del result
    closest = min(trials, key=lambda t: abs(t.value - target))
    raise ValueError(f"no pruning ratio gives {what} within {tolerance:.1%} of the target {_number(target)}: "
                     f"the closest was {_number(closest.value)} at ratio {closest.ratio:.5f} after {len(trials)} "
                     f"trials (the count moves in steps: whole heads, rounded channels); raise tolerance or max_trials")


def _number(value: float) -> str:
    """Parameter counts with thousands separators, fractions with four digits."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
