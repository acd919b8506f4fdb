"""Branched Tucker-2: grouped core == sum of branches, full-rank equivalence, exact counts, and the
plan -> decompose -> save/load -> freeze path."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lrdaccel as lrd
from lrdaccel.factorize.branched import (
    branched_dense,
    branched_full_rank,
    branched_params,
    branched_ranks,
    branched_tucker2,
)
from lrdaccel.io import plan_of
from lrdaccel.layers.branched import BranchedTuckerConv2d


def relative(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def test_the_grouped_core_computes_the_sum_of_its_branches():
    dense = nn.Conv2d(16, 24, 3, stride=2, padding=1)
    layer = BranchedTuckerConv2d.like(dense, (8, 12), branches=4)
    for parameter in layer.parameters():
        nn.init.normal_(parameter)
    x = torch.randn(2, 16, 9, 9)
    total = 0
    for n in range(4):  # branch n: inputs 2n..2n+1 of the first 1x1, outputs 3n..3n+2 of the core
        u = layer.first.weight[2 * n:2 * n + 2]
        core = layer.core.weight[3 * n:3 * n + 3]
        v = layer.last.weight[:, 3 * n:3 * n + 3]
        total = total + F.conv2d(F.conv2d(F.conv2d(x, u), core, stride=2, padding=1), v)
    assert relative(layer(x), total + layer.last.bias[None, :, None, None]) < 1e-6
    assert relative(layer(x), F.conv2d(x, layer.dense_weight(), layer.bias, stride=2, padding=1)) < 1e-6


@pytest.mark.parametrize("branches", [1, 2, 4])
def test_at_full_rank_the_branched_layer_reproduces_the_conv(branches):
    torch.manual_seed(0)
    dense = nn.Conv2d(16, 24, 3, padding=1, padding_mode="reflect")
    rank = branched_full_rank(16, 24, branches)
    assert rank == (16, 24 * branches)
    layer = BranchedTuckerConv2d.from_dense(dense, rank, "conv", branches=branches)
    x = torch.randn(2, 16, 7, 7)
    assert relative(layer(x), dense(x)) < 1e-5
    assert relative(layer.to_dense()(x), dense(x)) < 1e-5


def test_a_block_term_kernel_is_recovered_below_full_rank():
    torch.manual_seed(0)
    u, core, v = torch.randn(16, 8, dtype=torch.float64), torch.randn(12, 4, 3, 3, dtype=torch.float64), \
        torch.randn(24, 12, dtype=torch.float64)
    kernel = branched_dense(u, core, v, 2)
    start, fitted = (branched_dense(*branched_tucker2(kernel, 8, 12, 2, n_iter=n), 2) for n in (0, 50))
    generic = torch.randn(24, 16, 3, 3, dtype=torch.float64)
    generic_fit = branched_dense(*branched_tucker2(generic, 8, 12, 2, n_iter=50), 2)
    # ALS improves on the deflation start; a kernel that is a 2-term block sum fits far better than
    # a generic one at the same ranks (ALS may stop in a local minimum, so not to round-off).
    assert relative(fitted, kernel) < relative(start, kernel)
    assert relative(fitted, kernel) < 0.5 * relative(generic_fit, generic)


def test_parameter_counts_and_ratio_ranks_are_exact():
    dense = nn.Conv2d(64, 64, 3)
    rank = branched_ranks(64, 64, 9, 2.0, 2)
    assert rank == (50, 50)  # N=2: 50 = 2*25; 2*26 would exceed 64*64*9/2
    assert branched_params(64, 64, 9, 50, 50, 2) == 64 * 50 + 9 * 50 * 25 + 50 * 64 <= 64 * 64 * 9 / 2
    assert branched_params(64, 64, 9, 52, 52, 2) > 64 * 64 * 9 / 2
    layer = BranchedTuckerConv2d.like(dense, rank, branches=2)
    assert layer.factor_params() == branched_params(64, 64, 9, 50, 50, 2)
    assert layer.core.groups == 2 and layer.core.weight.shape == (50, 25, 3, 3)
    assert branched_ranks(3, 64, 9, 2.0, 4) == (0, 0)  # 3 input channels cannot feed 4 branches


@pytest.mark.parametrize("rank, message", [((50, 51), "multiples of 2 branches"), ((0, 2), "multiples"),
                                           ((130, 50), "at most 64 inputs")])
def test_bad_branched_ranks_are_refused(rank, message):
    with pytest.raises(ValueError, match=f"layer 'c': .*{message}"):
        BranchedTuckerConv2d.like(nn.Conv2d(64, 64, 3), rank, "c", branches=2)


def test_plan_decompose_save_load_and_freeze_a_branched_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1, bias=False))
    plan = lrd.plan(model, ratio=2.0, branches=2)
    assert [(r.kind, r.rank) for r in plan] == [("tucker2_branched", (16, 24)), ("tucker2_branched", (50, 50))]
    original = copy.deepcopy(model)
    report = lrd.decompose(model, plan)
    assert [type(m).__name__ for m in (model[0], model[2])] == ["BranchedTuckerConv2d"] * 2
    assert [r.params_after for r in report.layers] == [row.params_after for row in plan]
    assert [(r.name, r.kind, r.rank, r.branches) for r in plan_of(model)] == \
        [(r.name, r.kind, r.rank, r.branches) for r in plan]
    lrd.save(model, tmp_path)
    loaded = lrd.load(tmp_path, original)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(loaded(x), model(x))
    freezer = lrd.SequentialFreezer(model, schedule="static")
    assert freezer.report().layers == {"0": (1,), "2": (1,)}


def test_whitened_branched_fit_lowers_output_error():
    torch.manual_seed(0)
    dense = nn.Conv2d(32, 32, 3, padding=1)
    mix = torch.randn(32, 32) * torch.logspace(0, -2, 32)  # inputs in a few strong directions
    x = torch.einsum("ij,bjhw->bihw", mix, torch.randn(64, 32, 6, 6))
    covariance = x.movedim(1, -1).reshape(-1, 32).T @ x.movedim(1, -1).reshape(-1, 32) / (64 * 36)
    plain = BranchedTuckerConv2d.from_dense(dense, (12, 12), branches=2)
    whitened = BranchedTuckerConv2d.from_dense(dense, (12, 12), branches=2, input_covariance=covariance)
    assert relative(whitened(x), dense(x)) < 0.7 * relative(plain(x), dense(x))
