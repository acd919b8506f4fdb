"""What the CUDA paths need, checked on the CPU where no GPU is present.

A tensor created without a device lands on the CPU; on a GPU model it then meets CUDA tensors
and the step fails (or silently moves work to the CPU). Without a GPU that bug is invisible, so
`DeviceAudit` records every torch factory call (zeros, eye, tensor, ...) made directly from
lrdaccel's sources without a device, while the decomposition, rank-search, training and
save/load paths run here: each one is a line that would break on CUDA.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import lrdaccel as lrd
from test_planning_merging import bottleneck

SOURCES = str(Path(lrd.__file__).resolve().parent)


class DeviceAudit(TorchFunctionMode):
    """Records (function, file, line) of factory calls from lrdaccel's sources with no device."""

    def __init__(self):
        super().__init__()
        self.calls: set[tuple[str, str, int]] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None:
            caller = sys._getframe(1)
            path = str(Path(caller.f_code.co_filename).resolve())
            if path.startswith(SOURCES):
                self.calls.add((func.__name__, path[len(SOURCES) + 1:], caller.f_lineno))
        return func(*args, **kwargs)


def _audited(run) -> list[tuple[str, str, int]]:
    with DeviceAudit() as audit:
        run()
    return sorted(audit.calls)


class _Net(nn.Module):
    def __init__(self, **block):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.block = bottleneck(width=16, inner=32, **block)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = self.block(self.conv(x))
        return self.fc(h.mean((2, 3)))


def _batches(n=2):
    return [torch.randn(4, 3, 8, 8) for _ in range(n)]


@pytest.mark.parametrize("settings", [
    {},
    {"method": "whiten"},
    {"method": "whiten", "sequential": True},
])
def test_decompose_creates_every_tensor_on_the_models_device(settings):
    model = _Net().eval()
    calibration = _batches() if settings else None
    assert _audited(lambda: lrd.decompose(model, ratio=2.0, calibration=calibration, **settings)) == []


@pytest.mark.parametrize("block", [{}, {"act": False, "bias": True}], ids=["across-activations", "exact"])
def test_merging_creates_every_tensor_on_the_models_device(block):
    model = _Net(**block).eval()
    x = torch.randn(2, 3, 8, 8)
    plan = lrd.plan(model, ratio=2.0, merge=True, example_inputs=x, min_rank=1)
    assert plan.merged
    from lrdaccel.bench.paper_table import structural_copy
    from lrdaccel.measure.steps import Placement

    assert _audited(lambda: structural_copy(model, plan, Placement())) == []  # the bench's merged row
    assert _audited(lambda: lrd.decompose(model, plan, calibration=_batches())) == []


def test_branched_whitened_tucker_creates_every_tensor_on_the_models_device():
    from lrdaccel.factorize.branched import branched_tucker2

    weight, covariance = torch.randn(24, 16, 3, 3), torch.eye(16) + 0.1
    assert _audited(lambda: branched_tucker2(weight, 8, 12, 2, n_iter=2)) == []
    from lrdaccel.layers import BranchedTuckerConv2d

    conv = nn.Conv2d(16, 24, 3, padding=1)
    assert _audited(lambda: BranchedTuckerConv2d.from_dense(conv, (8, 12), "conv", branches=2,
                                                            input_covariance=covariance)) == []


def test_rank_search_and_training_create_every_tensor_on_the_models_device(tmp_path):
    model = _Net().eval()
    x = torch.randn(2, 3, 8, 8)

    def run():
        plan = lrd.optimize_ranks(model, lrd.plan(model, ratio=2.0), x, cache=False, timer=lambda job: 2.0 if job.rank is None else 1.0)
        lrd.decompose(model, plan)
        data = torch.utils.data.TensorDataset(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)))
        lrd.finetune(model, data, data, epochs=1, batch_size=4, progress=False, device="cpu", amp=True)
        lrd.save(model, tmp_path / "saved")
        lrd.load(tmp_path / "saved", _Net())

    assert _audited(run) == []


def test_asking_for_cuda_without_a_gpu_is_one_clear_error_before_any_work():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from lrdaccel.bench.config import BenchConfig
    from lrdaccel.measure.steps import Placement
    from lrdaccel.rankopt import compare_end_to_end

    model = _Net().eval()
    x = torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))
    calls = [
        lambda: lrd.optimize_ranks(model, lrd.plan(model, ratio=2.0), x, device="cuda", cache=False),
        lambda: compare_end_to_end(model, {"lrd": lrd.plan(model, ratio=2.0)}, x, device="cuda"),
        lambda: lrd.finetune(model, data, data, device="cuda", progress=False),
        lambda: Placement("cuda"),
        lambda: BenchConfig(models=["fmnist-cnn"], device="cuda"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"device 'cuda' requested but CUDA is not available here") as error:
            call()
        assert "\n" not in str(error.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
