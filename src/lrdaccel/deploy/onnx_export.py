"""`export_onnx`: write a (decomposed, optionally BatchNorm-folded) model as one ONNX file, and
prove the file computes what the model does by running it in ONNX Runtime.

The exporter is torch.onnx's dynamo exporter (the default and the maintained one); it writes
the main output tensor (`logits`, `last_hidden_state`, or the tensor) as the graph's output
"output", weights inside the file (models under 2 GB). The file is checked before it takes its
name: ONNX Runtime runs it on the example inputs and, with a dynamic batch, on a batch of
another size, and the largest absolute difference from PyTorch must stay within the tolerance;
otherwise nothing is written and a ValueError says by how much it missed.

The user's model is never changed or moved: what is exported is a CPU copy (folded there with
`fuse=True`), made only where the model is not already an unfolded CPU model, without a second
copy on the model's own device; PyTorch's reference outputs come from the CPU model before any
folding, so the check covers folding and export together, and a GPU's arithmetic (TF32 convs)
does not count against the file.
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
from lrdaccel._modules import (call_model, check_real_weights, describe_inputs, model_dtype, move_inputs, output_tensor,
                               unwrap)
from lrdaccel._settings import check_number, resolve
from lrdaccel.deploy.fuse import FuseReport, fuse_batchnorm
from lrdaccel.deploy.onnx_session import export_program, feeds, flat_inputs, make_session, onnxruntime, run_session

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
        dtype: the model's floating dtype ("float32", ...).
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
    dtype: str = "float32"

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
        ValueError: the model in training mode or on the meta device, a bad tolerance or path,
            an input that is not a tensor, the exporter failing, ONNX Runtime unable to load or
            run the graph (a dtype it has no kernels for: float64, bfloat16), or the check
            missing the tolerance (no file written); MissingDependency (a ValueError and an
            ImportError) where onnx, onnxruntime or onnxscript is missing
            (`pip install lrdaccel[onnx]`), before any work.

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
    check_real_weights(model, "export_onnx")
    onnxruntime()  # every package the export and the check need, before any work
    inputs = move_inputs(example_inputs, "cpu")
    exported = cpu_copy(model) if config.fuse or _off_cpu(model) else model
    report = ExportReport(path, 0, [], describe_inputs(example_inputs), config.dynamic_batch,
                          tolerance=config.tolerance, dtype=str(model_dtype(model)).removeprefix("torch."))
    references = _references(exported, inputs, report)  # before folding: the check covers both
    if config.fuse:
        report.fused = fuse_batchnorm(exported, inputs)
    program = export_program(exported, inputs, dynamic_batch=config.dynamic_batch)
    proto = program.model_proto
    report.opset, report.inputs = _opset(proto), [i.name for i in proto.graph.input]

    def write_and_check(temporary: str) -> None:
        program.save(temporary, external_data=False)
        try:
            _check(temporary, references, report)
        except ValueError as error:  # name the file the user asked for, not the temporary one
            raise ValueError(str(error).replace(temporary, str(path))) from error

    atomic_write(path, write_and_check)
    report.export_seconds = time.perf_counter() - began
    return report


def _off_cpu(model: nn.Module) -> bool:
    return any(t.device.type != "cpu" for t in (*model.parameters(), *model.buffers()))


def cpu_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with every parameter and buffer on the CPU; the model is not moved,
    and its tensors are copied straight to the CPU (no second copy on its own device)."""
    memo: dict[int, Any] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        cpu = tensor.detach().to("cpu", copy=True)
        memo[id(tensor)] = nn.Parameter(cpu, requires_grad=tensor.requires_grad) if isinstance(
            tensor, nn.Parameter) else cpu
    return copy.deepcopy(model, memo).to("cpu")


@torch.no_grad()
def _references(model: nn.Module, inputs: Any, report: ExportReport) -> dict[int, np.ndarray]:
    """PyTorch's output at the example batch and, for a dynamic batch, at one more size."""
    tensors, _, _ = flat_inputs(inputs)
    batch = tensors[0].shape[0] if tensors and tensors[0].dim() else 1
    sizes = [batch, batch + 1] if report.dynamic_batch else [batch]
    references = {}
    for size in sizes:
        rows = inputs if size == batch else _rows(inputs, size)
        references[size] = (rows, output_tensor(call_model(model, rows)).detach().float().cpu().numpy())
    return references


def _opset(proto) -> int:
    return next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))


def _check(file: str, references: dict, report: ExportReport) -> None:
    """Run the file in ONNX Runtime on each reference batch and compare with PyTorch's output;
    raise if the difference exceeds the tolerance."""
    try:
        session = make_session(file)
        runs = {size: run_session(session, feeds(session, rows))[0] for size, (rows, _) in references.items()}
    except ValueError as error:
        raise ValueError(f"{report.path}: {error} (model dtype {report.dtype}); nothing written") from error
    for size, (_, expected) in references.items():
        got = runs[size]
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
