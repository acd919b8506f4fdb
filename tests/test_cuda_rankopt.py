"""Rank search on the device the model will run on, in the dtype and memory format it runs in
(bf16 autocast, channels_last), returning a valid plan; under compile with CUDA graphs too.

Each test runs on the CPU and, marked `cuda`, on a GPU where there is one. Nothing here asserts a
time: only what was timed (device, dtype, layout) and that the plan it gives is valid.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.planning.validation import validate_plan
from lrdaccel.rankopt.layer_timing import BenchmarkTimer
from test_cuda_decompose import DEVICES, placed


class RecordingTimer(BenchmarkTimer):
    """The real timer, remembering what each job was timed as."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.jobs = []

    def __call__(self, job):
        self.jobs.append(job)
        return super().__call__(job)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_rank_search_on_the_device_in_autocast_dtype_and_channels_last(device):
    model, x = placed("resnet", device)  # channels_last
    plan = lrd.plan(model, ratio=2.0)
    timer = RecordingTimer(min_run_time=0.01)
    with torch.autocast(device, dtype=torch.bfloat16):
        optimized = lrd.optimize_ranks(model, plan, x, objective="train", timer=timer, cache=False, budget_s=0.3)
    validate_plan(model, optimized)
    meta = optimized.meta["rank_optimization"]
    assert meta["dtype"] == "bfloat16" and meta["device"].startswith(f"{device}:") and meta["timed"] > 0
    assert timer.jobs and all(job.device.type == device and job.dtype == torch.bfloat16 for job in timer.jobs)
    # (a 1x1 feature map is both layouts at once: nothing to check there)
    convs = [job for job in timer.jobs if len(job.input.shape) == 4 and job.input.shape[2:] != (1, 1)]
    assert convs and all(job.channels_last for job in convs)
    for row, base in zip(optimized, plan):
        assert row.name == base.name
        if row.kind in ("svd", "tucker2"):
            # the search spends the ratio rank's parameters (max_growth 0): a Tucker-2 pair may
            # trade one side for the other, so the bound is on parameters, not on each rank
            ranks = [row.rank] if row.kind == "svd" else list(row.rank)
            assert all(r > 0 for r in ranks) and row.params_after <= base.params_after
            assert row.time_ms is not None and row.time_ms > 0
    lrd.decompose(model, optimized)  # the plan fits the model it was searched on
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        assert torch.isfinite(model(pixel_values=x).logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.cuda)])
def test_rank_search_under_compile_with_cuda_graphs(device):
    """Each candidate compiled as users compile on a GPU (CUDA graphs), the mode in the plan."""
    model = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 1)).eval().to(device)
    x = torch.randn(8, 64, 28, 28, device=device)  # two layers: a handful of compiles
    plan = lrd.plan(model, ratio=2.0)
    timer = RecordingTimer(min_run_time=0.01)
    optimized = lrd.optimize_ranks(model, plan, x, runtime="compile", compile_mode="reduce-overhead", timer=timer,
                                   cache=False, budget_s=2.0)
    validate_plan(model, optimized)
    assert optimized.meta["rank_optimization"]["compile_mode"] == "reduce-overhead"
    assert all(job.compile_mode == "reduce-overhead" and job.runtime == "compile" for job in timer.jobs)


def test_device_without_a_gpu_fails_before_any_timing():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    model, x = placed("resnet", "cpu")

    def timer(job):
        raise AssertionError("timed although the device does not exist")

    with pytest.raises(ValueError, match="CUDA is not available"):
        lrd.optimize_ranks(model, lrd.plan(model, ratio=2.0), x, device="cuda", timer=timer, cache=False)
