"""Sequential calibration: decompose layer by layer, each fitted to what it will really see.

Whitening (`decompose(method="whiten")`) fits every layer to the inputs the ORIGINAL model feeds
it, but once the earlier layers are decomposed the layer receives something else, and the errors
compound. Here (after SVD-LLM, arXiv 2403.07378 / 2503.12340) the planned layers are decomposed in
execution order. For each layer, one streamed pass over the calibration batches collects the
moments of its input pairs: x (original model) and x_hat (the model with every earlier layer
already decomposed); then:

- SVD layers (Linear, HF Conv1D, 1x1 conv), y = W x + b:
  "joint" (default): both factors at once, the rank-r W' and bias minimising
  E||W x + b - W' x_hat - c||^2 in closed form (reduced-rank regression,
  `factorize.whiten.reduced_rank_fit`).
  "last": the first factor A is the whitened SVD's for x_hat's covariance, and the last factor B
  and the bias are re-solved by least squares so that B A x_hat + c matches W x + b
  (`factorize.whiten.least_squares_last_factor`; E[z z^T] = A E[x_hat x_hat^T] A^T and the other
  moments follow from the pair statistics, no extra pass). "joint" is never worse on the
  calibration data; on MiniLM it kept a higher embedding cosine on held-out sentences too.
- Tucker-2 layers (k x k conv): the first 1x1 and the core come from the HOOI whitened by x_hat's
  channel covariance; a second streamed pass collects what the core outputs, z, against the
  original conv's output y, and the last 1x1 and its bias are re-solved by least squares (for
  "joint" too: Tucker-2 has no closed-form joint optimum).
- "none" keeps the whitened factorization fitted to x_hat (the ablation's middle step).

Layers that read the very same tensor (a transformer's query, key and value) are calibrated
together from one pass. A pass runs both models only as far as the layers being fitted, and the
original's inputs for the next groups are kept (up to REFERENCE_CACHE_BYTES) so that one pass of
the original serves several groups. Memory is otherwise per layer, as for whitening: d x d
float64 moments, activations of one batch at a time, plus one copy of the model (the partly
decomposed one; the model you pass stays the original until the end). Padded tokens are left out
(an `attention_mask` in mapping batches).

The model changes only at the end, all layers at once: on any error (a batch the model fails on,
NaN/Inf inputs, a layer the calibration never reaches, singular statistics with damping 0) it is
left exactly as it was.

    report = lrd.decompose(model, lrd.plan(model, ratio=1.5), method="whiten", sequential=True,
                           calibration=batches)

`lrd.decompose` calls `build_sequential` here and swaps the layers in.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from lrdaccel._modules import kept_modes
from lrdaccel._settings import check_choice, check_int
from lrdaccel.calibration.batches import batches_in_memory, layers_by_name, token_mask
from lrdaccel.calibration.passes import CallOrder, forward_until, probe_calls
from lrdaccel.calibration.statistics import PairedStats, input_rows
from lrdaccel.factorize import check_finite
from lrdaccel.factorize.whiten import (
    DEFAULT_DAMPING,
    DEFAULT_REFIT_DAMPING,
    REFITS,
    WhiteningError,
    check_damping,
    least_squares_last_factor,
    reduced_rank_fit,
    whitened_svd_split,
    whitened_tucker2,
)
from lrdaccel.layers import LowRankModule, TuckerConv2d, entry_for
from lrdaccel.layers.base import assign
from lrdaccel.layers.svd import dense_linear_weight
from lrdaccel.layers.tucker import DEFAULT_HOOI_ITERS
from lrdaccel.planning import LayerPlan, Plan
from lrdaccel.decomposition.build import swap_modules
from lrdaccel.planning.validation import validate_plan

# The original model's input rows of upcoming layer groups are kept up to this many bytes, so that
# one pass of the original serves several groups (MiniLM on 1024 sentences: about a third of the
# groups per pass); memory beyond that stays per batch.
REFERENCE_CACHE_BYTES = 256 << 20


@torch.no_grad()
def build_sequential(
    model: nn.Module,
    plan: Plan,
    calibration: Iterable[Any],
    *,
    refit: str = "joint",
    damping: float = DEFAULT_DAMPING,
    refit_damping: float = DEFAULT_REFIT_DAMPING,
    n_iter: int | None = None,
    progress: bool = False,
) -> dict[str, LowRankModule]:
    """The decomposed layer for every decomposed row of `plan`, calibrated sequentially (see the
    module docstring); `model` itself is not changed (`lrd.decompose` swaps them in).

    Args:
        calibration: batches (a list, DataLoader or other iterable; read once into memory, as
            every layer needs a pass over them), each called as model(tensor), model(*tuple) or
            model(**dict): drop labels first.
        refit, damping, refit_damping, n_iter: as `lrd.DecomposeConfig`.
        progress: a tqdm bar over layer groups.

    Raises:
        ValueError: a bad setting, a plan that does not fit the model, no batches, a batch the
            model fails on, NaN/Inf reaching a planned layer, a planned layer the calibration never
            reaches, or statistics too singular to solve (only possible with damping 0), naming
            the layer.
    """
    check_choice("refit", refit, REFITS)
    check_damping(damping)
    check_damping(refit_damping)
    check_int("n_iter", n_iter, 0, optional=True)
    validate_plan(model, plan)
    batches = batches_in_memory(model, calibration)
    rows = {row.name: row for row in plan.decomposed}
    if not rows:
        return {}
    modes = {name: model.get_submodule(name).training for name in rows}
    working = copy.deepcopy(model)  # becomes the partly decomposed model, layer group by layer group
    fitter = _Fitter(refit, damping, refit_damping, DEFAULT_HOOI_ITERS if n_iter is None else n_iter)
    built: dict[str, LowRankModule] = {}
    with kept_modes(model):
        model.eval()
        working.eval()
        order = probe_calls(model, layers_by_name(model, rows), batches[0])
        if order.unreached:
            others = f" (nor {len(order.unreached) - 1} more planned layers)" if len(order.unreached) > 1 else ""
            raise ValueError(f"layer {order.unreached[0]!r}: the calibration forward never reaches it{others}; "
                             f"exclude it from the plan or give batches that use it")
        originals = _OriginalInputs(model, order, batches)
        for index, group in enumerate(tqdm(order.groups, desc="sequential calibration", unit="group",
                                           disable=not progress)):
            stats = _paired_input_stats(originals, working, index, batches)
            fitted = {name: fitter.fit(working.get_submodule(name), rows[name], stats[name]) for name in group}
            swap_modules(working, fitted)
            if refit != "none":
                fitter.refit_tucker_last(model, working, {n: m for n, m in fitted.items()
                                                          if isinstance(m, TuckerConv2d)}, order, batches)
            built.update(fitted)
    for name, layer in built.items():
        layer.train(modes[name])
    return built


def _row_rule(module: nn.Module) -> tuple:
    """Layers reading the same tensor with the same rule see the same rows (see calibration.statistics.input_rows)."""
    if not isinstance(module, nn.Conv2d):
        return ("vectors",)
    if module.kernel_size == (1, 1):
        return ("pointwise", module.stride, module.padding, module.padding_mode)
    return ("pixels",)


class _OriginalInputs:
    """The inputs the ORIGINAL model feeds each layer group, by batch and call, as rows.

    They never change, so one pass of the original can serve several groups: the rows of the
    next groups are kept for every batch at once, up to `REFERENCE_CACHE_BYTES` (estimated from
    the probe's positions); a group too large for that is read batch by batch from its own pass.
    Layers of a group that see the same rows (query, key, value) are read once, by a leader.
    """

    def __init__(self, original: nn.Module, order: CallOrder, batches: list[Any]):
        self.original, self.order, self.batches = original, order, batches
        self.leaders: list[dict[str, str]] = []  # per group: layer -> the layer whose rows it shares
        for group in order.groups:
            first: dict[tuple, str] = {}
            self.leaders.append({name: first.setdefault(_row_rule(original.get_submodule(name)), name)
                                 for name in group})
        self.kept: dict[str, list[list[torch.Tensor]]] = {}  # leader -> batch -> call -> rows
        self.kept_until = 0  # groups below this index are (or were) in `kept`

    def watched(self, group: int) -> list[str]:
        return sorted(set(self.leaders[group].values()), key=list(self.leaders[group]).index)

    def rows(self, group: int, index: int, batch: Any) -> dict[str, list[torch.Tensor]]:
        """{leader: rows per call} of batch `index` for layer group `group`."""
        if group >= self.kept_until:
            self._keep_from(group)
        watched = self.watched(group)
        if all(name in self.kept for name in watched):
            return {name: self.kept[name][index] for name in watched}
        mask = token_mask(batch)
        seen: dict[str, list[torch.Tensor]] = {name: [] for name in watched}
        forward_until(self.original, batch, index, layers_by_name(self.original, watched), self.order.calls,
                      lambda name, module, x: seen[name].append(input_rows(module, x, mask)))
        return seen

    def release(self, group: int) -> None:
        for name in self.watched(group):
            self.kept.pop(name, None)

    def _keep_from(self, group: int) -> None:
        """One pass of the original for as many groups from `group` on as fit the byte budget."""
        names, total, end = [], 0, group
        while end < len(self.order.groups):
            size = sum(self._bytes(name) for name in self.watched(end))
            if total + size > REFERENCE_CACHE_BYTES:
                break
            names += self.watched(end)
            total, end = total + size, end + 1
        self.kept_until = max(end, group + 1)
        if not names:
            return  # this group alone is too large: `rows` reads it batch by batch
        self.kept = {name: [] for name in names}
        modules = layers_by_name(self.original, names)
        for index, batch in enumerate(self.batches):
            mask = token_mask(batch)
            for name in names:
                self.kept[name].append([])
            forward_until(self.original, batch, index, modules, self.order.calls,
                          lambda name, module, x: self.kept[name][-1].append(input_rows(module, x, mask)))

    def _bytes(self, name: str) -> int:
        """Estimated bytes of a layer's input rows over all batches (the probe batch's times the
        number of batches; a k x k conv reads stride^2 input pixels per output position)."""
        module = self.original.get_submodule(name)
        positions = self.order.positions[name]
        if isinstance(module, nn.Conv2d):
            width = module.in_channels
            if module.kernel_size != (1, 1):
                positions *= module.stride[0] * module.stride[1]
        else:
            width = module.weight.shape[1] if isinstance(module, nn.Linear) else module.weight.shape[0]
        return positions * width * module.weight.element_size() * len(self.batches)


def _paired_input_stats(originals: _OriginalInputs, working: nn.Module, group: int,
                        batches: list[Any]) -> dict[str, PairedStats]:
    """Each layer of group `group`: the moments of its (x, x_hat) input pairs over every batch;
    layers that see the same rows share one accumulator (query, key and value are summed once)."""
    watched = originals.watched(group)
    shared = {name: PairedStats() for name in watched}
    for index, batch in enumerate(batches):
        mask = token_mask(batch)
        seen_original = originals.rows(group, index, batch)
        calls = {name: 0 for name in watched}

        def pair(name: str, module: nn.Module, x_hat: torch.Tensor) -> None:
            shared[name].add(seen_original[name][calls[name]], input_rows(module, x_hat, mask))
            calls[name] += 1

        forward_until(working, batch, index, layers_by_name(working, watched), originals.order.calls, pair)
        for name in watched:
            if not shared[name].finite():
                raise ValueError(f"calibration batch {index}: NaN/Inf reached layer {name!r}")
    originals.release(group)
    return {name: shared[leader] for name, leader in originals.leaders[group].items()}


class _Fitter:
    """The closed-form fits of one layer from its statistics (settings resolved once)."""

    def __init__(self, refit: str, damping: float, refit_damping: float, n_iter: int):
        self.refit, self.damping, self.refit_damping, self.n_iter = refit, damping, refit_damping, n_iter

    def fit(self, dense: nn.Module, row: LayerPlan, stats: PairedStats) -> LowRankModule:
        layer_class = entry_for(dense).layer_class
        layer = layer_class.like(dense, row.rank, row.name)
        try:
            if isinstance(layer, TuckerConv2d):
                self._fit_tucker(dense, layer, row.name, stats)
            else:
                self._fit_svd(dense, layer, row.name, stats)
        except WhiteningError as error:
            raise ValueError(f"layer {row.name!r}: {error}") from None
        return layer

    def _fit_svd(self, dense: nn.Module, layer: LowRankModule, name: str, stats: PairedStats) -> None:
        weight = dense.weight[:, :, 0, 0] if isinstance(dense, nn.Conv2d) else dense_linear_weight(dense)
        check_finite(weight, name)
        w = weight.detach().to(torch.float64)
        b = None if dense.bias is None else dense.bias.detach().to(torch.float64)
        covariance, cross = stats.decomposed.covariance(), stats.cross()
        if self.refit == "joint":
            first, second, bias = reduced_rank_fit(w, b, covariance, cross, layer.rank, stats.decomposed.mean(),
                                                   stats.original_mean(), self.damping)
        else:
            first, second = whitened_svd_split(w, covariance, layer.rank, self.damping)
            bias = b
            if self.refit == "last":
                # z = A x_hat, y = W x + b: every moment the least squares needs follows from the pairs.
                z_mean = first @ stats.decomposed.mean() if b is not None else None
                y_cross = w @ cross @ first.T
                if b is not None:
                    y_cross = y_cross + torch.outer(b, z_mean)
                y_mean = w @ stats.original_mean() + b if b is not None else None
                second, bias = least_squares_last_factor(first @ covariance @ first.T, y_cross, second, z_mean,
                                                         y_mean, self.refit_damping)
        assign(layer.first.weight, first)
        assign(layer.second.weight, second)
        if bias is not None:
            assign(layer.second.bias, bias)

    def _fit_tucker(self, dense: nn.Conv2d, layer: TuckerConv2d, name: str, stats: PairedStats) -> None:
        check_finite(dense.weight, name)
        u_in, core, u_out = whitened_tucker2(dense.weight, stats.decomposed.covariance(), *layer.rank,
                                             n_iter=self.n_iter, damping=self.damping)
        assign(layer.first.weight, u_in.T)
        assign(layer.core.weight, core)
        assign(layer.last.weight, u_out)
        if dense.bias is not None:
            assign(layer.last.bias, dense.bias)

    def refit_tucker_last(self, original: nn.Module, working: nn.Module, layers: dict[str, TuckerConv2d],
                          order: CallOrder, batches: list[Any]) -> None:
        """Re-solve each Tucker-2 layer's last 1x1 (and bias) against the original conv's output,
        from one more streamed pass: y from the original model, z from the new layer's core."""
        if not layers:
            return
        stats = {name: PairedStats() for name in layers}
        cores = {name: layer.core for name, layer in layers.items()}
        for index, batch in enumerate(batches):
            outputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
            forward_until(original, batch, index, layers_by_name(original, layers), order.calls,
                          lambda name, module, y: outputs[name].append(_pixels(y)), outputs=True)
            calls = {name: 0 for name in layers}

            def pair(name: str, module: nn.Module, z: torch.Tensor) -> None:
                stats[name].add(outputs[name][calls[name]], _pixels(z))
                calls[name] += 1

            forward_until(working, batch, index, cores, order.calls, pair, outputs=True)
        for name, layer in layers.items():
            item = stats[name]
            if not item.finite():
                raise ValueError(f"layer {name!r}: NaN/Inf in the calibration outputs")
            has_bias = layer.last.bias is not None
            try:
                last, bias = least_squares_last_factor(
                    item.decomposed.covariance(), item.cross(), layer.last.weight[:, :, 0, 0],
                    item.decomposed.mean() if has_bias else None, item.original_mean() if has_bias else None,
                    self.refit_damping)
            except WhiteningError as error:
                raise ValueError(f"layer {name!r}: {error}") from None
            assign(layer.last.weight, last)
            if has_bias:
                assign(layer.last.bias, bias)


def _pixels(feature_map: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> rows [N*H*W, C]."""
    return feature_map.movedim(1, -1).reshape(-1, feature_map.shape[1])
