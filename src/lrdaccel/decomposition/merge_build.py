"""Merging planned bottlenecks: the merged modules built from the original ones.

For a "merged" plan row (lrdaccel.planning.rows) the bottleneck `first -> bn1 -> act1 -> middle ->
bn2 -> act2 -> last [-> bn3]` becomes `first' (C_in -> r1) -> bn1' -> act1 -> middle' (r1 -> r2) ->
bn2' -> act2 -> last' (r2 -> C_out)`. Each side is handled by what lies on it (the math is in
lrdaccel.factorize.merging):

- across an activation, the merge keeps a channel subset (chosen greedily on calibration
  statistics, lrdaccel.decomposition.merge_statistics) and re-fits what reads it by least squares:
  last' predicts the dropped channels of g from the kept ones; middle' is the least-squares fit of
  the kept outputs from the kept inputs' k x k patches. bn1' / bn2' are exact sub-BatchNorms.
- without activation (a BatchNorm only), the Tucker-2 factor of `middle` folds into the 1x1 conv
  exactly (eval mode): when both sides are linear the merged block computes exactly what the
  Tucker-2 decomposed block computes, and needs no calibration data.

After all merges, `decompose` re-estimates every BatchNorm's running statistics on the
calibration batches (`lrdaccel.calibration.batchnorm.recalibrate_batchnorm`): merged blocks shift
the activations every later BatchNorm sees. Measured on a bottleneck CNN for Fashion-MNIST
(benchmarks/merge_fmnist.py), this initialisation is far closer to the original than a random one
and than pushing the Tucker-2 factors through the activation as if it were the identity.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from lrdaccel._modules import kept_modes
from lrdaccel.decomposition.merge_statistics import BlockStats
from lrdaccel.factorize.merging import (
    batchnorm_affine,
    fold_input_factor,
    fold_output_factor,
    patch_least_squares,
    select_inputs,
    select_outputs,
)
from lrdaccel.factorize.tucker2 import tucker2
from lrdaccel.factorize.whiten import DEFAULT_DAMPING, whitened_tucker2
from lrdaccel.layers.merged import BottleneckChain, narrowed_block
from lrdaccel.planning.rows import LayerPlan

TUCKER_ITERS = 2  # HOOI sweeps, as TuckerConv2d.from_dense: both-linear merges then equal it exactly


def merged_like(model: nn.Module, row: LayerPlan) -> dict[str, nn.Module]:
    """The merged block's new modules at the row's ranks, default-initialised (for loading weights
    into, or timing): {qualified name: module} for first, bn1, middle, bn2 and last."""
    block = row.merge
    names = (block.first, block.bn1, row.name, block.bn2, block.last)
    last = model.get_submodule(block.last)
    # A constant the merge moves past bn2 lands in bn3's running mean, else in last's bias.
    modules = narrowed_block(*(model.get_submodule(n) for n in names), row.rank, row.name,
                             last_bias=last.bias is not None or block.bn3 is None)
    modules[2].merge_block = block
    return dict(zip(names, modules))


@torch.no_grad()
def build_merged(model: nn.Module, row: LayerPlan, stats: BlockStats | None,
                 damping: float = DEFAULT_DAMPING) -> dict[str, nn.Module]:
    """The merged block's modules, filled from the original ones (which stay untouched), and a
    copy of bn3 with the constants folded in where there is one.

    Args:
        model: the undecomposed model.
        row: a "merged" plan row.
        stats: the block's calibration statistics; None only where both sides are linear.
        damping: input whitening's diagonal loading for the Tucker-2 of a linear side.

    Raises:
        ValueError: a side across an activation without calibration statistics.
    """
    block = row.merge
    if stats is None and (block.act1 or block.act2):
        raise ValueError(f"merged row {row.name!r}: merging across an activation needs calibration batches "
                         f"(decompose(..., calibration=batches))")
    middle, last = model.get_submodule(row.name), model.get_submodule(block.last)
    bn3 = model.get_submodule(block.bn3) if block.bn3 else None
    built = merged_like(model, row)
    kernel = middle.weight.detach().double()
    r1, r2 = row.rank
    tucker = None if (block.act1 or block.act2) else _tucker(kernel, stats, r1, r2, damping)
    out = _output_side(model, row, built, stats, kernel, tucker, damping)
    core = _input_side(model, row, built, stats, out, tucker, damping)
    new_middle, new_last = built[row.name], built[block.last]
    _assign(new_middle.weight, core)
    if new_middle.bias is not None:
        _assign(new_middle.bias, out.target_bias)
    _assign(new_last.weight, out.last_weight)
    if last.bias is not None:
        _assign(new_last.bias, last.bias.detach())
    elif new_last.bias is not None:
        new_last.bias.zero_()
    if bn3 is not None:
        new_bn3 = copy.deepcopy(bn3)
        new_bn3.running_mean.sub_(out.constant.to(new_bn3.running_mean))
        built[block.bn3] = new_bn3
    else:
        new_last.bias.add_(out.constant.to(new_last.bias))
    return built


@dataclass
class _Output:
    """What the output side decided: the kernel the new middle conv must reproduce (over the
    original inner input h), its bias, the new last conv, the constant it leaves for bn3 / the
    last bias, and how much each of the r2 new channels matters downstream."""

    target: torch.Tensor  # [r2, M, kh, kw]
    target_bias: torch.Tensor | None
    last_weight: torch.Tensor  # [C_out, r2]
    constant: torch.Tensor  # [C_out]
    importance: torch.Tensor  # [r2]


def _output_side(model: nn.Module, row: LayerPlan, built: dict[str, nn.Module], stats: BlockStats | None,
                 kernel: torch.Tensor, tucker: tuple | None, damping: float) -> _Output:
    """Across act2: keep r2 channels, last' predicts the dropped ones. Without: fold V exactly."""
    block, r2 = row.merge, row.rank[1]
    middle, last, bn2 = (model.get_submodule(n) for n in (row.name, block.last, block.bn2))
    bn3 = model.get_submodule(block.bn3) if block.bn3 else None
    last_w = last.weight.detach().double()[:, :, 0, 0]
    out_scale = _affine(bn3)[0] if bn3 is not None else last_w.new_ones(last.out_channels)
    s2, t2 = _affine(bn2)
    middle_bias = None if middle.bias is None else middle.bias.detach().double()
    if block.act2:
        kept, last_new, constant = select_outputs(stats.g_second, last_w, out_scale, r2)
        _copy_sub_batchnorm(built[block.bn2], bn2, kept)
        return _Output(kernel[kept], None if middle_bias is None else middle_bias[kept], last_new, constant,
                       s2[kept] * (out_scale[:, None] * last_new).norm(dim=0))
    # y = V w + b: the middle conv's bias b joins bn2's shift on its way into the constant.
    v = tucker[2] if tucker is not None else _tucker(kernel, stats, kernel.shape[1], r2, damping)[2]
    bias = torch.zeros_like(s2) if middle_bias is None else middle_bias
    last_new, constant = fold_output_factor(last_w, s2, t2 + s2 * bias, v)
    if stats is not None:
        mean, variance = _projected_moments(v, stats.y_mean, stats.y_second)
    else:
        mean, variance = _projected_moments(v, bn2.running_mean.double(), None, bn2.running_var.double())
    _set_shift_batchnorm(built[block.bn2], mean - v.T @ bias, variance, torch.zeros_like(mean))  # w = V^T (y - b)
    return _Output(torch.einsum("os,oihw->sihw", v, kernel), None if middle_bias is None else middle_bias.new_zeros(r2),
                   last_new, constant, (out_scale[:, None] * last_new).norm(dim=0))


def _input_side(model: nn.Module, row: LayerPlan, built: dict[str, nn.Module], stats: BlockStats | None,
                out: _Output, tucker: tuple | None, damping: float) -> torch.Tensor:
    """Fill first' and bn1'; return the core. Across act1: keep r1 channels of h, the core by patch
    least squares. Without: fold the Tucker-2 input factor into first exactly."""
    block, r1 = row.merge, row.rank[0]
    first, bn1 = model.get_submodule(block.first), model.get_submodule(block.bn1)
    new_first, new_bn1 = built[block.first], built[block.bn1]
    first_w = first.weight.detach().double()[:, :, 0, 0]
    if block.act1:
        chosen = select_inputs(stats.h_second, out.target * out.importance[:, None, None, None], r1)
        _assign(new_first.weight, first_w[chosen])
        if first.bias is not None:
            _assign(new_first.bias, first.bias.detach()[chosen])
        _copy_sub_batchnorm(new_bn1, bn1, chosen)
        return patch_least_squares(out.target, stats.patch_second, chosen)
    if tucker is not None:
        u_in, core = tucker[0], tucker[1]
    else:  # the kept outputs' kernel, Tucker-2 on its input mode (output mode at full rank)
        u_in, core_t, u_out = _tucker(out.target, stats, r1, out.target.shape[0], damping)
        core = torch.einsum("os,srhw->orhw", u_out, core_t)
    s1, t1 = _affine(bn1)
    first_new, shift = fold_input_factor(first_w, None if first.bias is None else first.bias.detach(), s1, t1, u_in.T)
    _assign(new_first.weight, first_new)
    if new_first.bias is not None:
        new_first.bias.zero_()
    if stats is not None:
        mean, variance = _projected_moments(u_in, stats.h_mean, stats.h_second)
    else:  # h = bn1(...): mean about its bias, variance about its weight squared
        mean, variance = _projected_moments(u_in, bn1.bias.detach().double(), None, bn1.weight.detach().double() ** 2)
    _set_shift_batchnorm(new_bn1, mean - shift, variance, shift)
    return core


@torch.no_grad()
def merge_error(model: nn.Module, row: LayerPlan, built: dict[str, nn.Module],
                stats: dict[str, BlockStats] | None) -> float | None:
    """Relative error of the merged block's branch output (after bn3, before BatchNorm
    re-estimation) on the kept items of the first calibration batch; None without calibration."""
    sample = None if stats is None else stats[row.name].sample
    if sample is None:
        return None
    block = row.merge
    names = [block.first, block.bn1, row.name, block.bn2, block.last] + ([block.bn3] if block.bn3 else [])
    original = BottleneckChain(*(model.get_submodule(n) for n in names), act1=block.act1, act2=block.act2)
    new = BottleneckChain(*(built.get(n, model.get_submodule(n)) for n in names), act1=block.act1, act2=block.act2)
    with kept_modes(original), kept_modes(new):
        reference, approx = original.eval()(sample).double(), new.eval()(sample).double()
    norm = reference.norm()
    return float((approx - reference).norm() / norm) if norm > 0 else float(approx.norm())


def _affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    return batchnorm_affine(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)


def _tucker(kernel: torch.Tensor, stats: BlockStats | None, r1: int, r2: int, damping: float):
    """(U_in, core, U_out) of the kernel, float64: whitened by the block's inner input where
    calibration statistics exist, plain HOOI (as TuckerConv2d.from_dense) where not."""
    if stats is not None:
        factors = whitened_tucker2(kernel, stats.h_second, r1, r2, n_iter=TUCKER_ITERS, damping=damping)
    else:
        factors = tucker2(kernel, r1, r2, n_iter=TUCKER_ITERS)
    return tuple(f.double() for f in factors)


def _projected_moments(basis: torch.Tensor, mean: torch.Tensor, second: torch.Tensor | None,
                       diagonal_variance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of basis^T x from x's mean and second moment (or diagonal variance)."""
    projected_mean = basis.T @ mean
    if second is not None:
        covariance = second - torch.outer(mean, mean)
        variance = torch.einsum("ir,ij,jr->r", basis, covariance, basis)
    else:
        variance = (basis ** 2).T @ diagonal_variance
    return projected_mean, variance.clamp_min(1e-12)


@torch.no_grad()
def _set_shift_batchnorm(bn: nn.BatchNorm2d, mean: torch.Tensor, variance: torch.Tensor, shift: torch.Tensor) -> None:
    """bn(u) = u + shift in eval mode, with running statistics (mean, variance) of u, so that in
    training mode it normalises u to where eval mode leaves it."""
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(variance)
    bn.weight.copy_((variance + bn.eps).sqrt())
    bn.bias.copy_(mean + shift)


@torch.no_grad()
def _copy_sub_batchnorm(new: nn.BatchNorm2d, old: nn.BatchNorm2d, channels: list[int]) -> None:
    index = torch.as_tensor(channels, device=old.running_mean.device)
    for attribute in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, attribute).copy_(getattr(old, attribute).detach()[index])
    new.num_batches_tracked.copy_(old.num_batches_tracked)


@torch.no_grad()
def _assign(parameter: torch.Tensor, value: torch.Tensor) -> None:
    parameter.copy_(value.reshape(parameter.shape).to(parameter))
