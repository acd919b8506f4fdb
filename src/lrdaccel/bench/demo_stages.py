"""Where the demo's time goes: wall and CPU seconds of each stage, printed as it goes.

Wall seconds are what the run took here. CPU seconds (this process, all its threads) are what it
asked of the machine: on a machine shared with other work the wall time grows with the load
while the CPU time barely does, so the two side by side tell a slow run's cause, and the CPU
time of a one-thread run is about what the same run takes on an idle machine at one thread.
A stage may add parts (`part`): what of its wall time went where (training timed by the race
against evaluating, compiling against timed repeats), so no stage's time goes unexplained.
Stages are numbered in the order they ran ("1. load ..."), so that a results file, whose keys
are written sorted, still lists them in that order.
"""

from __future__ import annotations

import time
from typing import Callable


class Stages:
    """Runs the pipeline's steps one by one, timing each."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.parts: dict[str, list[list]] = {}
        self._keys: dict[str, str] = {}
        self._started = (time.perf_counter(), time.process_time())

    def run(self, name: str, fn: Callable):
        """Run `fn()` as the stage `name` and return what it returns."""
        key = self._keys[name] = f"{len(self._keys) + 1}. {name}"
        if self.verbose:
            print(f"==> {key}", flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        self.wall[key] = round(time.perf_counter() - wall, 2)
        self.cpu[key] = round(time.process_time() - cpu, 2)
        return result

    def seconds(self, name: str) -> float:
        """Wall seconds of the stage `name` (as given to `run`)."""
        return self.wall[self._keys[name]]

    def part(self, name: str, label: str, seconds: float) -> None:
        """Record that `seconds` of the wall time of the stage `name` went to `label`."""
        self.parts.setdefault(self._keys[name], []).append([label, round(seconds, 2)])

    def record(self) -> dict:
        """The results' fields: `stages` (wall seconds by stage, as results files always had),
        `stage_cpu_seconds`, `stage_parts` and `total_seconds` (wall and CPU of the whole run so
        far, which includes what happens between stages: saving, counting, reporting)."""
        wall, cpu = self._started
        return {"stages": dict(self.wall), "stage_cpu_seconds": dict(self.cpu), "stage_parts": dict(self.parts),
                "total_seconds": {"wall": round(time.perf_counter() - wall, 2),
                                  "cpu": round(time.process_time() - cpu, 2)}}
