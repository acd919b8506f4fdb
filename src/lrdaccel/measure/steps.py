"""The steps that get timed: one inference forward, one training step, and where and how they
run (device, autocast, memory format, runtime).

Speed does not depend on the weights' values or on which loss is used, so training steps use a
sum-of-squares loss that touches every output and SGD with momentum at a tiny learning rate
(all the optimizer's arithmetic, weights that never blow up to Inf/NaN, which would change the
speed).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lrdaccel._modules import call_model, move_inputs, output_tensor
from lrdaccel._settings import check_choice, parse_device
from lrdaccel.measure.runtimes import RUNTIMES, check_compile_mode, inference_step, runtime_forward
from lrdaccel.measure.timer import Phase


@dataclass(frozen=True)
class Placement:
    """Where and how models run: device, bf16 autocast, channels_last for conv models, runtime.

    Attributes:
        device: a torch device string ("cpu", "cuda", "cuda:1").
        autocast_bf16: run forward passes under torch.autocast(dtype=bfloat16).
        channels_last: convert conv models and 4-d inputs to channels_last memory format.
        runtime: "eager", "compile" or "onnxruntime" (`lrdaccel.measure.runtimes`).
        compile_mode: torch.compile's mode under runtime "compile" ("default", "reduce-overhead":
            CUDA graphs, "max-autotune": autotuned kernels and CUDA graphs, ...); ignored otherwise.
    """

    device: str = "cpu"
    autocast_bf16: bool = False
    channels_last: bool = False
    runtime: str = "eager"
    compile_mode: str = "default"

    def __post_init__(self) -> None:
        parse_device(self.device)
        check_choice("runtime", self.runtime, RUNTIMES)
        check_compile_mode(self.compile_mode)

    @classmethod
    def default_for(cls, device: str, autocast_bf16: bool | None = None,
                    channels_last: bool | None = None) -> "Placement":
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
        return move_inputs(inputs, self.device, channels_last=self.channels_last)


def inference_phase(model: nn.Module, inputs: Any, placement: Placement = Placement()) -> Phase:
    """One forward in the placement's runtime (eager: under inference_mode), the model in eval
    mode. Under "onnxruntime" the model is exported here (in eval mode); under "compile" the first
    call compiles."""
    autocast = placement.autocast if placement.autocast_bf16 else None
    return Phase(step=inference_step(model, inputs, placement.runtime, autocast, placement.compile_mode),
                 prepare=model.eval, label="inference")


def make_train_step(model: nn.Module, inputs: Any, placement: Placement = Placement(),
                    lr: float = 1e-6) -> Callable[[], None]:
    """One optimizer step (zero_grad, forward, backward, SGD with momentum) on `inputs`.

    The optimizer holds every parameter; frozen ones get no gradient (grads are set to None)
    and SGD skips them, so a frozen factor costs neither backward weight-gradient nor update.
    Under "compile" the forward (and with it the backward) is compiled, the optimizer is not.

    Raises:
        ValueError: runtime "onnxruntime" (inference only).
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    forward, calls = runtime_forward(model, placement.runtime, compile_mode=placement.compile_mode)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with calls(False):
            with placement.autocast():
                loss = output_tensor(call_model(forward, inputs)).float().square().mean()
            loss.backward()
        optimizer.step()

    return step


def training_phase(model: nn.Module, inputs: Any, placement: Placement = Placement()) -> Phase:
    """One training step with every parameter as it is, the model in train mode."""
    return Phase(step=make_train_step(model, inputs, placement), prepare=model.train, label="all trainable")
