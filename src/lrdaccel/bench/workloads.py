"""The steps a benchmark times: one inference forward, one training step, one step per freezing phase.

Speed does not depend on the weights' values or on which loss is used, so training steps use
random inputs, a sum-of-squares loss that touches every output, and SGD with momentum at a tiny
learning rate (all the optimizer's arithmetic, weights that never blow up to Inf/NaN, which
would change the speed).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.bench.timing import Phase
from lrdaccel.surgery import call_model

FREEZING_SCHEDULES = ("rotate", "freeze_one", "static")


@dataclass(frozen=True)
class Runtime:
    """Where and how models run: device, bf16 autocast, channels_last for conv models.

    Attributes:
        device: a torch device string ("cpu", "cuda", "cuda:1").
        autocast_bf16: run forward passes under torch.autocast(dtype=bfloat16).
        channels_last: convert conv models and 4-d inputs to channels_last memory format.
    """

    device: str = "cpu"
    autocast_bf16: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device: not a torch device: {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {self.device!r} requested but CUDA is not available here")

    @classmethod
    def default_for(cls, device: str, autocast_bf16: bool | None = None,
                    channels_last: bool | None = None) -> "Runtime":
        """bf16 autocast and channels_last default on for CUDA, off elsewhere."""
        on_gpu = torch.device(device).type == "cuda"
        return cls(device,
                   on_gpu if autocast_bf16 is None else autocast_bf16,
                   on_gpu if channels_last is None else channels_last)

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16)

    def place_model(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        if self.channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules()):
            model.to(memory_format=torch.channels_last)
        return model

    def place_inputs(self, inputs: Any) -> Any:
        if isinstance(inputs, dict):
            return {k: self.place_inputs(v) for k, v in inputs.items()}
        if isinstance(inputs, (tuple, list)):
            return type(inputs)(self.place_inputs(v) for v in inputs)
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.to(self.device)
            if self.channels_last and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs


def output_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model's output: itself, `.logits`, `.last_hidden_state`, or the first item."""
    if isinstance(output, torch.Tensor):
        return output
    for attr in ("logits", "last_hidden_state"):
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(f"cannot find the output tensor in a {type(output).__name__}")


def inference_phase(model: nn.Module, inputs: Any, runtime: Runtime) -> Phase:
    """One forward under inference_mode, the model in eval mode."""

    def step() -> None:
        with torch.inference_mode(), runtime.autocast():
            call_model(model, inputs)

    return Phase(step=step, prepare=model.eval, label="inference")


def make_train_step(model: nn.Module, inputs: Any, runtime: Runtime, lr: float = 1e-6) -> Callable[[], None]:
    """One optimizer step (zero_grad, forward, backward, SGD with momentum) on `inputs`.

    The optimizer holds every parameter; frozen ones get no gradient (grads are set to None)
    and SGD skips them, so a frozen factor costs neither backward weight-gradient nor update.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with runtime.autocast():
            loss = output_tensor(call_model(model, inputs)).float().square().mean()
        loss.backward()
        optimizer.step()

    return step


def training_phases(model: nn.Module, inputs: Any, runtime: Runtime, schedule: str | None = None) -> list[Phase]:
    """Training steps of `model`: one phase, or one per phase of a SequentialFreezer schedule."""
    step = make_train_step(model, inputs, runtime)
    if schedule is None:
        return [Phase(step=step, prepare=model.train, label="all trainable")]
    freezer = make_freezer(model, schedule)

    def enter(phase: int) -> Callable[[], None]:
        def prepare() -> None:
            model.train()
            freezer.set_epoch(phase)
        return prepare

    # One full cycle of the schedule (rotate over SVD and Tucker-2 layers: 6 phases), so every
    # factor of every layer is counted in proportion to the time it trains.
    return [Phase(step=step, prepare=enter(p), label=f"{schedule} phase {p}") for p in range(freezer.cycle)]


def make_freezer(model: nn.Module, schedule: str):
    """A SequentialFreezer that changes phase every epoch (the bench calls set_epoch per phase)."""
    if schedule not in FREEZING_SCHEDULES:
        raise ValueError(f"freezing schedule must be one of {FREEZING_SCHEDULES}, got {schedule!r}")
    return lrd.SequentialFreezer(model, schedule=schedule, every_epochs=1)
