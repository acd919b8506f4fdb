"""The deploy path: fold BatchNorm into the convs before it, export to ONNX and check the file
against PyTorch with ONNX Runtime.

    import lrdaccel as lrd
    model.eval()
    print(lrd.fuse_batchnorm(model, example_inputs))                  # what was folded, what was not and why
    print(lrd.export_onnx(model, example_inputs, "model.onnx"))      # max abs difference vs PyTorch
    served = lrd.quantize(model, "int8")                              # an int8 copy for CPU serving

Modules: fuse (the verb: folding exactly, undoing it if outputs move), fuse_pairs (conv ->
BatchNorm pairs found by torch.fx, each use of the conv accounted for), fuse_evidence (what one
forward shows where torch.fx could not trace a parent; the before/after comparison), fuse_rules
(what counts as a conv, a BatchNorm and a read of a tensor), onnx_session (export to an in-memory graph, an ONNX Runtime session configured like torch; also
used to time the "onnxruntime" runtime), onnx_export (the file and its check), onnx_quantize
(ONNX Runtime's int8 quantization of the file), quantize (int8 in PyTorch: `lrd.quantize`).
"""

from lrdaccel.deploy.fuse import FuseReport, fuse_batchnorm
from lrdaccel.deploy.onnx_export import EXPORT_FORMATS, ExportConfig, ExportReport, export_onnx
from lrdaccel.deploy.quantize import QUANTIZE_DTYPES, quantize

__all__ = ["EXPORT_FORMATS", "ExportConfig", "ExportReport", "FuseReport", "QUANTIZE_DTYPES", "export_onnx",
           "fuse_batchnorm", "quantize"]
