"""What a results file must hold, checked before a report is drawn from it.

Two kinds share a header (format, version, lrdaccel_version, created, machine, config):
"lrdaccel.bench" (the throughput table: models -> rows, one entry per model and runtime; "best":
our best against the original's best across runtimes; a peer's row, such as channel pruning at
LRD's parameters, has the same fields as the others and a "peer" object saying how it was built)
and "lrdaccel.demo" (the demo run).
A ratio spread is {"min", "median", "max", "values"} with min <= median <= max. Version 1 files
(before runtimes) are read as eager throughout.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any, Mapping

from lrdaccel._files import check_header
from lrdaccel._version import __version__
from lrdaccel.measure.machine import load_average, machine_info
from lrdaccel.measure.runtimes import INFERENCE_ONLY

BENCH_FORMAT = "lrdaccel.bench"
DEMO_FORMAT = "lrdaccel.demo"
RESULTS_VERSION = 2
HEADER_KEYS = ("format", "version", "lrdaccel_version", "created", "machine", "config")
BENCH_ROW_KEYS = ("variant", "label", "params", "macs", "params_ratio", "macs_ratio", "infer_ratio",
                  "infer_items_per_s")
TRAIN_ROW_KEYS = ("train_ratio", "train_items_per_s", "train_phases")
PEER_KEYS = ("kind", "importance", "matched_to", "target_params", "params", "pruning_ratio", "trials", "seconds")
SPREAD_KEYS = ("min", "median", "max", "values")


def _require(mapping: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(mapping).__name__}")
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ValueError(f"{where}: missing {missing}")


def _positive(value: Any, where: str, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: expected a positive {'integer' if integer else 'number'}, got {value!r}")


def check_spread(spread: Any, where: str) -> None:
    """A {"min", "median", "max", "values"} of positive numbers, in order."""
    _require(spread, SPREAD_KEYS, where)
    values = spread["values"]
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}.values: expected a non-empty list, got {values!r}")
    for i, value in enumerate(values):
        _positive(value, f"{where}.values[{i}]")
    for key in ("min", "median", "max"):
        _positive(spread[key], f"{where}.{key}")
    if not spread["min"] <= spread["median"] <= spread["max"]:
        raise ValueError(f"{where}: min <= median <= max does not hold: {spread['min']}, {spread['median']}, "
                         f"{spread['max']}")
    if not math.isclose(min(values), spread["min"]) or not math.isclose(max(values), spread["max"]):
        raise ValueError(f"{where}: min/max do not match the values")


def _check_bench(results: Mapping, where: str) -> None:
    models = results.get("models")
    if not isinstance(models, list) or not models:
        raise ValueError(f"{where}.models: expected a non-empty list")
    for i, model in enumerate(models):
        at = f"{where}.models[{i}]"
        _require(model, ("name", "input_shape", "batch_size", "plans", "rows"), at)
        rows = model["rows"]
        trains = "train_ratio" in (model["rows"][0] if model.get("rows") else {}) or (
            model.get("runtime", "eager") not in INFERENCE_ONLY and results["config"].get("train", True))
        if not isinstance(rows, list) or not rows or rows[0].get("variant") != "original":
            raise ValueError(f"{at}.rows: expected a list starting with the 'original' row")
        for j, row in enumerate(rows):
            row_at = f"{at}.rows[{j}]"
            _require(row, BENCH_ROW_KEYS + (TRAIN_ROW_KEYS if trains else ()), row_at)
            _positive(row["params"], f"{row_at}.params", integer=True)
            _positive(row["macs"], f"{row_at}.macs", integer=True)
            _positive(row["params_ratio"], f"{row_at}.params_ratio")
            _positive(row["macs_ratio"], f"{row_at}.macs_ratio")
            keys = ["infer_ratio", "infer_items_per_s"]
            if trains:
                _positive(row["train_phases"], f"{row_at}.train_phases", integer=True)
                keys += ["train_ratio", "train_items_per_s"]
            for key in keys:
                check_spread(row[key], f"{row_at}.{key}")
            if "peer" in row:
                _check_peer(row["peer"], f"{row_at}.peer")
        base = rows[0]
        for key in ("infer_ratio", "train_ratio") if trains else ("infer_ratio",):
            if any(not math.isclose(v, 1.0) for v in base[key]["values"]):
                raise ValueError(f"{at}.rows[0].{key}: the original's ratio to itself must be 1")
    for i, best in enumerate(results.get("best") or []):
        for what in ("infer", "train"):
            if what in best:
                at = f"{where}.best[{i}].{what}"
                _require(best[what], ("original", "ours", "ratio"), at)
                check_spread(best[what]["ratio"], f"{at}.ratio")


def _check_peer(peer: Any, where: str) -> None:
    """A peer row's account of how it was built (bench `peers`): matched to which LRD row, at what target."""
    _require(peer, PEER_KEYS, where)
    _positive(peer["target_params"], f"{where}.target_params", integer=True)
    _positive(peer["params"], f"{where}.params", integer=True)
    ratio = peer["pruning_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"{where}.pruning_ratio: expected a fraction in [0, 1), got {ratio!r}")


def _check_demo(results: Mapping, where: str) -> None:
    _require(results, ("dataset", "model", "pretrained", "original", "decomposed", "race", "ratios", "throughput",
                       "stages"), where)
    _require(results["race"], ("folder", "target_accuracy", "steps", "variants"), f"{where}.race")
    for side in ("original", "decomposed"):
        _require(results[side], ("params", "macs", "accuracy", "history"), f"{where}.{side}")
        for i, point in enumerate(results[side]["history"]):
            _require(point, ("step", "seconds", "accuracy"), f"{where}.{side}.history[{i}]")
        _positive(results[side]["params"], f"{where}.{side}.params", integer=True)
        _positive(results[side]["macs"], f"{where}.{side}.macs", integer=True)
        value = results[side]["accuracy"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{where}.{side}.accuracy: expected a fraction in [0, 1], got {value!r}")
    _require(results["decomposed"], ("accuracy_before_finetune", "layers"), f"{where}.decomposed")
    _require(results["ratios"], ("params", "macs", "infer", "train"), f"{where}.ratios")
    _positive(results["ratios"]["params"], f"{where}.ratios.params")
    _positive(results["ratios"]["macs"], f"{where}.ratios.macs")
    check_spread(results["ratios"]["infer"], f"{where}.ratios.infer")
    if results["ratios"]["train"] is not None or results["throughput"].get("runtime") not in INFERENCE_ONLY:
        check_spread(results["ratios"]["train"], f"{where}.ratios.train")
    for runtime, entry in (results["throughput"].get("by_runtime") or {}).items():
        at = f"{where}.throughput.by_runtime.{runtime}"
        for key in ("infer_ratio",) + (() if runtime in INFERENCE_ONLY else ("train_ratio",)):
            check_spread(entry.get(key), f"{at}.{key}")


def check_results(results: Any, source: str = "results") -> dict:
    """Raise ValueError naming the first key that is missing or wrong; return the results.

    Raises:
        ValueError: not an lrdaccel results object, a newer version, or a malformed field.
    """
    check_header(results, (BENCH_FORMAT, DEMO_FORMAT), RESULTS_VERSION, source, "results file")
    _require(results, HEADER_KEYS, source)
    (_check_bench if results["format"] == BENCH_FORMAT else _check_demo)(results, source)
    return dict(results)


def load_results(path: str | Path) -> dict:
    """Read and check a results JSON file.

    Raises:
        ValueError: not JSON, or not well-formed results (the message names the file and key).
        FileNotFoundError: no such file.
    """
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    return check_results(results, str(path))


def results_header(kind: str, config: dict, device: str = "cpu") -> dict:
    """The fields every results file starts with."""
    return {
        "format": kind,
        "version": RESULTS_VERSION,
        "lrdaccel_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "config": config,
    }


def record_end_load(results: dict) -> None:
    """Add the machine's load average at the end of the run next to the one at the start."""
    load = load_average()
    if load is not None:
        results["machine"]["load_average_1m_at_end"] = round(load, 2)
