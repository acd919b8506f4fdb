"""The one timing core: torch.utils.benchmark medians, and side-by-side interleaved repeats.

Every speed figure lrdaccel reports or acts on comes from here: a layer timed at a candidate
rank, a whole model against its original, the bench's table.

`median_seconds` is torch.utils.benchmark's `Timer.blocked_autorange`: one untimed call to size
the block (which also re-warms caches after the previous workload ran), then blocks of calls
until `min_run_time`; the median block gives the time per call. It synchronises CUDA around
each measurement, and uses all of torch's threads (the Timer's own default is one).

`measure_interleaved` times every workload in turn within each repeat (A B C A B C ...; with
`alternate`, A B C C B A ...), so drift in the machine's speed (other processes, clocks,
caches) hits all workloads of a repeat alike; ratios are taken within each repeat and reported
as min/median/max over the repeats. A workload may have several phases (sequential freezing
trains a different factor set in each); its time in a repeat is the mean over its phases, which
is what a run of equal-length phases costs per step.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.utils.benchmark import Timer
from tqdm.auto import tqdm

from lrdaccel._settings import check_int

OBJECTIVES = ("infer", "train")


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for the work queued on `device` (CUDA runs asynchronously: a wall-clock time read
    without waiting measures the launches, not the work). A no-op on the CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step: Callable[[], object], min_run_time: float, warmup: int = 0) -> float:
    """Median seconds per call of `step()` after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    timer = Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


@dataclass
class Phase:
    """One timed step: `prepare()` runs untimed before the phase is measured (e.g. set_epoch)."""

    step: Callable[[], object]
    prepare: Callable[[], object] | None = None
    label: str = ""


@dataclass
class Workload:
    """Something to time: one phase, or several whose mean time is the workload's time."""

    name: str
    phases: Sequence[Phase]

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError(f"workload {self.name!r} has no phases")


@dataclass
class Timings:
    """Seconds per step: `seconds[name][r]` is the phase mean of repeat r, `per_phase[name][r][p]`."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    per_phase: dict[str, list[list[float]]] = field(default_factory=dict)


def spread(values: Sequence[float]) -> dict:
    """{"min", "median", "max", "values"} of a list of numbers."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("spread() needs at least one value")
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "values": values}


def ratio_to_baseline(timings: Timings, name: str, baseline: str) -> dict:
    """Throughput of `name` over throughput of `baseline`, per repeat (baseline time / time)."""
    pairs = zip(timings.seconds[baseline], timings.seconds[name])
    return spread([base / own for base, own in pairs])


def measure_interleaved(
    workloads: Sequence[Workload],
    repeats: int = 5,
    warmup: int = 1,
    min_run_time: float = 0.2,
    progress: bool = False,
    alternate: bool = False,
) -> Timings:
    """Time every workload `repeats` times, interleaved, after `warmup` untimed calls per phase.

    Args:
        workloads: what to time; names must be unique.
        repeats: measurements per phase (>= 1); ratios get one value per repeat.
        warmup: untimed calls per phase before the first repeat (first-call allocations,
            oneDNN/cuDNN algorithm selection).
        min_run_time: seconds of timed calls per measurement (at least one call), so that
            fast steps are not dominated by timer overhead.
        progress: show a tqdm bar over measurements.
        alternate: reverse the order every other repeat (A B C, C B A, ...), so that what runs
            first in a repeat (after another program, or a cold cache) is not always the same.

    Returns:
        Timings, seconds per step.

    Raises:
        ValueError: repeats < 1, warmup < 0, or duplicate names.
    """
    check_int("repeats", repeats, 1)
    check_int("warmup", warmup, 0)
    names = [w.name for w in workloads]
    if len(set(names)) != len(names):
        raise ValueError(f"workload names must be unique, got {names}")

    for workload in workloads:
        for phase in workload.phases:
            if phase.prepare is not None:
                phase.prepare()
            for _ in range(warmup):
                phase.step()

    timings = Timings()
    total = repeats * sum(len(w.phases) for w in workloads)
    with tqdm(total=total, desc="timing", unit="step", disable=not progress, leave=False) as bar:
        for repeat in range(repeats):
            order = list(workloads)
            if alternate and repeat % 2:
                order.reverse()
            for workload in order:
                phase_seconds = []
                for phase in workload.phases:
                    if phase.prepare is not None:
                        phase.prepare()
                    phase_seconds.append(median_seconds(phase.step, min_run_time))
                    bar.update(1)
                timings.per_phase.setdefault(workload.name, []).append(phase_seconds)
                timings.seconds.setdefault(workload.name, []).append(statistics.fmean(phase_seconds))
    timings.seconds = {w.name: timings.seconds[w.name] for w in workloads}
    timings.per_phase = {w.name: timings.per_phase[w.name] for w in workloads}
    return timings
