"""Building the new modules of a plan (the model untouched) and swapping them in, all or nothing."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from lrdaccel._modules import parent_and_attr
from lrdaccel.calibration.statistics import InputStats
from lrdaccel.decomposition.config import DecomposeConfig
from lrdaccel.decomposition.merge_build import build_merged, merged_like
from lrdaccel.decomposition.merge_statistics import BlockStats
from lrdaccel.decomposition.narrow_build import narrowed_like
from lrdaccel.layers import LowRankModule
from lrdaccel.layers.base import warn_plain
from lrdaccel.layers.registry import layer_class_for
from lrdaccel.planning import Plan
from lrdaccel.planning.validation import validate_plan


def build_modules(
    model: nn.Module,
    plan: Plan,
    factorize: bool = True,
    config: DecomposeConfig | None = None,
    input_stats: dict[str, InputStats] | None = None,
    progress: bool = False,
    block_stats: dict[str, BlockStats] | None = None,
) -> dict[str, nn.Module]:
    """New modules for every row that changes the model, by qualified name, the model untouched
    (a merged row gives its three convs, two BatchNorms and, where it folds into it, bn3).

    factorize=False builds the right shapes only (for loading weights or timing). With
    `input_stats` (from `lrdaccel.calibration.collect_input_stats`) each layer is whitened by its
    inputs' covariance; a layer the calibration never reached falls back to the plain
    factorization with a warning naming it. Merged rows need `block_stats`
    (`lrdaccel.decomposition.merge_statistics.collect_block_stats`) unless both their sides are linear.
    Narrow rows are built here only with factorize=False (their shapes); their weights depend on
    the partly narrowed model, so `decompose` fills them in sequence after the swap
    (lrdaccel.decomposition.narrow_apply).
    """
    validate_plan(model, plan)
    config = config or DecomposeConfig()
    built = {}
    rows = plan.changed
    for row in tqdm(rows, desc="decomposing", unit="layer", disable=not progress or not rows):
        if row.kind == "narrow":
            if not factorize:
                built.update(narrowed_like(model, row))
            continue
        if row.kind == "merged":
            if not factorize:
                built.update(merged_like(model, row))
            else:
                built.update(build_merged(model, row, (block_stats or {}).get(row.name), config.damping))
            continue
        dense = model.get_submodule(row.name)
        layer_class = layer_class_for(dense, row.kind)
        form = {"branches": row.branches} if row.kind == "tucker2_branched" else {}
        if not factorize:
            built[row.name] = layer_class.like(dense, row.rank, row.name, **form)
            continue
        options = {"n_iter": config.n_iter, **form} if row.kind in ("tucker2", "tucker2_branched") else {}
        if input_stats is not None:
            stats = input_stats.get(row.name)
            if stats is None or not stats.count:
                warn_plain(row.name, "no calibration input reached it", layer_class.plain_method)
            else:
                options.update(input_covariance=stats.covariance(), damping=config.damping)
        built[row.name] = layer_class.from_dense(dense, row.rank, row.name, **options)
    return built


def swap_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put each replacement in place; return the originals. All or nothing."""
    originals: dict[str, nn.Module] = {}
    try:
        for name, module in replacements.items():
            parent, attr = parent_and_attr(model, name)
            originals[name] = getattr(parent, attr)
            setattr(parent, attr, module)
    except BaseException:
        for name, module in originals.items():
            parent, attr = parent_and_attr(model, name)
            setattr(parent, attr, module)
        raise
    return originals


@torch.no_grad()
def relative_error(dense: nn.Module, low_rank: LowRankModule) -> float:
    original = dense.weight.detach().to(torch.float64)
    approx = low_rank.dense_weight().to(torch.float64)  # in the dense layer's own layout
    norm = original.norm()
    return float((original - approx).norm() / norm) if norm > 0 else float((original - approx).norm())
