"""Measuring, in one place: the timing core (interleaved repeats, min/median/max), the runtimes a
step runs in (eager, torch.compile, ONNX Runtime), parameter and MAC counts, operator profiles,
and the machine the numbers come from."""

from lrdaccel.measure.counting import count_macs, count_params, macs_by_module
from lrdaccel.measure.runtimes import RUNTIMES
from lrdaccel.measure.timer import (
    OBJECTIVES,
    Phase,
    Timings,
    Workload,
    measure_interleaved,
    median_seconds,
    ratio_to_baseline,
    spread,
)

__all__ = [
    "OBJECTIVES",
    "RUNTIMES",
    "Phase",
    "Timings",
    "Workload",
    "count_macs",
    "count_params",
    "macs_by_module",
    "measure_interleaved",
    "median_seconds",
    "ratio_to_baseline",
    "spread",
]
