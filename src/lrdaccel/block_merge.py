"""Merging planned bottlenecks: their calibration statistics, the merged modules, BatchNorm
re-estimation, and reading merged blocks back from a model.

For a "merged" plan row (lrdaccel.planning.rows) the bottleneck `first -> bn1 -> act1 -> middle ->
bn2 -> act2 -> last [-> bn3]` becomes `first' (C_in -> r1) -> bn1' -> act1 -> middle' (r1 -> r2) ->
bn2' -> act2 -> last' (r2 -> C_out)`. Each side is handled by what lies on it (the math is in
lrdaccel.factorize.merging):

- across an activation, the merge keeps a channel subset (chosen greedily on calibration
  statistics) and re-fits what reads it by least squares: last' predicts the dropped channels of
  g from the kept ones; middle' is the least-squares fit of the kept outputs from the kept inputs'
  k x k patches. bn1' / bn2' are exact sub-BatchNorms.
- without activation (a BatchNorm only), the Tucker-2 factor of `middle` folds into the 1x1 conv
  exactly (eval mode): when both sides are linear the merged block computes exactly what the
  Tucker-2 decomposed block computes, and needs no calibration data.

After all merges, `decompose` re-estimates every BatchNorm's running statistics on the
calibration batches (`lrdaccel.recalibrate.recalibrate_batchnorm`): merged blocks shift the activations every later
BatchNorm sees. Measured on a bottleneck CNN for Fashion-MNIST (benchmarks/merge_fmnist.py), this
initialisation is far closer to the original than a random one and than pushing the Tucker-2
factors through the activation as if it were the identity.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrdaccel._modules import kept_modes, model_device, move_inputs
from lrdaccel.calibrate import call_batch, check_calibration
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
from lrdaccel.layers.merged import BottleneckChain, MergedBlock, MergedConv2d, narrowed_block
from lrdaccel.layers.registry import dense_shape
from lrdaccel.planning.rows import LayerPlan, MergeBlock

# Patch second moments of several blocks are gathered in one calibration pass up to this size;
# more blocks take more passes (ResNet-152's inner 3x3 convs need ~2 GiB in all).
PASS_BYTES = 512 << 20
TUCKER_ITERS = 2  # HOOI sweeps, as TuckerConv2d.from_dense: both-linear merges then equal it exactly
SAMPLE_ITEMS = 4  # items of the first calibration batch kept per block to report the merge's error


@dataclass
class BlockStats:
    """Calibration statistics of one bottleneck, float64, from the ORIGINAL model.

    Attributes:
        h_mean / h_second: E[h], E[h h^T] over positions of the inner conv's input h [M], [M, M].
        patch_second: E[p p^T] over its k x k input patches (F.unfold layout), where the input
            side is merged by selection; else None.
        g_second: E[g1 g1^T] of the last conv's input with a constant 1 appended [M'+1, M'+1],
            where the output side is merged by selection; else None.
        y_mean / y_second: E[y], E[y y^T] of the inner conv's output, where the output side is
            linear (for the new BatchNorm's statistics); else None.
        sample: the first calibration batch's input to the first conv, its first few items (to
            report the merge's error).
    """

    h_mean: torch.Tensor
    h_second: torch.Tensor
    patch_second: torch.Tensor | None = None
    g_second: torch.Tensor | None = None
    y_mean: torch.Tensor | None = None
    y_second: torch.Tensor | None = None
    sample: torch.Tensor | None = None


class _Moments:
    """Streamed sums of x and x x^T over rows, float64."""

    def __init__(self):
        self.total = self.outer = None
        self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().double()
        if self.outer is None:
            self.total = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
            self.outer = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
        self.total += rows.sum(0)
        self.outer.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    def mean(self) -> torch.Tensor:
        return self.total / self.count

    def second(self) -> torch.Tensor:
        return self.outer / self.count


def _channel_rows(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _patch_rows(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    patches = F.unfold(x.double(), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _with_constant(rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([rows.double(), torch.ones(rows.shape[0], 1, dtype=torch.float64, device=rows.device)], 1)


def _stats_bytes(model: nn.Module, row: LayerPlan) -> int:
    middle = model.get_submodule(row.name)
    side = middle.in_channels * math.prod(middle.kernel_size)
    return 8 * (side * side if row.merge.act1 else 0) + 8 * (middle.in_channels + middle.out_channels + 1) ** 2


def collect_block_stats(model: nn.Module, rows: Iterable[LayerPlan], calibration: Iterable[Any], *,
                        max_bytes: int = PASS_BYTES) -> dict[str, BlockStats]:
    """Run the calibration batches through `model` and gather each merged row's BlockStats.

    Blocks are grouped into passes over the batches so that no pass holds more than `max_bytes`
    of patch statistics (a block larger than that gets a pass of its own).

    Raises:
        ValueError: no batches, a batch the model fails on (naming its index), NaN/Inf statistics.
    """
    check_calibration(calibration)
    rows = list(rows)
    passes: list[list[LayerPlan]] = []
    size = 0
    for row in rows:
        need = _stats_bytes(model, row)
        if not passes or size + need > max_bytes:
            passes.append([])
            size = 0
        passes[-1].append(row)
        size += need
    stats: dict[str, BlockStats] = {}
    for group in passes:
        stats.update(_collect(model, group, calibration))
    return stats


@torch.no_grad()
def _collect(model: nn.Module, rows: list[LayerPlan], calibration: Iterable[Any]) -> dict[str, BlockStats]:
    moments: dict[str, dict[str, _Moments]] = {}
    samples: dict[str, torch.Tensor] = {}
    hooks = []
    for row in rows:
        block, middle = row.merge, model.get_submodule(row.name)
        found = moments[row.name] = {"h": _Moments()}
        if block.act1:
            found["patch"] = _Moments()
        found["g" if block.act2 else "y"] = _Moments()

        def on_middle(module, args, output, found=found):
            found["h"].add(_channel_rows(args[0]))
            if "patch" in found:
                found["patch"].add(_patch_rows(module, args[0]))
            if "y" in found:
                found["y"].add(_channel_rows(output))

        def on_first(module, args, name=row.name):
            samples.setdefault(name, args[0][:SAMPLE_ITEMS].detach().clone())

        hooks.append(middle.register_forward_hook(on_middle))
        hooks.append(model.get_submodule(block.first).register_forward_pre_hook(on_first))
        if block.act2:
            hooks.append(model.get_submodule(block.last).register_forward_pre_hook(
                lambda module, args, found=found: found["g"].add(_with_constant(_channel_rows(args[0])))))
    run_batches(model, calibration, hooks)
    result = {}
    for row in rows:
        found = moments[row.name]
        if not found["h"].count:
            raise ValueError(f"merged row {row.name!r}: no calibration batch reached this block")
        values = {key: (m.mean(), m.second()) for key, m in found.items()}
        for key, (mean, second) in values.items():
            if not (torch.isfinite(mean).all() and torch.isfinite(second).all()):
                raise ValueError(f"merged row {row.name!r}: its calibration activations contain NaN/Inf")
        result[row.name] = BlockStats(
            *values["h"], patch_second=values["patch"][1] if "patch" in values else None,
            g_second=values["g"][1] if "g" in values else None,
            y_mean=values["y"][0] if "y" in values else None, y_second=values["y"][1] if "y" in values else None,
            sample=samples.get(row.name))
    return result


def run_batches(model: nn.Module, calibration: Iterable[Any], hooks: list) -> int:
    """Call `model` on every batch in eval mode without gradients, then remove `hooks` and
    restore every module's training flag (also on error). Returns the number of batches.

    Raises:
        ValueError: no batches, or a batch the model fails on (naming its index).
    """
    device = model_device(model)
    count = 0
    try:
        with kept_modes(model), torch.no_grad():
            model.eval()
            for index, batch in enumerate(calibration):
                call_batch(model, move_inputs(batch, device), index)
                count += 1
    finally:
        for hook in hooks:
            hook.remove()
    if not count:
        raise ValueError("calibration gave no batches")
    return count


# ---- building the merged modules -------------------------------------------------------------


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
    out_scale = _affine(bn3)[0] if bn3 is not None else torch.ones(last.out_channels, dtype=torch.float64)
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
    return _Output(torch.einsum("os,oihw->sihw", v, kernel), None if middle_bias is None else torch.zeros(r2),
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


# ---- reading merged blocks back --------------------------------------------------------------


def merged_blocks(model: nn.Module) -> dict[str, MergedBlock]:
    """Every merged bottleneck in `model`, by its middle conv's current qualified name.

    Raises:
        ValueError: a block whose three convs are not all there (a model edited after merging).
    """
    convs: dict[str, dict[str, tuple[str, MergedConv2d]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, MergedConv2d):
            convs.setdefault(module.merge_name, {})[module.merge_role] = (name, module)
    blocks = {}
    for key, roles in convs.items():
        if set(roles) != {"first", "middle", "last"}:
            raise ValueError(f"merged block {key!r} is incomplete: found {sorted(roles)} of first, middle, last")
        blocks[roles["middle"][0]] = MergedBlock(roles["first"][1], roles["middle"][1], roles["last"][1])
    return blocks


def merged_rows(model: nn.Module) -> list[LayerPlan]:
    """The "merged" plan rows that rebuild `model`'s merged blocks on its undecomposed architecture."""
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, MergedConv2d) or module.merge_role != "middle":
            continue
        block: MergeBlock = module.merge_block
        if block is None or not name.endswith(module.merge_name):
            raise ValueError(f"merged conv {name!r} has lost its merge record; it cannot be saved as a plan")
        prefix = name[:len(name) - len(module.merge_name)]  # the model may be wrapped since merging
        names = {k: (prefix + v if k in ("first", "bn1", "bn2", "last", "bn3") and v else v)
                 for k, v in vars(block).items()}
        rows.append(LayerPlan(name, "merged", (module.in_channels, module.out_channels), "saved", module.source,
                              module.dense_shape, tuple(module.stride), merge=MergeBlock(**names)))
    return rows


def timing_chain(model: nn.Module, row: LayerPlan, rank: tuple[int, int] | None = None) -> BottleneckChain:
    """The row's bottleneck branch alone, as it is (rank None) or merged at `rank` with
    default-initialised weights (`BottleneckChain.narrowed`): what rank optimization times for
    this block. The modules are copies; `model` is not changed."""
    block = row.merge
    names = [block.first, block.bn1, row.name, block.bn2, block.last]
    bn3 = copy.deepcopy(model.get_submodule(block.bn3)) if block.bn3 else None
    chain = BottleneckChain(*(copy.deepcopy(model.get_submodule(n)) for n in names), bn3=bn3, act1=block.act1,
                            act2=block.act2)
    return chain if rank is None else chain.narrowed(rank, row.name)


def merged_shape_check(model: nn.Module, row: LayerPlan) -> str | None:
    """Why `model` cannot take this merged row (its neighbours differ from the plan's), or None."""
    block = row.merge
    checks = [(block.first, block.first_shape, "first"), (block.last, block.last_shape, "last")]
    for name, shape, role in checks:
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            return f"the model has no {role} conv {name!r}"
        if type(conv) is MergedConv2d or not isinstance(conv, nn.Conv2d):
            return f"{role} conv {name!r} is a {type(conv).__name__}, expected an undecomposed Conv2d"
        if dense_shape(conv) != shape:
            return f"{role} conv {name!r} has weight {dense_shape(conv)}, the plan says {shape}"
    if tuple(model.get_submodule(block.first).stride) != tuple(block.first_stride):
        return f"first conv {block.first!r} has another stride than the plan's {block.first_stride}"
    for name, channels in ((block.bn1, row.shape["in"]), (block.bn2, row.shape["out"]),
                           (block.bn3, block.last_shape["out"])):
        if name is None:
            continue
        try:
            bn = model.get_submodule(name)
        except AttributeError:
            return f"the model has no BatchNorm {name!r}"
        if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != channels:
            return f"{name!r} is not a BatchNorm2d over {channels} channels"
    return None
