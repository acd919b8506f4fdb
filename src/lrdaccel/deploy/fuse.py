"""Fold every eval-mode BatchNorm2d that directly follows a conv into that conv, for deployment.

In eval mode a BatchNorm is a per-channel affine map, so the conv before it can absorb it:
with s = gamma / sqrt(running_var + eps),

    W' = W * s (per output channel),    b' = (b - running_mean) * s + beta,

computed in float64 (on the CPU, whatever device the model is on) and stored in the conv's dtype
and device; the BatchNorm becomes nn.Identity. A decomposed conv (SVDConv2d, TuckerConv2d,
BranchedTuckerConv2d) absorbs it into its last factor, which carries the bias; a merged block's
convs (MergedConv2d) are convs. Training mode is refused: there a BatchNorm normalises with the
batch's own statistics, which no weight can reproduce.

Folding is safe by construction: a pair folds only where every use of the conv (its calls and
the tensors folding rewrites) is proven to be the traced conv -> BatchNorm step
(lrdaccel.deploy.fuse_pairs, with torch.fx); where an ancestor does not trace, the proof needs
the evidence of a forward on `example_inputs` (lrdaccel.deploy.fuse_evidence). Every other pair
is left as it was, with its reason. With `example_inputs` the outputs are also compared before
and after folding, and every fold is undone if they differ.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lrdaccel._modules import check_real_weights, parent_and_attr, unwrap
from lrdaccel.deploy.fuse_evidence import compare, observe, rerun
from lrdaccel.deploy.fuse_pairs import Pair, find_pairs
from lrdaccel.deploy.fuse_rules import fold_target, tensors_of


@dataclass
class FuseReport:
    """What `fuse_batchnorm` did.

    Attributes:
        fused: (conv, batchnorm) module names folded, once each; the conv of a decomposed layer
            is its last factor.
        skipped: (conv, batchnorm, reason) pairs found but left as they were, once each.
        unpaired: (batchnorm, reason) for each BatchNorm2d no conv feeds directly.
        left: every BatchNorm2d still in the model.
        untraced: modules torch.fx could not trace (their children were traced instead).
        checked: with example_inputs, how the outputs compared before and after folding.
    """

    fused: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    unpaired: list[tuple[str, str]] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    untraced: list[str] = field(default_factory=list)
    checked: str | None = None

    def __str__(self) -> str:
        lines = [f"fuse_batchnorm: {len(self.fused)} BatchNorm2d folded into the conv before them, "
                 f"{len(self.skipped)} pairs left unfused, {len(self.left)} BatchNorm2d remain"]
        lines += [f"  unfused {conv} -> {norm}: {reason}" for conv, norm, reason in self.skipped]
        lines += [f"  remains {norm}: {reason}" for norm, reason in self.unpaired if norm in self.left]
        if self.untraced:
            lines.append(f"  torch.fx could not trace {', '.join(self.untraced)} (their children were traced)")
        if self.checked:
            lines.append(f"  {self.checked}")
        return "\n".join(lines)


def fuse_batchnorm(model: nn.Module, example_inputs: Any = None) -> FuseReport:
    """Fold, in place, every BatchNorm2d that directly follows a conv into it, exactly.

    Args:
        model: in eval mode, every BatchNorm2d too (wrappers such as DDP or torch.compile are
            looked through), on any device; its modules stay where they are.
        example_inputs: a batch for the model (a tensor, tuple or dict; moved to the model's
            device). Needed to fold pairs under a module torch.fx cannot trace (Hugging Face
            models): one forward shows every call and read; the outputs are also compared
            before and after folding. Without it such pairs are left, with that reason.

    Returns:
        A FuseReport: pairs folded, pairs left with their reason, BatchNorm2d remaining.

    Raises:
        ValueError: the model or one of its BatchNorm2d is in training mode, a weight on the meta
            device, or the model failing on example_inputs (the model is unchanged).

    Example:
        >>> import torch, lrdaccel as lrd
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
        >>> lrd.fuse_batchnorm(net).fused
        [('0', '1')]
    """
    model = unwrap(model)
    _check_model(model)
    report = FuseReport()
    found = find_pairs(model)
    report.untraced = found.untraced
    pairs = found.pairs
    evidence = None
    if example_inputs is not None and any(pair.reason is None for pair in pairs):
        evidence = _observe(model, example_inputs, pairs)
    elif example_inputs is not None:
        evidence = False  # nothing to fold: no forward needed
    for pair in pairs:
        if pair.reason is None:
            pair.reason = _evidence_reason(model, pair, evidence)
    folds = [pair for pair in pairs if pair.reason is None]
    report.skipped = [(pair.target, pair.norm, pair.reason) for pair in pairs if pair.reason is not None]
    undo = [_fold(model, pair) for pair in folds]  # every check passed before the model is touched
    report.fused = [(pair.target, pair.norm) for pair in folds]
    if evidence and folds:
        why = _probe(model, example_inputs, evidence, undo)
        if why is None:
            report.checked = "outputs on example_inputs unchanged by folding (within sqrt(eps) of their dtype)"
        else:
            report.skipped += [(pair.target, pair.norm, why) for pair in folds]
            report.fused = []
            report.checked = why
    report.left = [name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]
    report.unpaired = [(norm, reason) for norm, reason in found.unpaired.items()]
    return report


def _check_model(model: nn.Module) -> None:
    training = [name or "<model>" for name, module in model.named_modules()
                if module.training and (module is model or isinstance(module, nn.modules.batchnorm._BatchNorm))]
    if training:
        raise ValueError(f"fuse_batchnorm folds eval-mode BatchNorm only (in training mode it normalises with "
                         f"batch statistics, which no conv weight can reproduce); call model.eval() first. In "
                         f"training mode: {', '.join(training[:5])}{' ...' if len(training) > 5 else ''}")
    check_real_weights(model, "fuse_batchnorm", "folding needs real weights (load them first, e.g. "
                       "model.to_empty(device=...) and load_state_dict)")


def _observe(model: nn.Module, example_inputs: Any, pairs: list[Pair]):
    """One forward counting the calls of every candidate's conv, norm and traced module, and the
    reads of the tensors folding would rewrite."""
    counted, watched = [model], {}
    for pair in pairs:
        if pair.reason is not None:
            continue
        conv, norm = model.get_submodule(pair.conv), model.get_submodule(pair.norm)
        counted += [conv, norm, model.get_submodule(pair.scope)]
        target, _ = fold_target(conv)
        for tensor in (target.weight, target.bias):
            if tensor is not None:
                watched[id(tensor)] = conv
        for tensor in tensors_of(norm):
            watched[id(tensor)] = norm
    return observe(model, example_inputs, counted, watched)


def _evidence_reason(model: nn.Module, pair: Pair, evidence) -> str | None:
    """Why the forward contradicts the graph (or, where the graph proves nothing alone, why there
    is no forward); None where it agrees."""
    if not evidence:
        if not pair.needs_evidence:
            return None
        return (f"{pair.scope} is traced alone (torch.fx cannot trace a module above it), so a use of the conv "
                f"outside it cannot be ruled out without a forward: pass example_inputs")
    conv, norm, scope = (model.get_submodule(name) for name in (pair.conv, pair.norm, pair.scope))
    runs = evidence.calls[id(scope)]
    if runs == 0:
        return f"example_inputs never reach {pair.scope or 'the model'}, so its uses could not be checked"
    expected = pair.calls * runs
    for what, module in (("conv", conv), ("BatchNorm", norm)):
        if evidence.calls[id(module)] != expected:
            return (f"the {what} runs {evidence.calls[id(module)]} times on example_inputs, but the traced step "
                    f"accounts for {expected} (code outside {pair.scope or 'the model'}'s graph calls it)")
    target, _ = fold_target(conv)
    for what, owner in (("conv", target), ("BatchNorm", norm)):
        for attr in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(owner, attr, None)
            readers = evidence.foreign.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
            if readers:
                return (f"the {what}'s {attr} is read outside its own call on example_inputs (by "
                        f"{', '.join(sorted(set(readers)))})")
    return None


@torch.no_grad()
def _fold(model: nn.Module, pair: Pair):
    """Fold one pair; returns what puts it back."""
    conv, norm = model.get_submodule(pair.target), model.get_submodule(pair.norm)
    weight = conv.weight.detach().clone()
    bias = None if conv.bias is None else conv.bias.detach().clone()
    fold_into(conv, norm)
    parent, attr = parent_and_attr(model, pair.norm)
    setattr(parent, attr, nn.Identity())

    @torch.no_grad()
    def undo() -> None:
        conv.weight.copy_(weight)
        if bias is None:
            conv.bias = None
        else:
            conv.bias.copy_(bias)
        setattr(parent, attr, norm)

    return undo


def _probe(model: nn.Module, example_inputs: Any, evidence, undo: list) -> str | None:
    """Compare the outputs after folding with those before; undo every fold on any difference."""
    difference = compare(evidence.outputs, rerun(model, example_inputs))
    if difference is None:
        return None
    for step in reversed(undo):
        step()
    worst, allowed = difference
    if compare(evidence.outputs, rerun(model, example_inputs)) is not None:
        return ("the model's outputs on example_inputs differ from run to run, so folding could not be checked; "
                "every fold was undone")
    warnings.warn(f"fuse_batchnorm: folding changed the outputs by {worst:.3g} (allowed {allowed:.3g}) although "
                  f"every pair was proven foldable; every fold was undone. Please report this model.",
                  RuntimeWarning, stacklevel=3)
    return f"folding changed the outputs on example_inputs by {worst:.3g} (allowed {allowed:.3g}); every fold was undone"


@torch.no_grad()
def fold_into(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """Scale `conv`'s output channels and set its bias so that conv'(x) == norm(conv(x)) in eval mode.

    The arithmetic runs in float64 on the CPU (any device, MPS included, has the values there),
    the results go back to the conv's device and dtype."""
    cpu = lambda tensor: tensor.detach().to("cpu", torch.float64)  # noqa: E731
    weight = cpu(conv.weight)
    mean, var = cpu(norm.running_mean), cpu(norm.running_var)
    gamma = cpu(norm.weight) if norm.weight is not None else torch.ones_like(mean)
    beta = cpu(norm.bias) if norm.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + norm.eps)
    bias = cpu(conv.bias) if conv.bias is not None else torch.zeros_like(mean)
    conv.weight.copy_(weight * scale.reshape(-1, *[1] * (weight.dim() - 1)))
    new_bias = ((bias - mean) * scale + beta).to(device=conv.weight.device, dtype=conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)
