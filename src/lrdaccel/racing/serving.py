"""How a race serves its trained variants, and how fast each serves against the original.

Under `serve="eager"` a variant is served as it was trained (LoRA merged), on the race's
device, and timed there. Under `serve="int8"` every served model, the original's included, is
the `lrd.quantize(model, "int8")` copy on the CPU: Linear layers dynamic int8, convs static int8
calibrated on the race's first SERVE_CALIBRATION_BATCHES calibration batches (the training
batches builders read; static convs need activation ranges). Each variant is then timed against
the original quantized the same way, so a speed-up says what compression adds on top of int8,
which a CPU server does first; and its accuracy after quantization is scored on the evaluation
set beside the float model's (the time-to-target curve stays the float model's: training is float).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lrdaccel.deploy.quantize import quantizable_convs, quantizable_linears, quantize
from lrdaccel.measure.steps import Placement, inference_phase
from lrdaccel.measure.timer import Workload, measure_interleaved, ratio_to_baseline

SERVE_CALIBRATION_BATCHES = 4  # 4 x 128 images for the Fashion-MNIST CNN: the 512 the int8 benchmark calibrated on


def check_servable(model: nn.Module, serve: str) -> None:
    """Refuse, before any variant is built, a start model `serve` cannot serve.

    Raises:
        ValueError: under "int8", a model with no Linear, HF Conv1D or Conv2d to quantize.
    """
    if serve == "int8" and not quantizable_linears(model) and not quantizable_convs(model):
        raise ValueError(f"race: serve='int8' quantizes Linear, Conv1D and Conv2d layers, and "
                         f"{type(model).__name__} has none: race with serve='eager'")


def served_models(models: dict[str, nn.Module], serve: str, calibration: list[Any]) -> dict[str, nn.Module]:
    """What each variant serves, by name: `models` themselves (eager), or their int8 copies
    (the float models are not changed)."""
    if serve == "eager":
        return models
    batches = calibration[:SERVE_CALIBRATION_BATCHES]
    return {name: quantize(model, "int8", calibration=batches if quantizable_convs(model) else None)
            for name, model in models.items()}


def serving_placement(placement: Placement, serve: str) -> Placement:
    """Where the served models run: the race's placement (eager), or the CPU without autocast
    (int8 kernels run there, in float32 around them)."""
    return placement if serve == "eager" else Placement("cpu")


def serving_baseline(serve: str, calibration_batches: int) -> str:
    """What every inference speed-up is measured against, in words (results.json, report.md)."""
    if serve == "eager":
        return "the original, as trained (eager PyTorch)"
    batches = min(calibration_batches, SERVE_CALIBRATION_BATCHES)
    return (f"the original quantized the same way: lrd.quantize(model, 'int8') on the CPU (Linear dynamic "
            f"int8; convs static int8 calibrated on the race's first {batches} calibration batch(es))")


def inference_speedups(models: dict[str, nn.Module], inputs: Any, placement: Placement, baseline: str,
                       repeats: int) -> dict[str, dict]:
    """Each served model's inference throughput over `baseline`'s, timed interleaved on `inputs`
    (one evaluation batch)."""
    inputs = placement.place_inputs(inputs)
    workloads = [Workload(name, [inference_phase(model, inputs, placement)]) for name, model in models.items()]
    timings = measure_interleaved(workloads, repeats=repeats, warmup=1, min_run_time=0.2, alternate=True)
    return {name: ratio_to_baseline(timings, name, baseline) for name in models}
