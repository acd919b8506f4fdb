"""A PyTorch model as an ONNX Runtime session: export (torch.onnx, the dynamo exporter), a session
configured like torch (same thread count), and the model's inputs as the session's feeds.

Both the deploy path (`export_onnx`) and timing under `runtime="onnxruntime"` use these, so a
model is timed exactly as it would be deployed. ONNX Runtime is an optional extra
(`pip install lrdaccel[onnx]`); it is imported only here, when first needed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

from lrdaccel._modules import call_model, kept_modes, output_tensor
from lrdaccel.measure.machine import BUSY_LOAD, load_average

INSTALL_HINT = "pip install lrdaccel[onnx]"
MAX_DYNAMIC_BATCH = 1 << 16


class MissingDependency(ImportError, ValueError):
    """An optional extra is not installed. A ValueError too, so the CLI reports it in one line."""


def onnxruntime():
    """The onnxruntime module, or a MissingDependency that says how to install it."""
    try:
        import onnx  # noqa: F401  (the exporter needs it as well)
        import onnxruntime as ort
    except ImportError as error:
        raise MissingDependency(f"ONNX Runtime is not installed ({error.name} is missing): {INSTALL_HINT}") from None
    return ort


class MainOutput(nn.Module):
    """`model` called with named or positional tensors, returning only its main output tensor
    (`lrdaccel._modules.output_tensor`): the one graph output an exported file has."""

    def __init__(self, model: nn.Module, keywords: tuple[str, ...] = ()):
        super().__init__()
        self.model, self.keywords = model, keywords

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        inputs = dict(zip(self.keywords, args)) if self.keywords else args
        return output_tensor(call_model(self.model, inputs))


def flat_inputs(inputs: Any) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...], list[str]]:
    """(tensors in order, keyword names or (), graph input names) for a tensor, tuple or dict.

    Raises:
        ValueError: an input that is not a tensor (ONNX graphs take tensors only).
    """
    if isinstance(inputs, Mapping):
        keywords = tuple(inputs)
        tensors = tuple(inputs.values())
        names = list(keywords)
    else:
        tensors = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        keywords = ()
        names = ["input"] if len(tensors) == 1 else [f"input_{i}" for i in range(len(tensors))]
    for name, value in zip(names, tensors):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"ONNX export: input {name!r} is a {type(value).__name__}; an exported graph takes "
                             f"tensors only")
    return tensors, keywords, names


def export_program(model: nn.Module, inputs: Any, dynamic_batch: bool = False, optimize: bool = True):
    """The model's inference graph as a `torch.onnx.ONNXProgram` (dynamo exporter, no file).

    Args:
        model: exported in eval mode (and left in the modes it came in); its main output tensor
            becomes the graph's one output, "output".
        inputs: a tensor, tuple or dict of tensors, as the model is called.
        dynamic_batch: make dimension 0 of every input symbolic ("batch").
        optimize: let the exporter fold constants (False keeps one initializer per parameter,
            named by its parameter, which `reweighted` relies on).

    Raises:
        ValueError: a non-tensor input, or the exporter failed (its message included).
    """
    onnxruntime()
    tensors, keywords, names = flat_inputs(inputs)
    kwargs: dict[str, Any] = {"input_names": names, "output_names": ["output"]}
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)
        kwargs["dynamic_shapes"] = (tuple({0: batch} for _ in tensors),)  # MainOutput.forward(*args)
    # The exporter prints progress and warns about its own internals; neither is the user's business.
    try:
        with kept_modes(model), _quiet(), torch.no_grad():
            wrapped = MainOutput(model, keywords).eval()
            return torch.onnx.export(wrapped, tensors, dynamo=True, optimize=optimize, verbose=False, **kwargs)
    except Exception as error:  # torch.export / onnxscript errors have no common base class
        cause = error
        while cause.__cause__ is not None:  # the exporter wraps the error that says what went wrong
            cause = cause.__cause__
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip()
        raise ValueError(f"ONNX export of {type(model).__name__} failed: {type(cause).__name__}: "
                         f"{text.splitlines()[0][:400] if text else ''}") from error


@contextlib.contextmanager
def _quiet():
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def session_options():
    """ONNX Runtime options comparable with torch: torch's intra-op thread count (ORT's own
    default is one per physical core), one inter-op thread, full graph optimisation (which
    includes the NCHWc layout transformer CPU convs need), and no spinning worker threads on a
    busy machine (they steal cores from other work)."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    load = load_average()
    if load is not None and load >= BUSY_LOAD:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def make_session(model: bytes | str, options=None):
    """An InferenceSession on the CPU execution provider from a serialized model or a file path,
    with `session_options()` unless other options are given."""
    ort = onnxruntime()
    return ort.InferenceSession(model, options or session_options(), providers=["CPUExecutionProvider"])


def feeds(session, inputs: Any) -> dict[str, Any]:
    """The session's feed dict for `inputs` (the same structure the model was exported with)."""
    tensors, _, _ = flat_inputs(inputs)
    names = [entry.name for entry in session.get_inputs()]
    if len(names) != len(tensors):
        raise ValueError(f"the ONNX graph takes {len(names)} inputs {names}, got {len(tensors)}")
    return {name: tensor.detach().cpu().contiguous().numpy() for name, tensor in zip(names, tensors)}


def session_step(session, inputs: Any) -> Callable[[], Any]:
    """One `session.run` on `inputs`, the feed dict built once (as a server holding a batch would)."""
    feed = feeds(session, inputs)
    return lambda: session.run(None, feed)


def reweighted(proto, module: nn.Module):
    """A copy of an exported graph of a module of the same structure, with `module`'s weights.

    Exporting costs seconds; a candidate rank only changes the sizes of the weights, which ONNX
    Conv / Gemm / MatMul read from the weights themselves. So a layer is exported once
    (`optimize=False`, one initializer per parameter, named by it) and each rank gets the
    candidate's parameters swapped in; intermediate shapes are dropped for ONNX Runtime to infer
    again. Returns None where an initializer is not a parameter of `module` (then export anew).
    """
    from onnx import numpy_helper

    state = {name: value.detach().cpu() for name, value in MainOutput(module).state_dict().items()}
    graph = proto.graph
    if {entry.name for entry in graph.initializer} - set(state):
        return None
    copied = type(proto)()
    copied.CopyFrom(proto)
    for index, entry in enumerate(copied.graph.initializer):
        copied.graph.initializer[index].CopyFrom(numpy_helper.from_array(state[entry.name].numpy(), entry.name))
    del copied.graph.value_info[:]
    return copied
