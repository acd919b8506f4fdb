"""Training on the device under bfloat16 autocast: frozen factors stay bitwise unchanged, no grad
scaler for bf16 (one for float16), and the fine-tuning loop runs there with AMP.

Each test runs on the CPU and, marked `cuda`, on a GPU where there is one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lrdaccel as lrd
from lrdaccel.training.config import FinetuneConfig
from lrdaccel.training.loop import Run
from lrdaccel.training.task import LabelledTask
from test_cuda_decompose import DEVICES, StemBottleneckNet


def _decomposed(device: str) -> nn.Module:
    model = StemBottleneckNet()
    lrd.decompose(model, ratio=2.0, min_rank=1)
    return model.to(device=device, memory_format=torch.channels_last).train()


@pytest.mark.parametrize("schedule", ["rotate", "static"])
@pytest.mark.parametrize("device", DEVICES)
def test_frozen_factors_stay_bitwise_unchanged_under_bf16_autocast(device, schedule):
    """AdamW with weight decay over every parameter, bf16 autocast, no scaler: what the freezer
    froze does not move at all; what it left trainable does."""
    model = _decomposed(device)
    freezer = lrd.SequentialFreezer(model, schedule=schedule, every_steps=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(8, 3, 8, 8, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), device=device)
    for step in range(6):
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        assert frozen, f"step {step} froze nothing"
        for name, value in frozen.items():
            assert torch.equal(model.get_parameter(name), value), f"frozen {name} moved at step {step}"
        assert all(not torch.equal(model.get_parameter(n), v) for n, v in trainable.items())
        freezer.step()
    freezer.restore()
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("amp_dtype, scaled", [("bfloat16", False), ("float16", True)])
@pytest.mark.parametrize("device", DEVICES)
def test_only_float16_autocast_gets_a_grad_scaler(device, amp_dtype, scaled):
    model = _decomposed(device)
    data = TensorDataset(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)))
    config = FinetuneConfig(amp=True, amp_dtype=amp_dtype, batch_size=4)
    run = Run(model, LabelledTask(data, None, None, None, config), config, device, progress=False)
    assert run.amp_dtype == getattr(torch, amp_dtype) and run.scaler.is_enabled() == scaled
    assert run.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_finetune_with_amp_and_freezing_on_the_device(device):
    model = _decomposed(device)
    data = TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,)))
    history = lrd.finetune(model, data, data, epochs=2, batch_size=8, lr=0.05, amp=True, device=device,
                           schedule="rotate", progress=False)
    assert history.completed and len(history.epochs) == 2
    for record in history.epochs:
        assert torch.isfinite(torch.tensor(record.train_loss)) and 0 <= record.test_accuracy <= 1
        assert record.train_seconds > 0 and record.trainable_share < 1
    assert all(p.device.type == device for p in model.parameters())


def test_amp_dtype_is_checked():
    with pytest.raises(ValueError, match="amp_dtype must be one of"):
        FinetuneConfig(amp_dtype="float8")
    with pytest.raises(ValueError, match="amp_dtype must be one of"):
        lrd.DistillConfig(amp_dtype="int8")


@pytest.mark.parametrize("device", DEVICES)
def test_distill_with_amp_on_the_device(device):
    """Unlabeled distillation from the original, bf16 autocast, batches moved to the device."""
    teacher = StemBottleneckNet().eval()
    model = StemBottleneckNet()
    model.load_state_dict(teacher.state_dict())
    lrd.decompose(model, ratio=2.0, min_rank=1)
    batches = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    history = lrd.distill(model, teacher, batches, eval_batches=batches[:1], device=device, amp=True, max_steps=3,
                          lr=1e-3, progress=False)
    assert history.global_step == 3 and all(p.device.type == device for p in model.parameters())
