"""CPU threads for runs on a machine that other work may share.

When a process's OpenMP threads do not all get a core, every operator ends in a barrier where
the threads that ran wait for the one that did not: on a shared 2-core machine we measured the
demo's CNN training at 84 images/s with 2 threads against 995 with 1. So "auto" uses torch's
default on an idle machine and one thread on a busy one.
"""

from __future__ import annotations

import os

import torch

BUSY_LOAD = 0.5  # 1-minute load average (runnable processes) above which the machine counts as busy


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS does not report one."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def parse_threads(text: str) -> int | str:
    """--threads: a positive int, or "auto".

    Raises:
        ValueError: anything else.
    """
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"--threads must be a positive integer or 'auto', got {text!r}")
    return value


def set_threads(threads: int | str | None) -> str | None:
    """Apply --threads; returns a line to tell the user when "auto" chose one thread, else None."""
    if threads is None:
        return None
    if threads != "auto":
        torch.set_num_threads(threads)
        return None
    load = load_average()
    if load is None or load < BUSY_LOAD or torch.get_num_threads() == 1:
        return None
    torch.set_num_threads(1)
    return (f"other work is using the CPU (load average {load:.2f}): running on 1 thread, which is much "
            f"faster than several threads waiting on each other; use --threads N to choose")


def busy_warning() -> str | None:
    """A warning for timing runs on a busy machine, or None."""
    load = load_average()
    if load is None or load < BUSY_LOAD:
        return None
    return (f"warning: load average {load:.2f} before timing: other work on this machine will skew the "
            f"measurements (ratios are interleaved, but noisier); it is recorded in the results")
