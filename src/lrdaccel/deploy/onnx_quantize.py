"""An exported ONNX file quantized to int8 by ONNX Runtime's own tools (`export_onnx(...,
quantize="int8")`): dynamic int8 for MatMul and Gemm (weights int8 once, activations scaled per
call: no calibration, and the transformer's Linear layers are all MatMul/Gemm), and with
calibration batches static int8 for Conv first, in the QDQ format (activation ranges observed on
the batches, weights per channel) that ONNX Runtime fuses into int8 conv kernels.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

from lrdaccel.calibration.batches import check_calibration
from lrdaccel.deploy.onnx_session import flat_inputs

QUANTIZE_CHOICES = ("int8",)
# Largest |ONNX Runtime int8 - PyTorch fp32| allowed by default, relative to max(1, max |output|):
# dynamic int8 moves the real all-MiniLM-L6-v2's hidden states by up to 15% of their range on its
# worst token (0.90 of 6.09; cosine 0.88-0.95 per sentence); this catches a broken graph, not rounding.
INT8_TOLERANCE = 0.25
DYNAMIC_OPS = ("MatMul", "Gemm")
STATIC_OPS = ("Conv",)
_INT8_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "ConvInteger", "QLinearConv",
             "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


class _Batches:
    """The calibration batches as ONNX Runtime's CalibrationDataReader wants them: feed dicts."""

    def __init__(self, names: list[str], batches: list):
        self._feeds = iter([{name: t.detach().cpu().contiguous().numpy() for name, t in
                             zip(names, flat_inputs(batch)[0])} for batch in batches])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizer logs advice (run pre-processing first) through the root logger on each call."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def quantize_file(source: str, target: str, input_names: list[str], calibration: list | None) -> int:
    """Write `source` quantized to `target`; returns how many int8 operators the graph has.

    Raises:
        ValueError: nothing in the graph was quantized (no MatMul or Gemm, and no Conv or no
            calibration batches).
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    with tempfile.TemporaryDirectory() as scratch, _quiet():
        if calibration:
            static = str(Path(scratch) / "static.onnx")
            quantize_static(source, static, _Batches(input_names, calibration), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(STATIC_OPS), per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            source = static
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, op_types_to_quantize=list(DYNAMIC_OPS))
    count = sum(node.op_type in _INT8_OPS for node in onnx.load(target, load_external_data=False).graph.node)
    if not count:
        convs = " (its convs need calibration batches)" if not calibration else ""
        raise ValueError(f"int8 ONNX export: ONNX Runtime quantized nothing in the graph: it has no MatMul or Gemm, "
                         f"and no Conv quantized statically{convs}")
    return count


def calibration_list(calibration: Any) -> list | None:
    """The calibration batches as a list (ONNX Runtime reads them once), or None."""
    if calibration is None:
        return None
    check_calibration(calibration)
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration gave no batches")
    return batches
