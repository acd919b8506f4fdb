"""A race's results across seeds: each seed's race as it ran, and per variant the median over
seeds with its spread, in one JSON object (`results.json`).

Per variant, the headline fields are medians over the seeds: `final_accuracy`, `train_seconds`,
`time_to_target_s` (and `time_to_target_interval_s`, the evaluations around it) and
`speedup_to_target` (a seed where the variant never reached the target counts as never:
infinitely late, no speed-up; a median that lands there is null), and `infer_speedup`; `curve` is
the point-by-point median of the seeds' curves (they evaluate at the same steps). `spread` holds
{min, median, max, values} of each over the seeds. `final_accuracy_se` and `verdict` say how
sure the race is (lrdaccel.racing.verdict); `reference` names the original variant first at the
target (lrdaccel.racing.scoring), `uncontrolled_lr` the variants at a learning rate no original
raced at.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Sequence

from lrdaccel._files import atomic_write, check_header
from lrdaccel.bench.schema import results_header
from lrdaccel.racing.verdict import compare, final_accuracy_se, verdict

RACE_FORMAT = "lrdaccel.race"
RACE_VERSION = 2  # 2: reference, final_accuracy_se, verdict, lr_multiplier, intervals
MEDIAN_KEYS = ("final_accuracy", "train_seconds", "setup_seconds", "infer_speedup", "params")


def combine(seeds: Sequence[dict], header: dict) -> dict:
    """The results object: `header` (results_header), the seeds, the medians over them, each
    variant's final accuracy with its standard error and a one-line verdict (racing.verdict)."""
    variants = []
    for i, first in enumerate(seeds[0]["variants"]):
        rows = [seed["variants"][i] for seed in seeds]
        row = {key: first[key] for key in ("name", "kind", "options", "lr_multiplier", "param_count",
                                           "trainable_params", "notes")}
        row.update({key: statistics.median(r[key] for r in rows) for key in MEDIAN_KEYS})
        row["final_accuracy_se"] = final_accuracy_se([r["final_accuracy"] for r in rows], seeds[0]["eval_items"])
        row["time_to_target_s"] = _median_or_none([r["time_to_target_s"] for r in rows], never=math.inf)
        intervals = [r["time_to_target_interval_s"] or [None, None] for r in rows]
        row["time_to_target_interval_s"] = (None if row["time_to_target_s"] is None else
                                            [_median_or_none([iv[k] for iv in intervals], never=math.inf)
                                             for k in (0, 1)])
        row["speedup_to_target"] = _median_or_none([r["speedup_to_target"] for r in rows], never=0.0)
        row["reached_target"] = sum(r["time_to_target_s"] is not None for r in rows)
        row["curve"] = _median_curve([r["curve"] for r in rows])
        row["spread"] = {key: _spread([r[key] for r in rows]) for key in
                         ("final_accuracy", "train_seconds", "time_to_target_s", "speedup_to_target", "infer_speedup")}
        variants.append(row)
    results = {**header, "format": RACE_FORMAT, "version": RACE_VERSION, "seeds": list(seeds), "variants": variants,
               **_pooled_target(seeds, [row["name"] for row in variants])}
    by_name = {row["name"]: row for row in variants}
    reference = by_name[results["reference"] or results["best_original"]]
    for row in variants:
        if row is not reference:
            row["vs_reference"] = compare(row, reference)
        row["verdict"] = verdict(row, reference, results, len(seeds))
    results["uncontrolled_lr"] = _uncontrolled_lr(variants)
    return results


def _pooled_target(seeds: Sequence[dict], names: list[str]) -> dict:
    """The target (median over the seeds), the reference and the best original (named by most
    seeds, the first listed on a tie), and why there is no target where a seed had none."""
    missing = [seed["seed"] for seed in seeds if seed.get("no_target")]
    if missing:
        reason = next(seed["no_target"] for seed in seeds if seed.get("no_target"))
        no_target = reason if len(seeds) == 1 else f"seed(s) {missing}: {reason}"
        target = None
    else:
        no_target, target = None, statistics.median(seed["target_accuracy"] for seed in seeds)

    def most(key: str) -> str | None:
        votes = Counter(seed[key] for seed in seeds if seed[key] is not None)
        return max(names, key=lambda name: votes[name]) if votes else None

    return {"target_accuracy": target, "no_target": no_target, "chance_accuracy": seeds[0]["chance_accuracy"],
            "reference": None if no_target else most("reference"), "best_original": most("best_original"),
            "reference_at_start": all(seed["reference_at_start"] for seed in seeds)}


def _uncontrolled_lr(variants: list[dict]) -> dict[str, float]:
    """Variants at a learning-rate multiplier no original variant trains at, by name: their
    comparison with the reference mixes the learning rate in."""
    controlled = {row["lr_multiplier"] for row in variants
                  if row["kind"] == "original" and not row["options"].get("kd")}
    return {row["name"]: row["lr_multiplier"] for row in variants if row["lr_multiplier"] not in controlled}


def _median_or_none(values: list[float | None], never: float) -> float | None:
    """The median over the seeds, where a seed that never reached the target sorts as `never`
    (inf for a time, 0 for a speed-up). With an even count the median is the mean of the two
    middle values; if either is a never, so is the median: one seed's 0.98x and another's
    never are no 0.49x."""
    ordered = sorted(never if v is None else v for v in values)
    middle = ordered[(len(ordered) - 1) // 2: len(ordered) // 2 + 1]
    if any(v == never for v in middle):
        return None
    return statistics.median(ordered)


def _spread(values: list[float | None]) -> dict:
    """{min, median, max, values} of the seeds' values that exist (None where none do)."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    if not present:
        return {"min": None, "median": None, "max": None, "values": values}
    return {"min": min(present), "median": statistics.median(present), "max": max(present), "values": values}


def _median_curve(curves: list[list[list]]) -> list[list]:
    """Point-by-point median of curves evaluated at the same steps (cut to the shortest)."""
    length = min(len(curve) for curve in curves)
    return [[statistics.median(curve[i][0] for curve in curves), curves[0][i][1],
             statistics.median(curve[i][2] for curve in curves)] for i in range(length)]


def new_header(config: dict, device: str) -> dict:
    return results_header(RACE_FORMAT, config, device)


def write_results(results: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n"))


def load_race(path: str | Path) -> dict:
    """Read a race's results.json, checking its header and the fields the report reads.

    Raises:
        ValueError: not JSON, not race results, or a field missing (naming the file and the field).
    """
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    check_header(results, RACE_FORMAT, RACE_VERSION, str(path), "race results file")
    for key in ("target_accuracy", "variants", "seeds", "config"):
        if key not in results:
            raise ValueError(f"{path}: missing {key!r}")
    for i, row in enumerate(results["variants"]):
        for key in ("name", "params", "final_accuracy", "train_seconds", "curve", "time_to_target_s",
                    "speedup_to_target", "infer_speedup"):
            if key not in row:
                raise ValueError(f"{path}: variants[{i}] has no {key!r}")
    return results
