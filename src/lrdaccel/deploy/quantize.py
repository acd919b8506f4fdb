"""Int8 serving in PyTorch on the CPU: a quantized copy of any model lrdaccel gives (original,
decomposed, merged, pruned), the input left as it was.

    q = lrd.quantize(model, "int8")                          # Linear (and HF Conv1D): dynamic int8
    q = lrd.quantize(cnn, "int8", calibration=batches)       # convs too: static int8, calibrated

Which library: PyTorch's own eager quantization (`torch.ao.quantization`), not torchao. On the real
all-MiniLM-L6-v2 (batch 64 glosses, at most 40 tokens, 1 thread, eager, interleaved;
benchmarks/int8_library_choice.py, two runs) torch.ao's dynamic int8 Linear served 2.3-2.7x faster
than fp32, torchao 0.18's `Int8DynamicActivationInt8WeightConfig` 1.1-1.3x (its CPU kernels are
made for torch.compile). torchao's per-token activation scales agree better (cosine 0.997 against
0.974), so it is the one to revisit once its eager CPU path is fast. torch.ao is deprecated in
favour of torchao, so its warnings are silenced here. Weights get per-channel scales: about the
speed of per-tensor, cosine 0.974 against 0.945.

Convs are only quantized with calibration batches (static int8 needs activation ranges): each
plain nn.Conv2d, and each decomposed conv as one unit (its 1x1 -> core -> 1x1 chain runs in int8
between one quantize and one dequantize), through `QuantWrapper` (`ServedConv`: it still
answers `.weight` for code that reads it). Merged convs (a Conv2d
subclass) and convs with a padding mode other than zeros stay float.

A quantized model cannot be saved with `lrd.save` (it refuses before writing): save the float
model, and quantize after `lrd.load`; it takes a second.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from lrdaccel._modules import check_real_weights, parent_and_attr, unwrap
from lrdaccel._settings import check_choice
from lrdaccel.calibration.batches import batches_in_memory, call_batch
from lrdaccel.deploy.onnx_export import cpu_copy
from lrdaccel.layers import LowRankModule
from lrdaccel.layers.base import factor_weight
from lrdaccel.layers.svd import SVDConv2d, is_conv1d

QUANTIZE_DTYPES = ("int8",)


@contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao.quantization warns on every call that it is deprecated (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*deprecated.*")
        warnings.filterwarnings("ignore", message=r".*reduce_range will be deprecated.*")
        yield


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the layers dynamic int8 applies to: nn.Linear (exactly; subclasses such as
    MultiheadAttention's out_proj are read as weights by their parent) and HF Conv1D."""
    return [name for name, m in model.named_modules() if type(m) is nn.Linear or is_conv1d(m)]


def quantizable_convs(model: nn.Module) -> list[str]:
    """Names of the convs static int8 applies to, outermost first: decomposed convs whose factors
    are all plain zero-padded Conv2d (as one unit), and plain zero-padded nn.Conv2d outside them."""
    names, inside = [], ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(module, LowRankModule) and all(_plain_conv(f) for f in module.factors):
            if not name:
                return [name]  # the model is one decomposed conv
            names.append(name)
            inside = (name + ".",)
        elif _plain_conv(module):
            names.append(name)
    return names


def _plain_conv(module: nn.Module) -> bool:
    return type(module) is nn.Conv2d and module.padding_mode == "zeros"


class ServedConv(torch.ao.quantization.QuantWrapper):
    """A conv (or decomposed conv) in int8 between a quantize and a dequantize, which still answers
    what code around a conv reads off it (`weight`, `in_channels`, ...) as the conv it wraps would:
    HF ViT reads `projection.weight.dtype` on every forward. The weight read is the dequantized
    float one."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = super().__getattr__("module")
            if name == "weight" and not isinstance(module, LowRankModule):
                return factor_weight(module)
            return getattr(module, name)


def quantize(model: nn.Module, dtype: str = "int8", calibration: Any = None) -> nn.Module:
    """A quantized copy of `model` for CPU serving in PyTorch; `model` is not changed.

    Args:
        model: any model (wrappers such as DDP or torch.compile are looked through); its layers
            may be decomposed, merged or pruned by lrdaccel.
        dtype: "int8" (the only one so far).
        calibration: batches (a list or DataLoader; each called as model(x), model(*x) or
            model(**x)) to calibrate static int8 convs; without them convs stay float.

    Returns:
        The quantized copy, in eval mode, on the CPU (int8 kernels run there), its float parts
        in float32 (a half-precision model is cast): dynamic int8 Linear and Conv1D layers
        (per-channel weight scales), and with `calibration` static int8 convs.

    Raises:
        ValueError: an unknown dtype, bad calibration, weights on the meta device, or no layer
            to quantize.
    """
    check_choice("dtype", dtype, QUANTIZE_DTYPES)
    source = unwrap(model)
    linears = quantizable_linears(source)
    convs = quantizable_convs(source) if calibration is not None else []
    if not linears and not convs:
        unused = len(quantizable_convs(source))
        hint = f"; its {unused} Conv2d layer(s) need calibration batches (calibration=...)" if unused else ""
        raise ValueError(f"lrd.quantize: {type(source).__name__} has no layer int8 can quantize (nn.Linear, HF "
                         f"Conv1D, or nn.Conv2d with calibration){hint}")
    check_real_weights(source, "lrd.quantize")
    # int8 kernels run on the CPU in float32 around them: the copy is made there, in float32,
    # straight from the model's tensors (no second copy on a GPU).
    served = cpu_copy(source).float().eval()
    batches = batches_in_memory(served, calibration) if convs else []
    # Held in a container so that a model that is itself one layer (a Linear, a conv) is replaced
    # like any other: torch.ao swaps children, never the module it is given.
    holder = nn.Sequential(served)
    with _quiet(), torch.no_grad():
        for name in [n for n in linears if is_conv1d(source.get_submodule(n))]:
            _replace(holder, _held(name), _conv1d_as_linear(holder.get_submodule(_held(name))))
        if convs:
            _static_convs(holder, [_held(name) for name in convs], batches)
        torch.ao.quantization.quantize_dynamic(
            holder, {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, inplace=True)
    return holder[0]


def _held(name: str) -> str:
    return f"0.{name}" if name else "0"


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, attr = parent_and_attr(model, name)
    setattr(parent, attr, module)


def _conv1d_as_linear(conv1d: nn.Module) -> nn.Linear:
    """HF Conv1D is a Linear with its weight stored [in, out]: the same layer as nn.Linear."""
    weight = conv1d.weight
    linear = nn.Linear(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
    linear.weight.copy_(weight.T)
    linear.bias.copy_(conv1d.bias)
    return linear


def _static_convs(holder: nn.Sequential, names: list[str], batches: list) -> None:
    """Wrap each conv (or decomposed conv) in quantize -> conv -> dequantize, observe activation
    ranges on the calibration batches, convert to int8 kernels (torch.ao eager static mode)."""
    qconfig = torch.ao.quantization.get_default_qconfig(torch.backends.quantized.engine)
    for name in names:
        module = holder.get_submodule(name)
        if isinstance(module, SVDConv2d):
            module.set_form("conv")  # the "linear" form reads the weights directly
        wrapper = ServedConv(module)
        wrapper.qconfig = qconfig
        _replace(holder, name, wrapper)
    torch.ao.quantization.prepare(holder, inplace=True)
    for index, batch in enumerate(batches):
        call_batch(holder[0], batch, index)
    torch.ao.quantization.convert(holder, inplace=True)
