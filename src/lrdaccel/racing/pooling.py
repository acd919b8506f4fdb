"""Pooling races run apart (one seed per process, in parallel) into one results object: only
races that differ in nothing but their seeds, on the same data, can be pooled.

The data a race ran on is in its results: the items of each split and a digest of the
evaluation labels (every race), and the settings that chose the data (`data` in results.json:
--train-limit, --eval-limit, --max-length, --image-size, the --weights file's SHA-256, from the
CLI and `race_on_task`). A pooled median of evaluation sets of 4 and 24 items would mean nothing.
"""

from __future__ import annotations

from typing import Sequence

from lrdaccel.racing.results import RACE_VERSION, combine

# the header fields that say which data and starting model a race ran on
DATA_FIELDS = ("model", "task", "classes", "train_items", "eval_items", "eval_labels_sha256", "data")


def pool_runs(runs: Sequence[dict], sources: Sequence[str]) -> dict:
    """One results object from races of the same model, task, data, variants and settings run
    apart (different seeds in parallel processes): their seeds pooled, medians taken again.

    Raises:
        ValueError: fewer than two runs, results of an older format, runs that differ in anything
            but their seeds (naming the file and the setting that differs), or a seed that occurs
            twice.
    """
    if len(runs) < 2:
        raise ValueError("pooling needs at least two race results")
    for run, source in zip(runs, sources):
        if run.get("version") != RACE_VERSION:
            raise ValueError(f"{source}: race results of version {run.get('version')!r}; pooling needs version "
                             f"{RACE_VERSION} (this lrdaccel's): race that seed again")
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
        for key in DATA_FIELDS:
            if run.get(key) != first.get(key):
                raise ValueError(f"{source}: it ran on other data than {where}: {_differing(key, run, first)}; only "
                                 f"races on the same data can be pooled")
        if [row["name"] for row in run["variants"]] != names:
            raise ValueError(f"{source}: its variants differ from {where}'s ({names})")
    seeds = [seed for run in runs for seed in run["seeds"]]
    numbers = [seed["seed"] for seed in seeds]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"seeds {numbers} occur twice among the runs: run each seed once (--seed)")
    header = {k: v for k, v in first.items() if k not in ("seeds", "variants", *_POOLED)}
    header["config"] = {**first["config"], "seed": min(numbers), "seeds": len(numbers)}
    header["seeds_planned"] = len(numbers)
    header["pooled_from"] = list(sources)
    return combine(sorted(seeds, key=lambda seed: seed["seed"]), header)


# what combine() computes again from the pooled seeds, and the models one run saved in its own folder
_POOLED = ("target_accuracy", "no_target", "chance_accuracy", "reference", "best_original", "reference_at_start",
           "uncontrolled_lr", "saved")


def _differing(key: str, run: dict, first: dict) -> str:
    """`key`, or the setting under `data` that differs, with both values."""
    if key == "data" and isinstance(run.get(key), dict) and isinstance(first.get(key), dict):
        mine, theirs = run[key], first[key]
        setting = next(k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k))
        return f"{setting} {mine.get(setting)!r} vs {theirs.get(setting)!r}"
    return f"{key} {run.get(key)!r} vs {first.get(key)!r}"
