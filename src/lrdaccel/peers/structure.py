"""What may be pruned in a model, decided once before the search prunes copies of it.

torch-pruning couples channels into groups (a residual sum, a BatchNorm, a depthwise conv and
every layer reading a width must shrink together). A group keeps its width when any of its
layers is kept, so keeping is decided per group, with a reason the report shows:

- layers the user excluded (`exclude=`: regex, names or dotted suffixes, a callable, or types);
- the stem: the first conv the model calls (its input is the image; the pruning literature and
  the LRD plans both leave it);
- a width that leaves the model (the classifier, BERT's pooler): no layer of the model reads it,
  so shrinking it would change the output's shape;
- in a transformer, the residual stream (a group holding a LayerNorm or an embedding): only
  attention heads and MLP widths shrink, as in the structured-pruning papers LRD is compared to;
- a weight shared by two modules (tied embeddings: an output layer reading the embedding's
  weight), which pruning would silently untie: torch-pruning has no notion of a shared tensor and
  gives each owner its own pruned copy. Every group that would shrink such a weight in any of its
  dimensions (a layer's output, or the input width a layer reads) keeps its width, so the tied
  layers stay one tensor.

A model torch-pruning cannot handle fails here, naming the layer, before any copy is pruned.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from lrdaccel._modules import call_model, kept_modes, weight_owners
from lrdaccel.peers.transformer_heads import AttentionHeads, attention_modules, find_projections
from lrdaccel.planning.targeting import compile_selector

# Layer types torch-pruning has a pruner for (by isinstance, as torch-pruning dispatches).
PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.Embedding,
            nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU, nn.LSTM)
ROOTS = (nn.modules.conv._ConvNd, nn.Linear)  # layers whose output channels start a group
READERS = (nn.modules.conv._ConvNd, nn.Linear, nn.LSTM, nn.MultiheadAttention)  # layers that consume a width


@dataclass
class Structure:
    """The model's prunable structure, by module name (valid on any deep copy of it).

    Attributes:
        kept: a kept group's first layer -> why its width stays.
        ignored: every layer whose output width must stay (all layers of the kept groups).
        excluded: modules the user excluded (and their submodules).
        attention: the attention modules whose heads are pruned.
    """

    kept: dict[str, str] = field(default_factory=dict)
    ignored: set[str] = field(default_factory=set)
    excluded: set[str] = field(default_factory=set)
    attention: list[AttentionHeads] = field(default_factory=list)

    @property
    def max_head_ratio(self) -> float:
        """The largest head pruning ratio that leaves every attention module one head (torch-pruning
        removes ceil(ratio * heads))."""
        fewest = min((a.heads for a in self.attention), default=1)
        return max(0.0, (fewest - 1) / fewest - 1e-9)


def excluded_names(model: nn.Module, exclude: Any) -> set[str]:
    """Names of the modules `exclude` selects, and of all their submodules.

    `exclude` is what lrd.plan's include/exclude take (a regex on the full name, a list of names or
    dotted suffixes, a callable (module, name) -> bool), or a module type or tuple of types.

    Raises:
        ValueError: a pattern that matches no module, or a selector of the wrong kind.
    """
    if exclude is None:
        return set()
    if isinstance(exclude, type) or (isinstance(exclude, tuple) and exclude
                                     and all(isinstance(t, type) for t in exclude)):
        types = exclude
        exclude = lambda module, name: isinstance(module, types)  # noqa: E731
    names = [name for name, _ in model.named_modules() if name]
    select = compile_selector(exclude, "exclude", names)
    chosen = {name for name, module in model.named_modules() if name and select(module, name)}
    return {name for name in names if any(name == c or name.startswith(c + ".") for c in chosen)}


def check_supported(model: nn.Module, excluded: set[str]) -> None:
    """Refuse, before any work, a model with layers torch-pruning cannot prune correctly.

    Raises:
        ValueError: naming the model, the layer and its type: a lazy or meta-device parameter, an
            nn.MultiheadAttention (torch-pruning would shrink its embedding width), a layer with a
            weight of a type torch-pruning has no pruner for (Hugging Face Conv1D, RMSNorm, ...),
            an attention module of a form whose heads this module cannot prune.
    """
    model_name = type(model).__name__
    for name, module in model.named_modules():
        if name in excluded:
            continue
        for attr, parameter in module.named_parameters(recurse=False):
            if isinstance(parameter, nn.parameter.UninitializedParameter):
                raise ValueError(f"cannot prune {model_name}: {name or 'the model'}.{attr} is not initialized (a lazy "
                                 f"module); run one forward first")
            if parameter.is_meta:
                raise ValueError(f"cannot prune {model_name}: {name or 'the model'}.{attr} is on the meta device")
        if isinstance(module, nn.MultiheadAttention):
            raise ValueError(f"cannot prune {model_name}: {name!r} is an nn.MultiheadAttention, whose heads "
                             f"lrdaccel.peers.prune does not prune; exclude it (exclude=[{name!r}]) to keep it")
        own = dict(module.named_parameters(recurse=False))
        if "weight" in own and not isinstance(module, PRUNABLE):
            raise ValueError(f"cannot prune {model_name}: layer {name!r} is a {type(module).__name__}, which "
                             f"torch-pruning has no pruner for; replace it by a layer it knows, or exclude it "
                             f"together with the layers that feed it (exclude=[{name!r}, ...]) so that its "
                             f"input width stays")
    attention_modules(model, skip=excluded)  # raises on a form whose heads we cannot prune


def trace_options() -> dict:
    """How torch-pruning calls the model and reads its output: inputs as lrdaccel passes them
    everywhere (tensor, positional tuple, keyword mapping such as a tokenizer's BatchEncoding), and
    only the output's tensors that autograd can trace (an HF output also holds caches, None, ints)."""
    return {"forward_fn": call_model, "output_transform": _output_for_tracing}


def _output_for_tracing(output: Any) -> list[torch.Tensor]:
    tensors = _traced_tensors(output)
    if not tensors:
        raise ValueError("no tensor of the model's output has an autograd graph (detached, or computed "
                         "without the parameters)")
    return tensors


def _traced_tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output] if output.grad_fn is not None else []
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    return [t for value in values for t in _traced_tensors(value)]


def excluded_parameters(model: nn.Module, excluded: set[str]) -> list[nn.Parameter]:
    """The own parameters of excluded modules: torch-pruning would otherwise trace the weight of an
    excluded layer of a type it does not know as a free parameter and prune it."""
    return [p for name in sorted(excluded) for p in model.get_submodule(name).parameters(recurse=False)]


@contextmanager
def traceable(model: nn.Module) -> Iterator[None]:
    """torch-pruning traces autograd: grad on, every parameter requiring grad, eval mode (so that
    the traced forward does not move BatchNorm statistics). Modes come back on exit; requires_grad
    is the caller's to restore by name, since pruning replaces the parameters."""
    with kept_modes(model), torch.enable_grad():
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        yield


def analyse(model: nn.Module, example_inputs: Any, excluded: set[str], keep_stem: bool, tp) -> Structure:
    """Build torch-pruning's dependency graph on a copy of `model` and decide what stays.

    Raises:
        ValueError: torch-pruning cannot trace the model (its message, with the model's class).
    """
    scratch = copy.deepcopy(model)
    names = {module: name for name, module in scratch.named_modules()}
    called: list[str] = []
    hooks = [module.register_forward_hook(lambda m, i, o: called.append(names[m]))
             for module in scratch.modules() if isinstance(module, ROOTS)]
    try:
        with traceable(scratch):
            graph = tp.DependencyGraph().build_dependency(scratch, example_inputs=example_inputs,
                                                          ignored_params=excluded_parameters(scratch, excluded),
                                                          **trace_options())
            groups = list(graph.get_all_groups(root_module_types=list(ROOTS)))
    except Exception as error:  # torch-pruning's own errors are of many kinds
        raise ValueError(f"torch-pruning cannot trace {type(model).__name__}: "
                         f"{type(error).__name__}: {error}") from None
    finally:
        for hook in hooks:
            hook.remove()

    attention = attention_modules(scratch, skip=excluded)
    transformer = bool(attention) or any(isinstance(m, nn.MultiheadAttention) for m in scratch.modules())
    first = scratch.get_submodule(called[0]) if called else None
    stem = called[0] if keep_stem and isinstance(first, nn.modules.conv._ConvNd) else None
    shared = {name: sorted(set(owners) - {name}) for owners in weight_owners(scratch).values()
              if len(set(owners)) > 1 for name in owners}
    structure = Structure(excluded=set(excluded))
    coupled: dict[str, set[str]] = {}
    for group in groups:
        outs, touched, reads, stream = [], [], False, False
        for dep, _ in group:
            module = dep.target.module
            if module not in names:  # torch-pruning's placeholder ops (reshapes, sums, outputs)
                continue
            touched.append(names[module])
            if graph.is_out_channel_pruning_fn(dep.handler):
                outs.append(names[module])
            elif isinstance(module, READERS):
                reads = True
            stream = stream or isinstance(module, (nn.LayerNorm, nn.Embedding))
        if not outs:
            continue
        for name in outs:
            coupled[name] = set(outs)
        kept = _kept_reason(outs, touched, excluded, stem, reads, stream and transformer, shared)
        if kept:
            name, reason = kept
            structure.ignored.update(outs)
            structure.kept[name] = reason + (f" (with {len(outs) - 1} coupled modules)" if len(outs) > 1 else "")
    structure.attention = [find_projections(name, module, coupled) for name, module in attention.items()]
    return structure


def _kept_reason(outs: list[str], touched: list[str], excluded: set[str], stem: str | None, reads: bool,
                 stream: bool, shared: dict[str, list[str]]) -> tuple[str, str] | None:
    """(the layer that keeps the group, why), or None for a group that may be pruned. `touched`:
    every layer the group would shrink, by its output or by the input width it reads."""
    for name in outs:
        if name in excluded:
            return name, "excluded"
    if stem in outs:
        return stem, "stem: the first conv the model calls"
    if not reads:
        return outs[0], "its output leaves the model (classifier or pooler)"
    if stream:
        return outs[0], "transformer residual stream (LayerNorm / embedding width)"
    for name in touched:
        if name in shared:
            return outs[0], f"{name}'s weight is tied to {', '.join(shared[name])}'s (pruning would untie them)"
    return None
