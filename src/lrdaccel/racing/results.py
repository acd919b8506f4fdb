"""A race's results across seeds: each seed's race as it ran, and per variant the median over
seeds with its spread, in one JSON object (`results.json`).

Per variant, the headline fields are medians over the seeds: `final_accuracy`, `train_seconds`,
`time_to_target_s` and `speedup_to_target` (a seed where the variant never reached the target
counts as never: infinitely late, no speed-up; a median that lands there is null), and
`infer_speedup`; `curve` is the point-by-point median of the seeds' curves (they evaluate at the
same steps). `spread` holds {min, median, max, values} of each over the seeds.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Sequence

from lrdaccel._files import atomic_write, check_header
from lrdaccel.bench.schema import results_header

RACE_FORMAT = "lrdaccel.race"
RACE_VERSION = 1
MEDIAN_KEYS = ("final_accuracy", "train_seconds", "setup_seconds", "infer_speedup", "params")


def combine(seeds: Sequence[dict], header: dict) -> dict:
    """The results object: `header` (results_header), the seeds, and the medians over them."""
    variants = []
    for i, first in enumerate(seeds[0]["variants"]):
        rows = [seed["variants"][i] for seed in seeds]
        row = {key: first[key] for key in ("name", "kind", "options", "param_count", "trainable_params", "notes")}
        row.update({key: statistics.median(r[key] for r in rows) for key in MEDIAN_KEYS})
        row["time_to_target_s"] = _median_or_none([r["time_to_target_s"] for r in rows], never=math.inf)
        row["speedup_to_target"] = _median_or_none([r["speedup_to_target"] for r in rows], never=0.0)
        row["reached_target"] = sum(r["time_to_target_s"] is not None for r in rows)
        row["curve"] = _median_curve([r["curve"] for r in rows])
        row["spread"] = {key: _spread([r[key] for r in rows]) for key in
                         ("final_accuracy", "train_seconds", "time_to_target_s", "speedup_to_target", "infer_speedup")}
        variants.append(row)
    return {**header, "format": RACE_FORMAT, "version": RACE_VERSION,
            "target_accuracy": statistics.median(seed["target_accuracy"] for seed in seeds),
            "seeds": list(seeds), "variants": variants}


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


def pool_runs(runs: Sequence[dict], sources: Sequence[str]) -> dict:
    """One results object from races of the same model, task, variants and settings run apart
    (different seeds in parallel processes): their seeds pooled, medians taken again.

    Raises:
        ValueError: fewer than two runs, runs that differ in anything but their seeds (naming the
            file and what differs), or a seed that occurs twice.
    """
    if len(runs) < 2:
        raise ValueError("pooling needs at least two race results")
    first, where = runs[0], sources[0]
    ignore = {"seed", "seeds"}
    reference = {k: v for k, v in first["config"].items() if k not in ignore}
    names = [row["name"] for row in first["variants"]]
    for run, source in zip(runs[1:], sources[1:]):
        config = {k: v for k, v in run["config"].items() if k not in ignore}
        differing = sorted(k for k in set(config) | set(reference) if config.get(k) != reference.get(k))
        if differing:
            raise ValueError(f"{source}: its settings differ from {where}'s in {differing}: only races that differ "
                             f"in their seeds can be pooled")
        for key in ("model", "task"):
            if run.get(key) != first.get(key):
                raise ValueError(f"{source}: {key} {run.get(key)!r} differs from {where}'s {first.get(key)!r}")
        if [row["name"] for row in run["variants"]] != names:
            raise ValueError(f"{source}: its variants differ from {where}'s ({names})")
    seeds = [seed for run in runs for seed in run["seeds"]]
    numbers = [seed["seed"] for seed in seeds]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"seeds {numbers} occur twice among the runs: run each seed once (--seed)")
    header = {k: v for k, v in first.items() if k not in ("seeds", "variants", "target_accuracy")}
    header["config"] = {**first["config"], "seed": min(numbers), "seeds": len(numbers)}
    header["pooled_from"] = list(sources)
    return combine(sorted(seeds, key=lambda seed: seed["seed"]), header)


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
