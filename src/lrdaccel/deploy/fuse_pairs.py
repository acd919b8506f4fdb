"""Which conv -> BatchNorm2d pairs may fold: found with torch.fx, each use of the conv accounted for.

Folding rewrites the conv's weight and bias and turns the BatchNorm into nn.Identity, so it is
exact only where every use of the conv, of the parameters that change and of the BatchNorm is the
traced step `norm(conv(x))`. A pair is cleared here only when, in the graph that holds it:

- each call of the conv feeds the BatchNorm alone, and each call of the BatchNorm reads a call of
  the conv (a block called twice folds: both calls are such steps);
- no node reads the conv's (or the absorbing factor's) weight or bias, or any tensor of the
  BatchNorm, other than through these calls (`F.conv2d(x, self.conv.weight)` is a `get_attr`
  node; buffers are traced as nodes too), no code reads their values while being traced (a sum
  over `self.parameters()` runs eagerly and enters the graph as a constant: a
  `TorchFunctionMode` around the trace sees it), and no other module in the graph contains them;
- the conv computes what nn.Conv2d computes (nn.Conv2d, a subclass that changes nothing it
  computes with, such as MergedConv2d, or a decomposed conv whose last factor is one), the norm
  what nn.BatchNorm2d computes with running statistics; no hook sees either, no tensor of theirs
  is shared with another module and neither is registered under two names.

The graph is the whole forward only where the whole model traces. Where a module does not trace
(Hugging Face models branch on input shapes at the top) its children are traced alone, and what
the untraced parent does with their convs is unknown: such a pair is marked `needs_evidence`, and
folds only if a real forward shows the calls and reads the graph predicts
(lrdaccel.deploy.fuse_evidence).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from lrdaccel.deploy.fuse_rules import METADATA, fold_target, plain_conv, plain_norm, reads_values, tensors_of
from lrdaccel.layers import LowRankModule


@dataclass
class Pair:
    """A conv -> BatchNorm2d step found in a traced graph.

    Attributes:
        conv: the module called in the graph: a conv, or a decomposed conv (then `target` is its
            last factor, which absorbs the norm).
        norm: the BatchNorm2d.
        target: the name of the conv that absorbs the norm.
        scope: the traced module the pair was found in ("" for the whole model).
        calls: calls of the conv (and of the norm) per call of `scope`.
        needs_evidence: the scope is not the whole model (an ancestor did not trace).
        reason: why it may not fold, or None.
    """

    conv: str
    norm: str
    target: str
    scope: str
    calls: int
    needs_evidence: bool
    reason: str | None = None


@dataclass
class Found:
    """Every pair of every traced graph, and why each other BatchNorm2d has no pair."""

    pairs: list[Pair] = field(default_factory=list)
    unpaired: dict[str, str] = field(default_factory=dict)
    untraced: list[str] = field(default_factory=list)


class _Tracer(torch.fx.Tracer):
    """Leaves: convs that compute what nn.Conv2d computes, BatchNorms, lrdaccel's decomposed layers
    and torch.nn's own modules; everything else (conv subclasses with a forward of their own too)
    is traced through, so every read of a parameter or buffer is a node."""

    proxy_buffer_attributes = True

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (isinstance(module, LowRankModule) or (isinstance(module, nn.Conv2d) and plain_conv(module) is None)
                or super().is_leaf_module(module, qualified_name))


class _EagerReads(TorchFunctionMode):
    """Around a trace: the ids of real tensors torch functions are called on. Traced code works on
    proxies; a parameter here was read for its value (and baked into the graph as a constant)."""

    def __init__(self):
        super().__init__()
        self.read: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if reads_values(func, result):
            self.read.update(id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor))
        return result


def _hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_state

    return bool(getattr(module_state, "_global_forward_hooks", None)
                or getattr(module_state, "_global_forward_pre_hooks", None))


def find_pairs(model: nn.Module) -> Found:
    """Every conv -> BatchNorm2d step in `model`'s traced graphs, each with its reason or None."""
    return _Finder(model).run()


class _Finder:
    def __init__(self, model: nn.Module):
        self.model = model
        self.names = {id(m): name for name, m in model.named_modules()}
        self.aliases: dict[int, int] = {}
        self.holders: dict[int, int] = {}  # id(tensor) -> modules holding it directly
        for _, module in model.named_modules(remove_duplicate=False):
            self.aliases[id(module)] = self.aliases.get(id(module), 0) + 1
        for module in model.modules():
            for tensor in tensors_of(module):
                self.holders[id(tensor)] = self.holders.get(id(tensor), 0) + 1
        self.found = Found()
        self.global_hooks = _global_hooks()

    def run(self) -> Found:
        self._visit("", self.model)
        paired = {pair.norm for pair in self.found.pairs}
        for name, module in self.model.named_modules():
            if isinstance(module, nn.BatchNorm2d) and name not in paired and name not in self.found.unpaired:
                self.found.unpaired[name] = self._unseen(name)
        return self.found

    def _unseen(self, name: str) -> str:
        """Why a BatchNorm is in no traced graph: its parent does not trace, or a leaf holds it."""
        parent = name.rpartition(".")[0]
        if (parent or "<model>") in self.found.untraced:
            return (f"{parent or 'the model'} calls it, and torch.fx cannot trace {parent or 'the model'}: what feeds "
                    f"it is unknown")
        return "never called in a traced graph (it runs inside a module left whole)"

    def _visit(self, prefix: str, module: nn.Module) -> None:
        if not any(isinstance(m, nn.BatchNorm2d) for m in module.modules()):
            return
        if module is not self.model and not any(True for _ in module.children()):
            return  # a module without children holds no pair (and a BatchNorm alone does not trace)
        eager = _EagerReads()
        attributes = set(vars(module))  # torch.fx stores constants as new attributes of the module it traces
        try:
            try:
                with eager:
                    graph = _Tracer().trace(module)
            except Exception:  # TraceError, or the model's own checks failing on proxies: trace the children
                self.found.untraced.append(prefix or "<model>")
                graph = None
            if graph is not None:
                _Graph(self, module, prefix, graph, eager.read).collect()
        finally:
            for name in set(vars(module)) - attributes:  # the user's module as it was
                delattr(module, name)
        if graph is None:
            for name, child in module.named_children():
                self._visit(f"{prefix}.{name}" if prefix else name, child)


class _Graph:
    """One traced graph: its module calls, its direct tensor reads, the pairs in it."""

    def __init__(self, finder: _Finder, root: nn.Module, prefix: str, graph: torch.fx.Graph, eager: set[int]):
        self.finder, self.root, self.prefix, self.graph, self.eager = finder, root, prefix, graph, eager
        self.calls: dict[int, list[torch.fx.Node]] = {}
        self.modules: dict[int, nn.Module] = {}
        self.read: dict[int, list[str]] = {}  # id(tensor) -> get_attr targets reading it
        self.read_storage: dict[int, list[str]] = {}  # storage pointer -> get_attr targets
        for node in graph.nodes:
            if node.op == "call_module":
                module = root.get_submodule(node.target)
                self.calls.setdefault(id(module), []).append(node)
                self.modules[id(module)] = module
            elif node.op == "get_attr":
                value = _resolve(root, node.target)
                if isinstance(value, torch.Tensor) and not _metadata_only(node):
                    self.read.setdefault(id(value), []).append(str(node.target))
                    pointer = _storage(value)
                    if pointer is not None:
                        self.read_storage.setdefault(pointer, []).append(str(node.target))

    def name(self, module: nn.Module) -> str:
        return self.finder.names[id(module)]

    def collect(self) -> None:
        pairs: dict[tuple[int, int], None] = {}
        fed_by: dict[int, torch.fx.Node | None] = {}  # a norm with no conv before it -> what feeds it
        for key, nodes in self.calls.items():
            if not isinstance(self.modules[key], nn.BatchNorm2d):
                continue
            for node in nodes:
                source = _input(node)
                conv = self.root.get_submodule(source.target) if (
                    isinstance(source, torch.fx.Node) and source.op == "call_module") else None
                if isinstance(conv, (nn.Conv2d, LowRankModule)):
                    pairs.setdefault((id(conv), key))
                else:
                    fed_by.setdefault(key, source)
        for conv_key, norm_key in pairs:
            self.finder.found.pairs.append(self._pair(self.modules[conv_key], self.modules[norm_key]))
        paired = {norm_key for _, norm_key in pairs}
        for key, source in fed_by.items():
            if key not in paired:
                self.finder.found.unpaired.setdefault(self.name(self.modules[key]),
                                                      f"fed by {self._describe(source)}, not by a conv's own call")

    def _pair(self, conv: nn.Module, norm: nn.Module) -> Pair:
        target, why_conv = fold_target(conv)
        conv_name, norm_name = self.name(conv), self.name(norm)
        target_name = conv_name if target is None or target is conv else self._child_name(conv, target)
        pair = Pair(conv_name, norm_name, target_name, self.prefix, len(self.calls[id(conv)]),
                    needs_evidence=self.root is not self.finder.model)
        reasons = [why_conv] if why_conv else []
        why_norm = plain_norm(norm)
        reasons += [why_norm] if why_norm else []
        reasons += self._flow_reasons(conv, norm)
        if target is not None:
            reasons += self._use_reasons(conv, target, norm)
        pair.reason = "; ".join(reasons) or None
        return pair

    def _child_name(self, parent: nn.Module, child: nn.Module) -> str:
        return next(f"{self.name(parent)}.{attr}" for attr, m in parent.named_children() if m is child)

    def _flow_reasons(self, conv: nn.Module, norm: nn.Module) -> list[str]:
        """Each call of the conv feeds the norm alone; each call of the norm reads a call of the conv."""
        conv_nodes, norm_nodes = self.calls[id(conv)], self.calls[id(norm)]
        reasons = []
        other_readers = [node for node in conv_nodes
                         if len(node.users) != 1 or _input(next(iter(node.users))) is not node
                         or next(iter(node.users)) not in norm_nodes]
        if other_readers:
            readers = sorted({self._describe(user) for node in other_readers for user in node.users
                              if user not in norm_nodes})
            total = sum(len(node.users) for node in conv_nodes)
            if len(conv_nodes) == 1:
                reasons.append(f"the conv's output is also read elsewhere ({total} readers, the BatchNorm among "
                               f"them: also {', '.join(readers) or 'the BatchNorm twice'})")
            else:
                reasons.append(f"the conv runs {len(conv_nodes)} times and not every call feeds the BatchNorm alone "
                               f"(also read by {', '.join(readers) or 'nothing'})")
        foreign = [node for node in norm_nodes if _input(node) not in conv_nodes]
        if foreign:
            sources = sorted({self._describe(_input(node)) for node in foreign})
            reasons.append(f"the BatchNorm runs {len(norm_nodes)} times and also normalises {', '.join(sources)}")
        return reasons

    def _use_reasons(self, conv: nn.Module, target: nn.Module, norm: nn.Module) -> list[str]:
        """Reads of the changed tensors other than the conv's and the norm's own calls; hooks; aliases."""
        reasons = []
        watched = [(f"the conv's {attr}", getattr(target, attr)) for attr in ("weight", "bias")
                   if getattr(target, attr) is not None]
        watched += [(f"the BatchNorm's {attr}", getattr(norm, attr)) for attr in
                    ("weight", "bias", "running_mean", "running_var") if getattr(norm, attr) is not None]
        for what, tensor in watched:
            readers = self.read.get(id(tensor), []) or self.read_storage.get(_storage(tensor), [])
            if readers:
                reasons.append(f"{what} is also read directly ({', '.join(sorted(set(readers)))})")
            if id(tensor) in self.eager:
                reasons.append(f"{what} is read for its value while the forward is traced (e.g. through "
                               f".parameters()); the graph holds the result as a constant")
            if self.finder.holders.get(id(tensor), 0) > 1:
                reasons.append(f"{what} is shared with another module")
        modules = {conv, target, norm}
        for key, other in self.modules.items():
            if other is not conv and other is not norm and any(m in modules for m in other.modules()):
                reasons.append(f"{self.name(other)} also uses {self.name(conv)} or {self.name(norm)} inside")
        hooked = [self.name(m) for m in (conv, target, norm) if _hooks(m)]
        if hooked:
            reasons.append(f"forward hooks on {', '.join(dict.fromkeys(hooked))} would see the folded output")
        if self.finder.global_hooks:
            reasons.append("a global forward hook would see the folded output")
        if any(self.finder.aliases.get(id(m), 1) > 1 for m in (conv, target, norm)):
            reasons.append("a module is registered under several names")
        return reasons

    def _describe(self, node) -> str:
        if not isinstance(node, torch.fx.Node):
            return "a constant"
        if node.op == "call_module":
            module = self.root.get_submodule(node.target)
            return f"{self.name(module)} ({type(module).__name__})"
        if node.op == "placeholder":
            return f"the input of {self.prefix or 'the model'}"
        if node.op == "get_attr":
            return f"{node.target}"
        what = getattr(node.target, "__name__", str(node.target))
        convs = {self._owner(n) for n in _ancestors(node, 6) if n.op == "get_attr"} - {None}
        if not convs:
            return f"{what} (functional code)"
        why = "; ".join(f"{self.name(conv)}: {plain_conv(conv)}" for conv in convs if plain_conv(conv))
        names = ", ".join(sorted(self.name(conv) for conv in convs))
        return f"{what} (functional code reading {names}{' - ' + why if why else ''})"

    def _owner(self, node: torch.fx.Node) -> nn.Module | None:
        owner, _, _ = str(node.target).rpartition(".")
        try:
            module = self.root.get_submodule(owner)
        except AttributeError:
            return None
        return module if isinstance(module, nn.Conv2d) else None


def _metadata_only(node: torch.fx.Node) -> bool:
    """A get_attr node whose every user reads only metadata (`weight.dtype`, `weight.shape[0]`)."""
    return bool(node.users) and all(
        (user.op == "call_function" and getattr(user.target, "__name__", "") == "getattr"
         and len(user.args) > 1 and user.args[1] in METADATA)
        or (user.op == "call_method" and user.target in METADATA) for user in node.users)


def _input(node: torch.fx.Node):
    """The data input of a module call node (its first argument)."""
    return node.args[0] if node.args else node.kwargs.get("input")


def _ancestors(node: torch.fx.Node, depth: int) -> list[torch.fx.Node]:
    seen, frontier = [], [node]
    for _ in range(depth):
        frontier = [n for f in frontier for n in f.all_input_nodes if n not in seen]
        seen += frontier
    return seen


def _resolve(root: nn.Module, target: str):
    value = root
    for part in str(target).split("."):
        value = getattr(value, part, None)
    return value


def _storage(tensor: torch.Tensor) -> int | None:
    if tensor.is_meta or tensor.numel() == 0:
        return None
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
