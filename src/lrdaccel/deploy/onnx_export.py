"""`export_onnx`: write a (decomposed, optionally BatchNorm-folded) model as one ONNX file, and
prove the file computes what the model does by running it in ONNX Runtime.

The exporter is torch.onnx's dynamo exporter (the default and the maintained one); it writes
the main output tensor (`logits`, `last_hidden_state`, or the tensor) as the graph's output
"output", weights inside the file (models under 2 GB). Batch size and, for token inputs, sequence
length are symbolic by default. The file is checked before it takes its name: ONNX Runtime runs
it on the example inputs and, with dynamic axes, on a batch of another size (and half the
tokens), and the largest absolute difference from PyTorch must stay within the tolerance;
otherwise nothing is written and a ValueError says by how much it missed. With quantize="int8"
the file is ONNX Runtime's int8 quantization of the export (`onnx_quantize`), checked the same
way against the float model, with a tolerance for int8 and the outputs' cosine reported.
Positions an `attention_mask` input marks as padding are not compared (nothing reads them).

The user's model is never changed or moved: what is exported is a CPU copy (folded there with
`fuse=True`), made only where the model is not already an unfolded CPU model, without a second
copy on the model's own device; PyTorch's reference outputs come from the CPU model before any
folding, so the check covers folding and export together, and a GPU's arithmetic (TF32 convs)
does not count against the file.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lrdaccel._files import atomic_write, check_output_path
from lrdaccel._modules import (call_model, check_real_weights, describe_inputs, kept_modes, model_device, model_dtype,
                               move_inputs, output_tensor, unwrap)
from lrdaccel._settings import check_number, resolve
from lrdaccel.calibration.batches import token_mask
from lrdaccel.deploy.fuse import FuseReport, fuse_batchnorm
from lrdaccel.deploy.onnx_quantize import INT8_TOLERANCE, QUANTIZE_CHOICES, calibration_list, quantize_file
from lrdaccel.deploy.onnx_session import (export_program, feeds, flat_inputs, make_session, onnxruntime, run_session,
                                          token_inputs)

EXPORT_FORMATS = ("onnx",)
FLOAT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportConfig:
    """How `export_onnx` writes and checks the file.

    Attributes:
        fuse: fold each BatchNorm into the conv before it first (on a copy; `fuse_batchnorm`).
        dynamic_batch: let dimension 0 of every input take any size (checked on a second size).
        dynamic_sequence: let dimension 1 of every token input (integer ids and masks) take any
            length (checked on half the length).
        quantize: "int8": ONNX Runtime's int8 quantization of the file (dynamic for MatMul and
            Gemm; static QDQ for Conv with calibration batches).
        tolerance: largest allowed |ONNX Runtime - PyTorch| over the output, relative to
            max(1, the largest |output|); > 0 (default 1e-4, 0.25 with quantize int8).
    """

    fuse: bool = False
    dynamic_batch: bool = True
    dynamic_sequence: bool = True
    quantize: str | None = None
    tolerance: float | None = None

    def __post_init__(self) -> None:
        if self.tolerance is not None:
            check_number("tolerance", self.tolerance, above=0)
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES} or None, got {self.quantize!r}")

    @property
    def allowed(self) -> float:
        """The tolerance in force: the one given, else the default for float or int8 files."""
        if self.tolerance is not None:
            return self.tolerance
        return INT8_TOLERANCE if self.quantize else FLOAT_TOLERANCE


@dataclass
class ExportReport:
    """What `export_onnx` wrote and how closely ONNX Runtime reproduces PyTorch.

    Attributes:
        path: the ONNX file.
        opset: the ONNX opset of the graph.
        inputs: the graph's input names.
        example: a description of the example inputs.
        dynamic_batch: whether dimension 0 of every input is symbolic.
        checks: each shape the file was run at: {"batch", "tokens" (the token inputs' length, or
            None), "max_abs_diff", and for int8 files "cosine" (the lowest cosine between ONNX
            Runtime's and PyTorch's output rows: the agreement, where differences are expected)}.
        max_abs_diff: batch size -> largest |ONNX Runtime - PyTorch| over the output.
        quantize: "int8" for a quantized file, else None; int8_ops: its int8 operators.
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
    checks: list[dict] = field(default_factory=list)
    max_abs_diff: dict[int, float] = field(default_factory=dict)
    max_abs_output: float = 0.0
    tolerance: float = FLOAT_TOLERANCE
    quantize: str | None = None
    int8_ops: int = 0
    fused: FuseReport | None = None
    export_seconds: float = 0.0
    dtype: str = "float32"

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff.values())

    def __str__(self) -> str:
        batches = ", ".join(_described(check) for check in self.checks)
        quantized = f", {self.quantize} ({self.int8_ops} int8 operators)" if self.quantize else ""
        lines = [f"exported {self.path} (ONNX opset {self.opset}, inputs {self.inputs}, "
                 f"{'dynamic' if self.dynamic_batch else 'fixed'} batch{quantized}) in {self.export_seconds:.1f} s",
                 f"checked with ONNX Runtime against the float PyTorch model on {self.example}: max abs difference "
                 f"{batches} (outputs up to {self.max_abs_output:.3g}; tolerance {self.tolerance:g} x max(1, that))"]
        if self.fused is not None:
            lines.append(str(self.fused))
        return "\n".join(lines)


def _described(check: dict) -> str:
    tokens = f" x {check['tokens']} tokens" if check["tokens"] else ""
    cosine = f" (cosine {check['cosine']:.4f})" if "cosine" in check else ""
    return f"batch {check['batch']}{tokens}: {check['max_abs_diff']:.2e}{cosine}"


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, calibration: Any = None,
                config: ExportConfig | None = None, **overrides: Any) -> ExportReport:
    """Export `model` for inference to the ONNX file `path`, checked with ONNX Runtime.

    The model itself is not changed: folding (`fuse=True`) happens on a copy, and the file is
    compared with the model as given, so the check covers folding and export together.

    Args:
        model: a PyTorch model in eval mode (decomposed or not; wrappers are looked through).
        example_inputs: a tensor, tuple or dict of tensors, as the model is called.
        path: the .onnx file to write (replaced atomically, only once the check passed).
        calibration: batches (as the model is called) for static int8 convs with quantize="int8".
        config: an ExportConfig; keyword `overrides` (fuse, dynamic_batch, dynamic_sequence,
            quantize, tolerance) override it.

    Returns:
        An ExportReport (print it for the summary).

    Raises:
        ValueError: the model in training mode or on the meta device, a bad tolerance or path,
            an input that is not a tensor, the exporter failing, ONNX Runtime unable to load or
            run the graph (a dtype it has no kernels for: float64, bfloat16), the model failing at
            another batch size with a dynamic batch (it fixes its batch: dynamic_batch=False), int8
            quantizing nothing, or the check missing the tolerance (no file written);
            MissingDependency (a ValueError and an ImportError) where onnx, onnxruntime or onnxscript is missing
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
    if calibration is not None and not config.quantize:
        raise ValueError("export_onnx: calibration batches are for quantize='int8' (static int8 convs)")
    batches = calibration_list(calibration)
    check_real_weights(model, "export_onnx")
    onnxruntime()  # every package the export and the check need, before any work
    inputs = move_inputs(example_inputs, "cpu")
    exported = cpu_copy(model) if config.fuse or _off_cpu(model) else model
    report = ExportReport(path, 0, [], describe_inputs(example_inputs), config.dynamic_batch,
                          tolerance=config.allowed, dtype=str(model_dtype(model)).removeprefix("torch."),
                          quantize=config.quantize)
    dynamic_sequence = config.dynamic_sequence and bool(token_inputs(inputs))
    references = _references(exported, inputs, report, dynamic_sequence)  # before folding: the check covers both
    if config.fuse:
        report.fused = fuse_batchnorm(exported, inputs)
    program = export_program(exported, inputs, dynamic_batch=config.dynamic_batch, dynamic_sequence=dynamic_sequence)
    proto = program.model_proto
    report.opset, report.inputs = _opset(proto), [i.name for i in proto.graph.input]

    def write_and_check(temporary: str) -> None:
        if config.quantize:
            with tempfile.TemporaryDirectory() as scratch:
                float_file = str(Path(scratch) / "float.onnx")
                program.save(float_file, external_data=False)
                report.int8_ops = quantize_file(float_file, temporary, report.inputs, batches)
        else:
            program.save(temporary, external_data=False)
        try:
            _check(temporary, references, report)
        except ValueError as error:  # name the file the user asked for, not the temporary one
            raise ValueError(str(error).replace(temporary, str(path))) from error

    atomic_write(path, write_and_check)
    report.export_seconds = time.perf_counter() - began
    return report


def check_shapes(model: nn.Module, example_inputs: Any, config: ExportConfig | None = None, **overrides: Any) -> None:
    """Run `model` once at the second shape `export_onnx` checks (one more row; half the tokens)
    and raise its one-line error if the model cannot take it: for commands that write something
    else first (`lrdaccel compress --fuse` saves the model before exporting it).

    Raises:
        ValueError: the model fixes its batch size or sequence length (say which option to pass).
    """
    config = resolve(ExportConfig, config, overrides, "export_onnx")
    model = unwrap(model)
    inputs = move_inputs(example_inputs, model_device(model))
    report = ExportReport(Path(), 0, [], "", config.dynamic_batch)
    with kept_modes(model):
        _references(model.eval(), inputs, report, config.dynamic_sequence and bool(token_inputs(inputs)))


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
def _references(model: nn.Module, inputs: Any, report: ExportReport, dynamic_sequence: bool) -> list[tuple]:
    """[(inputs, PyTorch's output, batch, tokens)] at the example's shape and, with dynamic axes,
    at one more: one more row and, with a dynamic sequence, half the tokens."""
    tensors, _, names = flat_inputs(inputs)
    batch = tensors[0].shape[0] if tensors and tensors[0].dim() else 1
    tokens = token_inputs(inputs) if dynamic_sequence else []
    length = tensors[names.index(tokens[0])].shape[1] if tokens else None
    references = [(inputs, output_tensor(call_model(model, inputs)).detach().float().cpu().numpy(), batch, length)]
    if not (report.dynamic_batch or tokens):
        return references
    size = batch + 1 if report.dynamic_batch else batch
    rows = _rows(inputs, size) if report.dynamic_batch else inputs
    shorter = max(1, length // 2) if tokens else None
    if tokens:
        rows = _shortened(rows, set(tokens), shorter)
    try:
        output = output_tensor(call_model(model, rows))
    except Exception as error:  # whatever the model raises on a shape it was not written for
        shape = f"batch {size}" + (f" x {shorter} tokens" if tokens else "")
        fixes = (["a fixed batch (dynamic_batch=False, --no-dynamic-batch)"] if report.dynamic_batch else []) + \
            (["a fixed length (dynamic_sequence=False, --no-dynamic-sequence)"] if tokens else [])
        raise ValueError(f"export_onnx: {type(model).__name__} fails at {shape} (the example: batch {batch}): "
                         f"{type(error).__name__}: {' '.join(str(error).split())[:200]}; it fixes its input shape: "
                         f"export with {' or '.join(fixes)}; nothing written") from None
    references.append((rows, output.detach().float().cpu().numpy(), size, shorter))
    return references


def _shortened(inputs: Any, tokens: set[str], length: int) -> Any:
    """`inputs` with the token inputs cut to their first `length` positions."""
    tensors, keywords, names = flat_inputs(inputs)
    cut = [t[:, :length] if name in tokens else t for name, t in zip(names, tensors)]
    if keywords:
        return dict(zip(keywords, cut))
    return cut[0] if isinstance(inputs, torch.Tensor) else type(inputs)(cut)


def _opset(proto) -> int:
    return next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))


def _check(file: str, references: list[tuple], report: ExportReport) -> None:
    """Run the file in ONNX Runtime on each reference's inputs and compare with PyTorch's output;
    raise if the difference exceeds the tolerance."""
    try:
        session = make_session(file)
        runs = [run_session(session, feeds(session, rows))[0] for rows, *_ in references]
    except ValueError as error:
        raise ValueError(f"{report.path}: {error} (model dtype {report.dtype}); nothing written") from error
    for got, (rows, expected, batch, tokens) in zip(runs, references):
        if got.shape != expected.shape:
            raise ValueError(f"{report.path}: ONNX Runtime gave an output of shape {got.shape}, PyTorch "
                             f"{expected.shape} (batch {batch}); nothing written")
        got, expected = _real_tokens(got, rows), _real_tokens(expected, rows)
        check = {"batch": batch, "tokens": tokens,
                 "max_abs_diff": float(np.abs(got - expected).max()) if expected.size else 0.0}
        if report.quantize and expected.size:
            check["cosine"] = _lowest_cosine(got, expected)
        report.checks.append(check)
        report.max_abs_diff[batch] = max(report.max_abs_diff.get(batch, 0.0), check["max_abs_diff"])
        report.max_abs_output = max(report.max_abs_output, float(np.abs(expected).max()) if expected.size else 0.0)
    allowed = report.tolerance * max(1.0, report.max_abs_output)
    if not report.worst <= allowed:
        raise ValueError(f"{report.path}: ONNX Runtime differs from PyTorch by up to {report.worst:.3g} "
                         f"(allowed {allowed:.3g}: tolerance {report.tolerance:g} x max(1, {report.max_abs_output:.3g})); "
                         f"nothing written")


def _real_tokens(output: np.ndarray, inputs: Any) -> np.ndarray:
    """`output` with the positions the attention mask marks as padding zeroed: what a model puts
    there is never read, and int8 moves it most (MiniLM: by up to 6 where real tokens move by 0.9)."""
    mask = token_mask(inputs)
    if mask is None or output.ndim < 2 or output.shape[:2] != tuple(mask.shape):
        return output
    keep = mask.cpu().numpy().reshape(mask.shape + (1,) * (output.ndim - 2))
    return np.where(keep, output, 0).astype(output.dtype)


def _lowest_cosine(got: np.ndarray, expected: np.ndarray) -> float:
    """The lowest cosine between matching rows (one per sample) of two outputs."""
    a, b = got.reshape(len(got), -1).astype(np.float64), expected.reshape(len(expected), -1).astype(np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return float(((a * b).sum(axis=1) / norms).min())


def _rows(inputs: Any, size: int) -> Any:
    """`inputs` with `size` rows in dimension 0, taken cyclically from the example's rows."""
    if isinstance(inputs, torch.Tensor):
        index = torch.arange(size, device=inputs.device) % inputs.shape[0]
        return inputs[index]
    if isinstance(inputs, Mapping):
        return {key: _rows(value, size) for key, value in inputs.items()}
    return type(inputs)(_rows(value, size) for value in inputs)
