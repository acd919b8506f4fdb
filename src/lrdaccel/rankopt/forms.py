"""The form of a decomposed layer, chosen by timing: how an SVD layer runs, and whether a
Tucker-2 core is branched.

A 1x1 SVDConv2d can run as two 1x1 convs or as one product over channels through a
channels-last view (`SVDConv2d.set_form`): the same weights and math, different kernels. In
eager PyTorch which one is faster depends on the shapes and memory format, so the search times
the "linear" form at the rank it chose and keeps it where it saves more than the noise margin.
Compiled runtimes (inductor, ONNX Runtime) rewrite both into the same kernels, so there the
search leaves the form alone.

The choice is recorded in the plan and applied by lrdaccel.planning.forms.

A Tucker-2 core can also be a grouped conv of N branches (`BranchedTuckerConv2d`): N times fewer
core weights at the same ranks, so within the same parameters it takes larger ranks, and a
grouped conv may run faster or slower than a dense one of the same size. With
`SearchSettings.try_branches` > 1 the search times the branched core at the ranks that fit the
parameters of the Tucker-2 rank it chose, and keeps it where faster.

A merged row is timed as its whole bottleneck branch (`timing_chain`) at pairs of inner widths.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

from torch import nn

from lrdaccel.factorize.branched import branched_ranks
from lrdaccel.factorize.ranks import Rank
from lrdaccel.layers import SVDConv2d
from lrdaccel.layers.merged import BottleneckChain
from lrdaccel.planning import LayerPlan
from lrdaccel.planning.forms import LINEAR
from lrdaccel.rankopt.search import Choice


def linear_form_possible(dense: nn.Module, kind: str, rank: Rank) -> bool:
    """Whether `dense` decomposed as `kind` at `rank` is a 1x1 SVDConv2d that can run as "linear"."""
    if kind != "svd" or not isinstance(dense, nn.Conv2d):
        return False
    return SVDConv2d.like(dense, rank).linear_form_allowed() is None


def choose_form(choice: Choice, measure_form: Callable[[Rank, str], float], min_gain: float) -> Choice:
    """`choice` in the "linear" form where that is faster at its rank by more than `min_gain`
    (a fraction of its time), else unchanged. `measure_form(rank, form)` gives milliseconds."""
    linear_ms = measure_form(choice.rank, LINEAR)
    conv_ms = choice.time_ms
    if linear_ms >= conv_ms * (1 - min_gain):
        choice.reason += f"; as convs ({conv_ms:.3g} ms; one linear over channels-last: {linear_ms:.3g} ms)"
        return choice
    choice.form, choice.time_ms = LINEAR, linear_ms
    choice.reason += (f"; runs as one linear over channels-last ({linear_ms:.3g} ms vs {conv_ms:.3g} ms as convs, "
                      f"{choice.time_original_ms / linear_ms:.2f}x faster than the original)")
    return choice


def branch_counts(most: int) -> list[int]:
    """2, 4, 8, ... up to `most`."""
    return [2 ** i for i in range(1, most.bit_length()) if 2 ** i <= most]


def choose_branches(choice: Choice, row: LayerPlan, beta: float, counts: list[int],
                    measure_branched: Callable[[Rank, int], float], min_gain: float) -> Choice:
    """`choice` (a Tucker-2 rank of `row`) as a branched core within its parameters where that is
    faster by more than `min_gain`, else unchanged. `measure_branched(rank, branches)` gives ms."""
    kept = row.with_rank(choice.rank, "").params_after
    if kept >= row.params_before:
        return choice
    shape = row.shape
    tried = []
    for branches in counts:
        rank = branched_ranks(shape["in"], shape["out"], math.prod(shape["kernel"]), row.params_before / kept,
                              branches, beta)
        if 0 in rank:
            continue
        tried.append((measure_branched(rank, branches), branches, rank))
    best = min(tried, default=None)
    if best is None or best[0] >= choice.time_ms * (1 - min_gain):
        detail = ", ".join(f"{n} branches {r[0]}x{r[1]}: {ms:.3g} ms" for ms, n, r in tried)
        choice.reason += f"; plain Tucker-2 core kept ({detail or 'no branched rank fits'})"
        return choice
    ms, branches, rank = best
    choice.reason += (f"; core in {branches} branches at ({rank[0]}, {rank[1]}) within the same parameters "
                      f"({ms:.3g} ms vs {choice.time_ms:.3g} ms, {choice.time_original_ms / ms:.2f}x faster than "
                      f"the original)")
    choice.rank, choice.branches, choice.time_ms = rank, branches, ms
    return choice


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
