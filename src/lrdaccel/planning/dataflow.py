"""One forward pass, recorded: every torch operation in execution order, with the operations that
produced its tensor inputs and the modules whose weights it read.

Layer merging must know what reads what: a bottleneck's inner activation may also be added to
the block's output (a residual read) by a functional `+` that no module hook sees. So the forward
runs under a `TorchFunctionMode` that records each top-level torch call (F.conv2d, F.batch_norm,
torch.relu, `+`, views, ...). An operation's inputs are linked to the operations that produced
them by tensor identity (an in-place operation becomes the new producer of the tensor it
changed); a conv or BatchNorm call is named by the module that owns the weight (or running mean)
it reads, never by class name, so functional code, modules called twice and wrappers are all
seen as what they compute.

Identities are tracked with weak references: a tensor freed during the forward drops out of the
map, so its id cannot be mistaken for a later tensor's, and no activation is kept alive.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from lrdaccel._modules import call_model, kept_modes, model_device, move_inputs

# Elementwise activations: a channel selection commutes with each of them.
ACTIVATIONS = frozenset({
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "silu", "silu_", "hardswish", "hardswish_",
    "leaky_relu", "leaky_relu_", "elu", "elu_", "mish", "sigmoid", "sigmoid_", "tanh", "tanh_",
})
# Calls that compute nothing in eval mode (dropout) or only read metadata.
PASS_THROUGH = frozenset({"dropout", "dropout_", "alpha_dropout", "feature_alpha_dropout", "dropout2d",
                          "contiguous", "clone", "detach"})
CONV_OPS = frozenset({"conv2d"})
NORM_OPS = frozenset({"batch_norm"})
# Matrix products with a weight: F.linear(x, weight, bias), HF Conv1D's addmm(bias, x, weight).
LINEAR_OPS = {"linear": (1, "weight"), "addmm": (2, "mat2")}


@dataclass
class Op:
    """One recorded call.

    Attributes:
        index: position in execution order.
        name: the torch function's name ("conv2d", "batch_norm", "relu", "add", ...).
        kind: "conv", "bn", "linear", "act", "pass" or "other".
        module: for conv / bn / linear, the qualified name of the module whose parameters it read.
        inputs: indices of the ops that produced its tensor inputs, in argument order (the
            data input first); tensors from outside the trace (model inputs, parameters) are left out.
        readers: indices of the ops that read its result (filled as the trace proceeds).
        shape: the shape of its first tensor result.
    """

    index: int
    name: str
    kind: str
    module: str | None = None
    inputs: list[int] = field(default_factory=list)
    readers: list[int] = field(default_factory=list)
    shape: tuple[int, ...] = ()

    def describe(self) -> str:
        return self.module or f"{self.name} (op {self.index})"


class _Recorder(TorchFunctionMode):
    def __init__(self, owners: dict[int, str]):
        super().__init__()
        self.owners = owners
        self.ops: list[Op] = []
        self.producer: dict[int, int] = {}  # id(tensor) -> index of the op that last wrote it
        self._refs: dict[int, weakref.ref] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        outputs = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
        if not outputs:  # metadata (.shape, .dim(), .item()): no data flows on
            return result
        name = getattr(func, "__name__", "")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        op = Op(len(self.ops), name, _kind(name), shape=tuple(outputs[0].shape))
        if op.kind in ("conv", "bn", "linear"):
            op.module = self._owner(args, kwargs, op.kind, name)
        data = args[0] if args and isinstance(args[0], torch.Tensor) else None
        for tensor in tensors:
            source = self.producer.get(id(tensor))
            if source is not None and self._refs[id(tensor)]() is tensor and source not in op.inputs:
                op.inputs.append(source)
                self.ops[source].readers.append(op.index)
        if data is not None and op.inputs and self.producer.get(id(data)) in op.inputs:
            first = self.producer[id(data)]  # the data input first
            op.inputs.remove(first)
            op.inputs.insert(0, first)
        self.ops.append(op)
        for tensor in outputs:
            self._track(tensor, op.index)
        return result

    def _owner(self, args, kwargs, kind: str, name: str) -> str | None:
        # F.conv2d(input, weight, ...); F.batch_norm(input, running_mean, running_var, weight, ...)
        position, key = LINEAR_OPS[name] if kind == "linear" else (1 if kind == "conv" else 3, "weight")
        tensor = _argument(args, kwargs, position, key, None)
        if tensor is None and kind == "bn":  # affine=False: the running mean names the module
            tensor = _argument(args, kwargs, 1, "running_mean", None)
        return self.owners.get(id(tensor)) if tensor is not None else None

    def _track(self, tensor: torch.Tensor, index: int) -> None:
        key = id(tensor)
        self.producer[key] = index

        def forget(_ref, key=key):
            if self._refs.get(key) is _ref:
                del self._refs[key]
                self.producer.pop(key, None)

        self._refs[key] = weakref.ref(tensor, forget)


def _argument(args: tuple, kwargs: dict, position: int, key: str, default: Any) -> Any:
    if key in kwargs:
        return kwargs[key]
    return args[position] if len(args) > position else default


def _kind(name: str) -> str:
    if name in CONV_OPS:
        return "conv"
    if name in NORM_OPS:
        return "bn"
    if name in LINEAR_OPS:
        return "linear"
    if name in ACTIVATIONS:
        return "act"
    if name in PASS_THROUGH:
        return "pass"
    return "other"


def _tensor_owners(model: nn.Module) -> dict[int, str]:
    """id(parameter or buffer) -> qualified name of the module holding it (first holder)."""
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            owners.setdefault(id(tensor), name)
    return owners


@torch.no_grad()
def trace_ops(model: nn.Module, example_inputs: Any) -> list[Op]:
    """Run `model` once on `example_inputs` (in eval mode, restored after) and record every op.

    Args:
        model: the model; its parameters and training flags are left as they were.
        example_inputs: a tensor, tuple or dict for the model (moved to the model's device; a
            batch of one is enough).

    Raises:
        ValueError: the model fails on the inputs (naming the error).
    """
    recorder = _Recorder(_tensor_owners(model))
    try:
        with kept_modes(model), recorder:
            model.eval()
            call_model(model, move_inputs(example_inputs, model_device(model)))
    except Exception as error:  # whatever the model raises: say that tracing failed and why
        raise ValueError(f"tracing the model on example_inputs failed ({type(error).__name__}: {error})") from error
    return recorder.ops
