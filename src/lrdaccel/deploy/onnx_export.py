"""`export_onnx`: write a (decomposed, optionally BatchNorm-folded) model as one ONNX file, and
prove the file computes what the model does by running it in ONNX Runtime.

The exporter is torch.onnx's dynamo exporter (the default and the maintained one); it writes
the main output tensor (`logits`, `last_hidden_state`, or the tensor) as the graph's output
"output", weights inside the file (models under 2 GB). The file is checked before it takes its
name: ONNX Runtime runs it on the example inputs and, with a dynamic batch, on a batch of
another size, and the largest absolute difference from PyTorch must stay within the tolerance;
otherwise nothing is written and a ValueError says by how much it missed.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lrdaccel._files import atomic_write, check_output_path
from lrdaccel._modules import call_model, describe_inputs, output_tensor, unwrap
from lrdaccel._settings import check_number, resolve
from lrdaccel.deploy.fuse import FuseReport, fuse_batchnorm
from lrdaccel.deploy.onnx_session import export_program, feeds, flat_inputs, make_session

EXPORT_FORMATS = ("onnx",)


@dataclass(frozen=True)
class ExportConfig:
    """How `export_onnx` writes and checks the file.

    Attributes:
        fuse: fold each BatchNorm into the conv before it first (on a copy; `fuse_batchnorm`).
        dynamic_batch: let dimension 0 of every input take any size (checked on a second size).
        tolerance: largest allowed |ONNX Runtime - PyTorch| over the output, relative to
            max(1, the largest |output|); > 0.
    """

    fuse: bool = False
    dynamic_batch: bool = True
    tolerance: float = 1e-4

    def __post_init__(self) -> None:
        check_number("tolerance", self.tolerance, above=0)


@dataclass
class ExportReport:
    """What `export_onnx` wrote and how closely ONNX Runtime reproduces PyTorch.

    Attributes:
        path: the ONNX file.
        opset: the ONNX opset of the graph.
        inputs: the graph's input names.
        example: a description of the example inputs.
        dynamic_batch: whether dimension 0 of every input is symbolic.
        max_abs_diff: batch size -> largest |ONNX Runtime - PyTorch| over the output.
        max_abs_output: the largest |output| PyTorch gave (the scale of the differences).
        tolerance: the allowed difference, relative to max(1, max_abs_output).
        fused: what BatchNorm folding did, or None when not asked.
        export_seconds: time to export and check.
    """

    path: Path
    opset: int
    inputs: list[str]
    example: str
    dynamic_batch: bool
    max_abs_diff: dict[int, float] = field(default_factory=dict)
    max_abs_output: float = 0.0
    tolerance: float = ExportConfig.tolerance
    fused: FuseReport | None = None
    export_seconds: float = 0.0

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff.values())

    def __str__(self) -> str:
        batches = ", ".join(f"batch {b}: {d:.2e}" for b, d in self.max_abs_diff.items())
        lines = [f"exported {self.path} (ONNX opset {self.opset}, inputs {self.inputs}, "
                 f"{'dynamic' if self.dynamic_batch else 'fixed'} batch) in {self.export_seconds:.1f} s",
                 f"checked with ONNX Runtime against PyTorch on {self.example}: max abs difference {batches} "
                 f"(outputs up to {self.max_abs_output:.3g}; tolerance {self.tolerance:g} x max(1, that))"]
        if self.fused is not None:
            lines.append(str(self.fused))
        return "\n".join(lines)


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                config: ExportConfig | None = None, **overrides: Any) -> ExportReport:
    """Export `model` for inference to the ONNX file `path`, checked with ONNX Runtime.

    The model itself is not changed: folding (`fuse=True`) happens on a copy, and the file is
    compared with the model as given, so the check covers folding and export together.

    Args:
        model: a PyTorch model in eval mode (decomposed or not; wrappers are looked through).
        example_inputs: a tensor, tuple or dict of tensors, as the model is called.
        path: the .onnx file to write (replaced atomically, only once the check passed).
        config: an ExportConfig; keyword `overrides` (fuse, dynamic_batch, tolerance) override it.

    Returns:
        An ExportReport (print it for the summary).

    Raises:
        ValueError: the model in training mode, a bad tolerance or path, an input that is not a
            tensor, the exporter failing, or the check missing the tolerance (no file written);
            ONNX Runtime not installed (`pip install lrdaccel[onnx]`).

    Example:
        >>> import torch, lrdaccel as lrd
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
        >>> report = lrd.export_onnx(net, torch.randn(2, 3, 16, 16), "/tmp/net.onnx", fuse=True)  # doctest: +SKIP
    """
    began = time.perf_counter()
    config = resolve(ExportConfig, config, overrides, "export_onnx")
    path = Path(path)
    check_output_path(path)
    model = unwrap(model)
    if model.training:
        raise ValueError("export_onnx exports the inference graph: call model.eval() first")
    flat_inputs(example_inputs)  # every input is a tensor, before any work
    exported, fused = model, None
    if config.fuse:
        exported = copy.deepcopy(model)
        fused = fuse_batchnorm(exported)
    program = export_program(exported, example_inputs, dynamic_batch=config.dynamic_batch)
    proto = program.model_proto
    report = ExportReport(path, _opset(proto), [i.name for i in proto.graph.input], describe_inputs(example_inputs),
                          config.dynamic_batch, tolerance=config.tolerance, fused=fused)

    def write_and_check(temporary: str) -> None:
        program.save(temporary, external_data=False)
        _check(model, example_inputs, temporary, report)

    atomic_write(path, write_and_check)
    report.export_seconds = time.perf_counter() - began
    return report


def _opset(proto) -> int:
    return next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))


@torch.no_grad()
def _check(model: nn.Module, example_inputs: Any, file: str, report: ExportReport) -> None:
    """Run the file in ONNX Runtime and compare with the model, at the example batch and (for a
    dynamic batch) at one more; raise if the difference exceeds the tolerance."""
    session = make_session(file)
    tensors, _, _ = flat_inputs(example_inputs)
    batch = tensors[0].shape[0] if tensors and tensors[0].dim() else 1
    sizes = [batch, batch + 1] if report.dynamic_batch else [batch]
    for size in sizes:
        inputs = example_inputs if size == batch else _rows(example_inputs, size)
        expected = output_tensor(call_model(model, inputs)).detach().float().cpu().numpy()
        got = session.run(None, feeds(session, inputs))[0]
        if got.shape != expected.shape:
            raise ValueError(f"{report.path}: ONNX Runtime gave an output of shape {got.shape}, PyTorch "
                             f"{expected.shape} (batch {size}); nothing written")
        report.max_abs_diff[size] = float(np.abs(got - expected).max()) if expected.size else 0.0
        report.max_abs_output = max(report.max_abs_output, float(np.abs(expected).max()) if expected.size else 0.0)
    allowed = report.tolerance * max(1.0, report.max_abs_output)
    if not report.worst <= allowed:
        raise ValueError(f"{report.path}: ONNX Runtime differs from PyTorch by up to {report.worst:.3g} "
                         f"(allowed {allowed:.3g}: tolerance {report.tolerance:g} x max(1, {report.max_abs_output:.3g})); "
                         f"nothing written")


def _rows(inputs: Any, size: int) -> Any:
    """`inputs` with `size` rows in dimension 0, taken cyclically from the example's rows."""
    if isinstance(inputs, torch.Tensor):
        index = torch.arange(size, device=inputs.device) % inputs.shape[0]
        return inputs[index]
    if isinstance(inputs, Mapping):
        return {key: _rows(value, size) for key, value in inputs.items()}
    return type(inputs)(_rows(value, size) for value in inputs)
