"""What `fuse_batchnorm` takes a conv, a BatchNorm and a read to be.

- A conv folds only if it computes what nn.Conv2d computes from its own weight and bias: the
  class itself, or a subclass that redefines nothing it computes with (MergedConv2d); a
  decomposed conv folds into its last factor where its output is that factor's output
  (SVDConv2d, TuckerConv2d, BranchedTuckerConv2d). Judged by what a class redefines, never by
  its name, and never where a parametrization computes the weight.
- A BatchNorm folds only if it computes what nn.BatchNorm2d computes, with running statistics.
- A tensor is read when a torch call depends on its values; a call that returns only metadata
  (.dtype, .shape, .dim()) is no read, since folding changes no tensor's metadata.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten

from lrdaccel.layers import LowRankModule, SVDConv2d
from lrdaccel.layers.base import ThreeConvModule

# What a class between a module's type and its torch base may not define for the module to
# compute what the base computes with the tensors folding rewrites.
CONV_OVERRIDES = frozenset({"forward", "_conv_forward", "weight", "bias", "__call__", "_call_impl"})
NORM_OVERRIDES = frozenset({"forward", "weight", "bias", "running_mean", "running_var", "__call__", "_call_impl"})
# Decomposed convs whose output is their last factor's output: (base class, what it may not redefine).
DECOMPOSED_BASES = (SVDConv2d, ThreeConvModule)
DECOMPOSED_OVERRIDES = frozenset({"forward", "factors", "__call__", "_call_impl"})
# Calls that return a Python value computed from a tensor's contents (other non-tensor results,
# such as .dtype, .shape or .dim(), depend on metadata only, which folding keeps).
VALUE_CALLS = frozenset({"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__",
                         "__array__", "__reduce_ex__", "__deepcopy__", "equal", "allclose"})
METADATA = frozenset({"dtype", "device", "shape", "ndim", "is_cuda", "requires_grad", "layout", "size", "dim",
                      "numel", "is_floating_point", "is_contiguous", "stride"})


def reads_values(func, result) -> bool:
    """Whether a torch call that returned `result` depended on its tensors' values."""
    if any(isinstance(t, torch.Tensor) for t in tree_flatten(result)[0]):
        return True
    return getattr(func, "__name__", "") in VALUE_CALLS


def overridden(module: nn.Module, base: type, names: frozenset) -> list[str]:
    """Attributes in `names` that a class between type(module) and `base` defines itself."""
    found = []
    for cls in type(module).__mro__:
        if cls is base:
            break
        found += [name for name in vars(cls) if name in names and name not in found]
    return found


def plain_conv(module: nn.Module) -> str | None:
    """None if `module` computes what nn.Conv2d computes from its own weight and bias, else why not."""
    if not isinstance(module, nn.Conv2d):
        return f"{type(module).__name__} is not a conv"
    if parametrize.is_parametrized(module):
        return f"its weight is parametrized ({type(module).__name__}): folding cannot rewrite it"
    changed = overridden(module, nn.Conv2d, CONV_OVERRIDES)
    if changed:
        return (f"{type(module).__name__} is a subclass of nn.Conv2d that redefines {', '.join(changed)} "
                f"(it may compute something else from its weight)")
    return None


def plain_norm(module: nn.Module) -> str | None:
    """None if `module` is an nn.BatchNorm2d computing what it computes, with running statistics."""
    if parametrize.is_parametrized(module):
        return "the BatchNorm's parameters are parametrized"
    changed = overridden(module, nn.BatchNorm2d, NORM_OVERRIDES)
    if changed:
        return f"{type(module).__name__} is a subclass of nn.BatchNorm2d that redefines {', '.join(changed)}"
    if module.running_mean is None or module.running_var is None:
        return "the BatchNorm keeps no running statistics (it uses batch statistics even in eval mode)"
    return None


def fold_target(module: nn.Module) -> tuple[nn.Module | None, str | None]:
    """(the conv that absorbs a following norm, why not): the conv itself, or a decomposed conv's last factor."""
    if isinstance(module, LowRankModule):
        base = next((b for b in DECOMPOSED_BASES if isinstance(module, b)), None)
        if base is None:
            return None, f"{type(module).__name__} is not a conv"
        changed = overridden(module, base, DECOMPOSED_OVERRIDES)
        if changed:
            return None, f"{type(module).__name__} redefines {', '.join(changed)} of {base.__name__}"
        last = module.factors[-1]
        why = plain_conv(last)
        return (None, f"its last factor: {why}") if why else (last, None)
    why = plain_conv(module)
    return (None, why) if why else (module, None)


def tensors_of(module: nn.Module) -> list[torch.Tensor]:
    """The module's own parameters and buffers (not its children's)."""
    return [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)) if t is not None]
