"""How sure a race is: each variant's final accuracy with its standard error, and a one-line
verdict against the reference that never calls a difference within noise a win or a loss.

The standard error (in points, as the accuracy) has two parts:
- the evaluation set's: a finite set of items, binomial, sqrt(p (1 - p) / n), with p taken half an
  item towards 50% so that 0% or 100% still carry an error. Every seed reads the same items, so
  this part does not shrink with more seeds;
- the training's, where there are several seeds: their standard deviation over sqrt(seeds).
A difference between two variants is "within noise" where it is at most two standard errors of
the difference (the two errors added in quadrature: independent, which overstates the error of
two models read on the same items, so the verdict errs towards "within noise").

Times to the target are intervals: the target was crossed between two evaluations. A variant is
"sooner" only where its interval ends before the reference's begins.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

NOISE_SES = 2.0  # a difference within this many standard errors is no win and no loss


def final_accuracy_se(finals: Sequence[float], eval_items: int) -> float:
    """Standard error in points of the mean of `finals` (one per seed), each read on `eval_items` items."""
    p = (statistics.fmean(finals) / 100 * eval_items + 0.5) / (eval_items + 1)
    binomial = 100 * math.sqrt(p * (1 - p) / eval_items)
    seeds = statistics.stdev(finals) / math.sqrt(len(finals)) if len(finals) > 1 else 0.0
    return math.hypot(binomial, seeds)


def compare(row: dict, reference: dict) -> dict:
    """{difference, se, within_noise} of `row`'s final accuracy against the reference's."""
    difference = row["final_accuracy"] - reference["final_accuracy"]
    se = math.hypot(row["final_accuracy_se"], reference["final_accuracy_se"])
    return {"difference": difference, "se": se, "within_noise": abs(difference) <= NOISE_SES * se}


def _accuracy(row: dict, reference: dict, comparison: dict) -> str:
    text = (f"final {row['final_accuracy']:.2f}% ± {row['final_accuracy_se']:.2f}, "
            f"{comparison['difference']:+.2f} points vs {reference['name']}")
    if comparison["within_noise"]:
        return text + f" (within noise: 2 SE = {NOISE_SES * comparison['se']:.2f})"
    return text + (": more accurate" if comparison["difference"] > 0 else ": less accurate")


def interval_text(interval: Sequence[float]) -> str:
    """"300-345 s", or "345 s" where both ends read the same in whole seconds."""
    low, high = (f"{end:.0f}" for end in interval)
    return f"{high} s" if low == high else f"{low}-{high} s"


def _time(row: dict, reference: dict, results: dict) -> str:
    if results.get("no_target"):
        return "no target (the best original is at or below chance)"
    interval, mine = reference.get("time_to_target_interval_s"), row.get("time_to_target_interval_s")
    if mine is None:
        gap = results["target_accuracy"] - row["final_accuracy"]
        near = gap <= NOISE_SES * row["final_accuracy_se"]
        return f"never reached the target (missed by {gap:.2f} points{', within noise' if near else ''})"
    if results.get("reference_at_start"):
        return ("at the target at start" if row["curve"][0][2] >= results["target_accuracy"] else
                f"back at the target at {interval_text(mine)} (the reference was there at start)")
    if interval is None:  # pooled: the reference's median over the seeds is never
        return f"reached the target at {interval_text(mine)} (the reference's median never did)"
    if mine[1] <= interval[0] and row["name"] != reference["name"]:
        speedup = "" if row["speedup_to_target"] is None else f", {row['speedup_to_target']:.2f}x"
        return f"reached the target sooner ({interval_text(mine)} vs {interval_text(interval)}{speedup})"
    if mine[0] >= interval[1] and row["name"] != reference["name"]:
        return f"reached the target later ({interval_text(mine)} vs {interval_text(interval)})"
    if row["name"] == reference["name"]:
        return f"first original at the target ({interval_text(mine)})"
    return (f"reached the target about as soon ({interval_text(mine)} vs {interval_text(interval)}: "
            f"the evaluations overlap)")


def verdict(row: dict, reference: dict, results: dict, seeds: int) -> str:
    """One line: accuracy against the reference (with its noise), the target, and serving."""
    parts = [row["name"]]
    if row["name"] == reference["name"]:
        role = "the best original (no reference: no target)" if results.get("no_target") else "the reference"
        parts.append(f"{role}, final {row['final_accuracy']:.2f}% ± {row['final_accuracy_se']:.2f}")
    else:
        comparison = compare(row, reference)
        parts.append(_accuracy(row, reference, comparison))
    parts.append(_time(row, reference, results))
    parts.append(f"serves {row['infer_speedup']:.2f}x at {row['params']:.3f}x the parameters")
    line = f"{parts[0]}: " + "; ".join(parts[1:])
    if row["name"] != reference["name"] and compare(row, reference)["within_noise"]:
        line += f"; race more seeds to tell (--seeds {max(3, 2 * seeds)})"
    return line
