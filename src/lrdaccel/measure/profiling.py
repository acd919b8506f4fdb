"""Where a step's time goes: the operators that take the most time, from torch.profiler.

The bench records this for the original and for "LRD + both" so that a missed target can be
explained by kernel (e.g. convolution vs. the extra 1x1 convs, batch norm, copies) without
rerunning anything.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from lrdaccel.measure.timer import Phase


def top_operators(phases: Sequence[Phase], device: str = "cpu", limit: int = 12) -> list[dict]:
    """Self time per operator, in ms per step, averaged over the phases (one step each, after
    its prepare, following one discarded profiled step), the `limit` largest first.

    Args:
        phases: steps to profile; each runs once, untimed by anything but the profiler.
        device: on CUDA the device (kernel) time is reported, else CPU time.
        limit: how many operators to keep.

    Returns:
        [{"op": name, "ms": self time per step, "calls": calls per step}], largest first.
    """
    on_gpu = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    total_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    if phases:  # the profiler's first use pays its own start-up inside the ops it records: warm it
        with profile(activities=activities):
            phases[0].step()
    for phase in phases:
        if phase.prepare is not None:
            phase.prepare()
        with profile(activities=activities) as profiler:
            phase.step()
            if on_gpu:
                torch.cuda.synchronize()
        for event in profiler.key_averages():
            total_us[event.key] += event.self_device_time_total if on_gpu else event.self_cpu_time_total
            calls[event.key] += event.count
    n = max(len(phases), 1)
    ranked = sorted(total_us, key=total_us.get, reverse=True)[:limit]
    return [{"op": op, "ms": total_us[op] / n / 1e3, "calls": calls[op] / n} for op in ranked if total_us[op] > 0]
