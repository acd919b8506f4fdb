"""Inference time of a pruned copy against its original, for a time budget.

Both run interleaved in every repeat (lrdaccel's timing core, `measure_interleaved`), so drift
in the machine's speed hits them alike; the fraction is the median over repeats of
pruned time / original time. Models run in eval mode under inference_mode and get their modes
back afterwards: the user's model is timed, not changed.
"""

from __future__ import annotations

import statistics
from typing import Any

from torch import nn

from lrdaccel._modules import kept_modes
from lrdaccel.measure.steps import inference_phase
from lrdaccel.measure.timer import Workload, measure_interleaved, median_seconds
from lrdaccel.peers.prune_config import PruneConfig


def time_fraction(original: nn.Module, pruned: nn.Module, inputs: Any, config: PruneConfig) -> float:
    """Median over interleaved repeats of the pruned copy's time / the original's time."""
    with kept_modes(original), kept_modes(pruned):
        workloads = [Workload("original", [inference_phase(original, inputs)]),
                     Workload("pruned", [inference_phase(pruned, inputs)])]
        timings = measure_interleaved(workloads, repeats=config.latency_repeats, warmup=1,
                                      min_run_time=config.min_run_time, alternate=True)
    pairs = zip(timings.seconds["original"], timings.seconds["pruned"])
    return statistics.median(own / base for base, own in pairs)


def seconds_per_call(model: nn.Module, inputs: Any, config: PruneConfig) -> float:
    """The original's seconds per inference call (to turn an absolute time target into a fraction)."""
    with kept_modes(model):
        phase = inference_phase(model, inputs)
        phase.prepare()
        return median_seconds(phase.step, config.min_run_time, warmup=1)
