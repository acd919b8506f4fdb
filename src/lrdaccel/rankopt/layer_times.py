"""Times of one layer at any rank: read from the cache, else measured by the timer and stored.

The cache key is everything the time depends on: device, torch version, dtype, runtime (with
torch.compile's mode where not the default), objective, layer kind and geometry, input shape and memory format, the rank and its execution
form. (Keys before the runtime was part of them are not read: those times were eager ones.)
"""

from __future__ import annotations

import copy
import math
import time

import torch
from torch import nn

from lrdaccel.factorize.ranks import Rank
from lrdaccel.measure.machine import device_name
from lrdaccel.measure.runtimes import runtime_label
from lrdaccel.rankopt.cache import CachedTime, TimingCache
from lrdaccel.rankopt.capture import InputSpec
from lrdaccel.rankopt.layer_timing import Timer, TimingJob, input_signature, layer_signature


class LayerTimes:
    """Measured times of `dense` (original or decomposed as `kind`) on input `spec`.

    The layer is copied to `device` and `dtype` once; the caller's module is not touched.
    `timed` and `hits` count new measurements and cache reads.
    """

    def __init__(self, dense: nn.Module, kind: str, spec: InputSpec, objective: str,
                 device: torch.device, dtype: torch.dtype, cache: TimingCache, timer: Timer,
                 runtime: str = "eager", compile_mode: str = "default"):
        self.local = copy.deepcopy(dense).to(device=device, dtype=dtype)
        self.kind, self.spec, self.objective, self.runtime = kind, spec, objective, runtime
        self.compile_mode = compile_mode
        self.device, self.dtype, self.cache, self.timer = device, dtype, cache, timer
        self.key = "|".join([
            device_name(device), f"torch {torch.__version__}", dtype_name(dtype), f"runtime {runtime_label(runtime, compile_mode)}",
            objective,
            kind, layer_signature(dense), input_signature(spec),
        ])
        self.timed = self.hits = 0

    def __call__(self, rank: Rank, form: str | None = None, branches: int = 1) -> CachedTime:
        """The time at `rank` (None: the original layer) in execution `form` (None: the layer's
        default) or as a branched Tucker-2 core, with what measuring it cost."""
        key = (f"{self.key}|{rank_label(rank)}" + (f" as {form}" if form is not None else "")
               + (f" in {branches} branches" if branches > 1 else ""))
        entry = self.cache.get(key)
        if entry is not None:
            self.hits += 1
            return entry
        job = TimingJob(self.local, self.kind, rank, self.spec, self.objective, self.device, self.dtype,
                        self.runtime, form, branches, self.compile_mode)
        began = time.perf_counter()
        value = self.timer(job)
        try:
            ms = float(value)
        except (TypeError, ValueError):
            ms = math.nan
        if not (math.isfinite(ms) and ms > 0):
            raise ValueError(f"the timer gave {value!r} ms for {layer_signature(self.local)} at "
                             f"{rank_label(rank)}; a time must be a finite number of milliseconds > 0")
        self.cache.put(key, ms, time.perf_counter() - began)
        self.timed += 1
        return self.cache.get(key)


def rank_label(rank: Rank) -> str:
    if rank is None:
        return "original"
    return f"rank {rank}" if isinstance(rank, int) else "rank {}x{}".format(*rank)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
