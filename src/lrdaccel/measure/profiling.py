"""Where a step's time goes: the operators that take the most time, from torch.profiler (eager
and compiled PyTorch) or from ONNX Runtime's own profiler (which torch.profiler cannot see into).

The bench records this for the original and for "LRD + both" so that a missed target can be
explained by kernel (e.g. convolution vs. the extra 1x1 convs, batch norm, copies, layout
reorders) without rerunning anything.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
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


def onnxruntime_operators(model: nn.Module, inputs: Any, limit: int = 12) -> list[dict]:
    """Time per ONNX operator type of one run of `model` exported to ONNX Runtime (after one
    unprofiled-in-the-result warm-up run), the `limit` largest first, as `top_operators` gives.

    Raises:
        ValueError: the model cannot be exported; ONNX Runtime not installed.
    """
    from lrdaccel.deploy.onnx_session import export_program, feeds, make_session, session_options

    proto = export_program(model, inputs).model_proto.SerializeToString()
    with tempfile.TemporaryDirectory() as folder:
        options = session_options()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "ort")
        session = make_session(proto, options=options)
        feed = feeds(session, inputs)
        for _ in range(2):  # the first run allocates and prepacks; only the second is kept
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last = runs[-1]
    total_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in events:
        if (event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")
                and last["ts"] <= event["ts"] <= last["ts"] + last["dur"]):
            op = event.get("args", {}).get("op_name", "?")
            total_us[op] += event["dur"]
            calls[op] += 1
    ranked = sorted(total_us, key=total_us.get, reverse=True)[:limit]
    return [{"op": op, "ms": total_us[op] / 1e3, "calls": calls[op]} for op in ranked if total_us[op] > 0]
