"""The machine numbers come from: its name for timing caches and reports, how busy it is, and
how many CPU threads torch uses on it.

When a process's OpenMP threads do not all get a core, every operator ends in a barrier where
the threads that ran wait for the one that did not: on a shared 2-core machine we measured the
demo's CNN training at 84 images/s with 2 threads against 995 with 1. So "auto" uses torch's
default on an idle machine and one thread on a busy one.
"""

from __future__ import annotations

import os
import platform

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


def device_name(device: torch.device | str) -> str:
    """A name for the hardware a time was measured on: GPU name, or CPU model and thread count.

    CPU times depend on how many threads torch uses, so that is part of the name.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu:{cpu_model()} x{torch.get_num_threads()} threads"
    return device.type


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: str | torch.device = "cpu") -> dict:
    """Where the numbers come from: CPU, threads, accelerator, library versions, load."""
    device = torch.device(device)
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
    }
    if device.type == "cuda":
        info.update(gpu_info(device))
    load = load_average()
    if load is not None:  # other work on the machine skews throughput: record how busy it was
        info["load_average_1m"] = round(load, 2)
    return info


def gpu_info(device: str | torch.device = "cuda") -> dict:
    """What a GPU figure depends on besides the GPU's name: CUDA and cuDNN versions, memory,
    compute capability, bf16 support, and whether cuDNN times its algorithms (benchmark mode)."""
    device = torch.device(device)
    properties = torch.cuda.get_device_properties(device)
    return {
        "gpu": properties.name,
        "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
        "compute_capability": f"{properties.major}.{properties.minor}",
        "gpu_count": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "bf16_supported": torch.cuda.is_bf16_supported(),
    }
