"""Side-by-side timing: every workload is timed in turn within each repeat (A B C A B C ...).

Drift in the machine's speed (other processes, clocks, caches) then hits all workloads of a
repeat alike, so the ratio to the baseline is taken within each repeat and reported as
min/median/max over the repeats. Timing itself is torch.utils.benchmark's Timer, which
synchronises CUDA around each measurement.

Each measurement is Timer.blocked_autorange: one untimed call to size the block (which also
re-warms caches after the previous workload ran), then blocks of calls until `min_run_time`;
the median block gives the time per call.

A workload may have several phases (sequential freezing trains a different factor set in each);
its time in a repeat is the mean over its phases, which is what a run of equal-length phases
costs per step.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.utils.benchmark import Timer
from tqdm.auto import tqdm


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


def _timer(step: Callable[[], object]) -> Timer:
    # Timer defaults to one thread; measure with the threads the user's run would have.
    return Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())


def measure_interleaved(
    workloads: Sequence[Workload],
    repeats: int = 5,
    warmup: int = 1,
    min_run_time: float = 0.2,
    progress: bool = False,
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

    Returns:
        Timings, seconds per step.

    Raises:
        ValueError: repeats < 1, warmup < 0, or duplicate names.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
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
        for _ in range(repeats):
            for workload in workloads:
                phase_seconds = []
                for phase in workload.phases:
                    if phase.prepare is not None:
                        phase.prepare()
                    phase_seconds.append(_timer(phase.step).blocked_autorange(min_run_time=min_run_time).median)
                    bar.update(1)
                timings.per_phase.setdefault(workload.name, []).append(phase_seconds)
                timings.seconds.setdefault(workload.name, []).append(statistics.fmean(phase_seconds))
    return timings
