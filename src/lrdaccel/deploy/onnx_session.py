"""A PyTorch model as an ONNX Runtime session: export (torch.onnx, the dynamo exporter), a session
configured like torch (same thread count), and the model's inputs as the session's feeds.

Both the deploy path (`export_onnx`) and timing under `runtime="onnxruntime"` use these, so a
model is timed exactly as it would be deployed. ONNX Runtime, onnx and onnxscript (which the
exporter needs) are the optional extra `pip install lrdaccel[onnx]`: `onnxruntime()` checks all
three, and callers call it before any work. ONNX Runtime's own exceptions (a graph it cannot
load, an operator it has no kernel for in a dtype) never leave this module: they become
ValueErrors that say what failed.
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

from lrdaccel._extras import MissingDependency, require  # noqa: F401  (MissingDependency: imported from here too)
from lrdaccel._modules import call_model, kept_modes, output_tensor
from lrdaccel.measure.machine import BUSY_LOAD, load_average

INSTALL_HINT = "pip install lrdaccel[onnx]"
MAX_DYNAMIC_BATCH = 1 << 16

def onnxruntime():
    """The onnxruntime module, once onnx, onnxruntime and onnxscript all import; else a
    MissingDependency (ImportError and ValueError) that says how to install them."""
    require("onnx", "ONNX export and ONNX Runtime")
    import onnxruntime as ort

    return ort


class RuntimeFailure(ValueError):
    """ONNX Runtime could not load or run a graph; the message says why, in one line."""


def _failure(error: Exception, what: str) -> RuntimeFailure:
    text = " ".join(str(error).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : ", "", text)
    return RuntimeFailure(f"ONNX Runtime cannot {what}: {text[:400]}")


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


def token_inputs(inputs: Any) -> list[str]:
    """Graph input names of the token inputs: integer tensors of at least two dimensions
    ([batch, sequence, ...]: input ids, attention masks, token types), whose dimension 1 is a
    sequence length; image and feature inputs are floating point."""
    tensors, _, names = flat_inputs(inputs)
    return [name for name, t in zip(names, tensors) if t.dim() >= 2 and not t.is_floating_point()
            and not t.is_complex()]


def export_program(model: nn.Module, inputs: Any, dynamic_batch: bool = False, optimize: bool = True,
                   dynamic_sequence: bool = False):
    """The model's inference graph as a `torch.onnx.ONNXProgram` (dynamo exporter, no file).

    Args:
        model: exported in eval mode (and left in the modes it came in); its main output tensor
            becomes the graph's one output, "output".
        inputs: a tensor, tuple or dict of tensors, as the model is called.
        dynamic_batch: make dimension 0 of every input symbolic ("batch").
        dynamic_sequence: make dimension 1 of every token input (`token_inputs`) symbolic, one
            length shared by all of them: a transformer exported at 64 tokens runs at 32.
        optimize: let the exporter fold constants (False keeps one initializer per parameter,
            named by its parameter, which `reweighted` relies on).

    Raises:
        ValueError: a non-tensor input, or the exporter failed (its message included).
    """
    onnxruntime()
    tensors, keywords, names = flat_inputs(inputs)
    kwargs: dict[str, Any] = {"input_names": names, "output_names": ["output"]}
    if dynamic_batch or dynamic_sequence:
        batch = torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)
        tokens = set(token_inputs(inputs)) if dynamic_sequence else set()
        axes = [({0: batch} if dynamic_batch else {}) | ({1: torch.export.Dim.DYNAMIC} if name in tokens else {})
                for name in names]
        kwargs["dynamic_shapes"] = (tuple(axes),)  # MainOutput.forward(*args)
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
    try:
        return ort.InferenceSession(model, options or session_options(), providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT's exceptions (InvalidGraph, NotImplemented, Fail) share no base class
        raise _failure(error, "load the exported graph") from error


def run_session(session, feed: dict[str, Any]) -> list:
    """`session.run(None, feed)`, with ONNX Runtime's exceptions as RuntimeFailure (a ValueError)."""
    try:
        return session.run(None, feed)
    except Exception as error:  # ORT's exceptions share no base class
        raise _failure(error, "run the exported graph") from error


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
    return lambda: run_session(session, feed)


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
