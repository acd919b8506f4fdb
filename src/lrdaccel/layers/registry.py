"""Which dense layer types can be decomposed, and into what. First match wins.

One entry per supported type (PEFT-style ordered dispatch), matched by type, subclasses
included. An entry that matches a module may still refuse the instance, with the reason the plan
shows: a subclass whose own `forward` would be lost, a weight computed by a parametrization or a
weight-norm hook, a grouped conv. Weight layers of types no entry supports (Conv1d, Conv3d,
transposed convs, lazy modules, embeddings, ...) get a reason too (`unsupported_reason`), so the
plan says why they stay instead of leaving them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from lrdaccel.layers.base import LowRankModule
from lrdaccel.layers.branched import BranchedTuckerConv2d
from lrdaccel.layers.svd import SVDConv2d, SVDLinear, dense_linear_weight, is_conv1d
from lrdaccel.layers.tucker import TuckerConv2d

SUPPORTED = "nn.Linear, transformers Conv1D, nn.Conv2d (groups=1; 1x1 -> SVD, k x k -> Tucker-2)"


@dataclass(frozen=True)
class Entry:
    """How one dense layer type is decomposed.

    Attributes:
        kind: "svd" or "tucker2".
        layer_class: the LowRankModule built for it.
        matches: does this entry handle the module's type (and kernel)?
        base: the dense class whose own methods `trusted` names; a subclass that overrides one
            of them computes something else and is kept.
        trusted: the methods of `base` the decomposition reproduces.
        cannot: a reason this instance cannot be decomposed (a grouped conv), or None.
    """

    kind: str
    layer_class: type[LowRankModule]
    matches: Callable[[nn.Module], bool]
    base: Callable[[nn.Module], type]
    trusted: tuple[str, ...]
    cannot: Callable[[nn.Module], str | None] = lambda module: None

    def why_not(self, module: nn.Module) -> str | None:
        """The reason this instance must stay as it is, or None if it can be decomposed."""
        base = self.base(module)
        overridden = [m for m in self.trusted if getattr(type(module), m, None) is not getattr(base, m, None)]
        if overridden:
            return (f"{type(module).__name__} subclasses {base.__name__} with its own {overridden[0]}; decomposing "
                    f"would drop that behaviour (supported: {SUPPORTED})")
        if not isinstance(module._parameters.get("weight"), nn.Parameter):
            return ("weight is computed (a parametrization such as weight_norm / spectral_norm / orthogonal, or a "
                    "weight-norm hook), not a plain parameter; remove the parametrization "
                    "(torch.nn.utils.parametrize.remove_parametrizations) to decompose its current weight")
        return self.cannot(module)


def _conv_cannot(module: nn.Conv2d) -> str | None:
    if module.groups == 1:
        return None
    if module.groups == module.in_channels:
        return f"depthwise conv (groups={module.groups}) has no channel mixing to factorize"
    return f"grouped conv (groups={module.groups}) is not supported"


def _conv1d_base(module: nn.Module) -> type:
    return next(cls for cls in type(module).__mro__ if cls.__name__ == "Conv1D")


def _is_lazy(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.lazy.LazyModuleMixin)


def _is_conv2d(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and not _is_lazy(module)


REGISTRY: tuple[Entry, ...] = (
    Entry("svd", SVDLinear, lambda m: isinstance(m, nn.Linear) and not _is_lazy(m), lambda m: nn.Linear, ("forward",)),
    Entry("svd", SVDLinear, is_conv1d, _conv1d_base, ("forward",)),
    Entry("svd", SVDConv2d, lambda m: _is_conv2d(m) and m.kernel_size == (1, 1), lambda m: nn.Conv2d,
          ("forward", "_conv_forward"), _conv_cannot),
    Entry("tucker2", TuckerConv2d, lambda m: _is_conv2d(m) and m.kernel_size != (1, 1), lambda m: nn.Conv2d,
          ("forward", "_conv_forward"), _conv_cannot),
)

# Weight layers no entry supports, and why; the first match wins (lazy modules subclass Linear/Conv).
UNSUPPORTED: tuple[tuple[type, str], ...] = (
    (nn.modules.lazy.LazyModuleMixin, "lazy module: its weight has no shape until the first forward; run one "
                                      "forward before planning"),
    (nn.modules.conv._ConvTransposeNd, "transposed conv is not supported"),
    (nn.Conv1d, "Conv1d is not supported"),
    (nn.Conv3d, "Conv3d is not supported"),
    (nn.Bilinear, "Bilinear is not supported"),
    (nn.Embedding, "an embedding is a table lookup, not a matrix product: nothing to gain"),
    (nn.EmbeddingBag, "an embedding is a table lookup, not a matrix product: nothing to gain"),
    (nn.MultiheadAttention, "MultiheadAttention's packed in_proj_weight is read directly by its forward"),
)


# Other forms a layer may take, by plan kind: (the kind of the entry it replaces, its layer class).
# The registry's own kinds ("svd", "tucker2") are what each type gets by default.
FORMS: dict[str, tuple[str, type[LowRankModule]]] = {
    "tucker2_branched": ("tucker2", BranchedTuckerConv2d),
}


def layer_class_for(module: nn.Module, kind: str) -> type[LowRankModule] | None:
    """The LowRankModule class that builds `kind` for this module, or None if the kind does not
    fit its type (a branched core for a Linear, an SVD for a 3x3 conv)."""
    entry = entry_for(module)
    if entry is None:
        return None
    if kind == entry.kind:
        return entry.layer_class
    base_kind, layer_class = FORMS.get(kind, (None, None))
    return layer_class if base_kind == entry.kind else None


def entry_for(module: nn.Module) -> Entry | None:
    """The entry for the module's type, or None if no entry handles it."""
    for entry in REGISTRY:
        if entry.matches(module):
            return entry
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a weight layer of an unsupported type is not decomposed (None: not such a layer)."""
    for layer_type, reason in UNSUPPORTED:
        if isinstance(module, layer_type):
            return f"{reason} (supported: {SUPPORTED})"
    return None


def dense_shape(module: nn.Module) -> dict:
    """The geometry the plan records and checks: out, in, kernel."""
    if isinstance(module, nn.Conv2d):
        return {"out": module.out_channels, "in": module.in_channels, "kernel": list(module.kernel_size)}
    out_features, in_features = dense_linear_weight(module).shape
    return {"out": out_features, "in": in_features, "kernel": [1, 1]}


def weight_shape(module: nn.Module) -> dict:
    """The geometry of any weight layer as far as it is known: out and in from the first two
    dimensions of its weight, the rest as the kernel (zeros for a lazy or weightless module)."""
    weight = getattr(module, "weight", None)
    if weight is None or isinstance(weight, nn.parameter.UninitializedParameter) or weight.dim() < 2:
        return {"out": 0, "in": 0, "kernel": []}
    return {"out": int(weight.shape[0]), "in": int(weight.shape[1]), "kernel": [int(d) for d in weight.shape[2:]]}
