"""Fold every eval-mode BatchNorm2d that directly follows a conv into that conv, for deployment.

In eval mode a BatchNorm is a per-channel affine map, so the conv before it can absorb it:
with s = gamma / sqrt(running_var + eps),

    W' = W * s (per output channel),    b' = (b - running_mean) * s + beta,

computed in float64 and stored in the conv's dtype; the BatchNorm becomes nn.Identity. A
decomposed conv (SVDConv2d, TuckerConv2d) absorbs it into its last factor, which carries the
bias. Training mode is refused: there a BatchNorm normalises with the batch's own statistics,
which no weight can reproduce.

Pairs are found with torch.fx, module by module: the model is traced (with lrdaccel's decomposed
layers as leaves); where a module does not trace (Hugging Face models branch on input shapes at
the top), each of its children is traced instead, so the conv and norm that are siblings inside
HF's ResNetConvLayer are found there. A pair is folded only when the conv's output is read by the
BatchNorm alone, each module runs once, the conv is exactly nn.Conv2d or a decomposed conv (a
subclass may transform its weight), the BatchNorm keeps running statistics and no parameter is
shared; every other pair is left as it was and reported with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from lrdaccel._modules import parent_and_attr, unwrap, weight_owners
from lrdaccel.layers import LowRankModule, SVDConv2d, TuckerConv2d

DECOMPOSED_CONVS = (SVDConv2d, TuckerConv2d)


@dataclass
class FuseReport:
    """What `fuse_batchnorm` did.

    Attributes:
        fused: (conv, batchnorm) module names folded; the conv of a decomposed layer is its last factor.
        skipped: (conv, batchnorm, reason) pairs found but left as they were.
        left: every BatchNorm2d still in the model.
        untraced: modules torch.fx could not trace (their children were traced instead).
    """

    fused: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    untraced: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fuse_batchnorm: {len(self.fused)} BatchNorm2d folded into the conv before them, "
                 f"{len(self.skipped)} pairs left unfused, {len(self.left)} BatchNorm2d remain"]
        lines += [f"  unfused {conv} -> {norm}: {reason}" for conv, norm, reason in self.skipped]
        paired = {norm for _, norm, _ in self.skipped}
        lines += [f"  remains {norm}: no conv feeds it directly in a traced graph" for norm in self.left
                  if norm not in paired]
        if self.untraced:
            lines.append(f"  torch.fx could not trace {', '.join(self.untraced)} (their children were traced)")
        return "\n".join(lines)


def fuse_batchnorm(model: nn.Module) -> FuseReport:
    """Fold, in place, every BatchNorm2d that directly follows a conv into it, exactly.

    Args:
        model: in eval mode, every BatchNorm2d too (wrappers such as DDP or torch.compile are
            looked through).

    Returns:
        A FuseReport: pairs folded, pairs left with their reason, BatchNorm2d remaining.

    Raises:
        ValueError: the model or one of its BatchNorm2d is in training mode (the model is unchanged).

    Example:
        >>> import torch, lrdaccel as lrd
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
        >>> lrd.fuse_batchnorm(net).fused
        [('0', '1')]
    """
    model = unwrap(model)
    training = [name or "<model>" for name, module in model.named_modules()
                if module.training and (module is model or isinstance(module, nn.modules.batchnorm._BatchNorm))]
    if training:
        raise ValueError(f"fuse_batchnorm folds eval-mode BatchNorm only (in training mode it normalises with "
                         f"batch statistics, which no conv weight can reproduce); call model.eval() first. In "
                         f"training mode: {', '.join(training[:5])}{' ...' if len(training) > 5 else ''}")
    report = FuseReport()
    pairs, calls = _traced_pairs(model, report)
    owners = weight_owners(model)
    aliases: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        aliases[id(module)] = aliases.get(id(module), 0) + 1
    folds = []
    for conv_name, norm_name, readers in pairs:
        reason = _why_not(model, conv_name, norm_name, readers, calls, owners, aliases)
        if reason is None:
            folds.append((conv_name, norm_name))
        else:
            report.skipped.append((_target_name(model, conv_name), norm_name, reason))
    for conv_name, norm_name in folds:  # every check passed before the model is touched
        conv = _fold_target(model.get_submodule(conv_name))
        fold_into(conv, model.get_submodule(norm_name))
        parent, attr = parent_and_attr(model, norm_name)
        setattr(parent, attr, nn.Identity())
        report.fused.append((_target_name(model, conv_name), norm_name))
    report.left = [name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]
    return report


@torch.no_grad()
def fold_into(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """Scale `conv`'s output channels and set its bias so that conv'(x) == norm(conv(x)) in eval mode."""
    weight = conv.weight.to(torch.float64)
    mean, var = norm.running_mean.to(torch.float64), norm.running_var.to(torch.float64)
    gamma = norm.weight.to(torch.float64) if norm.weight is not None else torch.ones_like(mean)
    beta = norm.bias.to(torch.float64) if norm.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + norm.eps)
    bias = conv.bias.to(torch.float64) if conv.bias is not None else torch.zeros_like(mean)
    conv.weight.copy_(weight * scale.reshape(-1, *[1] * (weight.dim() - 1)))
    new_bias = ((bias - mean) * scale + beta).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)


class _Tracer(torch.fx.Tracer):
    """torch.nn's own modules and lrdaccel's decomposed layers stay whole (call_module nodes)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, LowRankModule) or super().is_leaf_module(module, qualified_name)


def _traced_pairs(model: nn.Module, report: FuseReport) -> tuple[list[tuple[str, str, int]], dict[str, int]]:
    """[(conv, batchnorm, readers of the conv's output)] and calls per leaf module, from fx graphs."""
    pairs: list[tuple[str, str, int]] = []
    calls: dict[str, int] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        if not any(isinstance(m, nn.BatchNorm2d) for m in module.modules()):
            return
        try:
            graph = _Tracer().trace(module)
        except Exception:  # TraceError, or the model's own checks failing on proxies: trace the children
            report.untraced.append(prefix or "<model>")
            for name, child in module.named_children():
                visit(f"{prefix}.{name}" if prefix else name, child)
            return
        full = lambda target: f"{prefix}.{target}" if prefix else str(target)  # noqa: E731
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            calls[full(node.target)] = calls.get(full(node.target), 0) + 1
            source = node.args[0] if node.args else None
            if (isinstance(module.get_submodule(node.target), nn.BatchNorm2d) and isinstance(source, torch.fx.Node)
                    and source.op == "call_module" and _is_conv(module.get_submodule(source.target))):
                pairs.append((full(source.target), full(node.target), len(source.users)))

    visit("", model)
    return pairs, calls


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, *DECOMPOSED_CONVS))


def _fold_target(module: nn.Module) -> nn.Conv2d:
    """The conv that absorbs the norm: the conv itself, or a decomposed conv's last factor."""
    return module.factors[-1] if isinstance(module, DECOMPOSED_CONVS) else module


def _target_name(model: nn.Module, name: str) -> str:
    module = model.get_submodule(name)
    if isinstance(module, DECOMPOSED_CONVS):
        last = module.factors[-1]
        return next(f"{name}.{child}" for child, m in module.named_children() if m is last)
    return name


def _why_not(model: nn.Module, conv_name: str, norm_name: str, readers: int, calls: dict[str, int],
             owners: dict[int, list[str]], aliases: dict[int, int]) -> str | None:
    conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
    if type(conv) is not nn.Conv2d and not isinstance(conv, DECOMPOSED_CONVS):
        return f"{type(conv).__name__} is a subclass of nn.Conv2d (its forward may transform the weight)"
    if readers != 1:
        return f"the conv's output is also read elsewhere ({readers} readers, the BatchNorm among them)"
    if calls.get(conv_name, 0) != 1 or calls.get(norm_name, 0) != 1:
        return (f"a module runs more than once (conv {calls.get(conv_name, 0)}x, BatchNorm "
                f"{calls.get(norm_name, 0)}x)")
    if aliases.get(id(conv), 1) > 1 or aliases.get(id(norm), 1) > 1:
        return "a module is registered under several names"
    if norm.running_mean is None or norm.running_var is None:
        return "the BatchNorm keeps no running statistics (it uses batch statistics even in eval mode)"
    target = _fold_target(conv)
    for parameter in (target.weight, target.bias):
        if parameter is not None and len(owners.get(id(parameter), ())) > 1:
            return f"the conv's parameters are shared with {sorted(owners[id(parameter)])}"
    return None
