"""Rank search with an injected fake timer: the rules, the bounds, the budget, and the plan it returns."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lrdaccel as lrd
from lrdaccel.factorize import svd_params, tucker2_params
from lrdaccel.rankopt.choose import NOT_REACHED


class FakeTimer:
    """Times from a function of the job; records every call."""

    def __init__(self, layer_ms, original_ms: float = 100.0, sleep_s: float = 0.0):
        self.layer_ms, self.original_ms, self.sleep_s = layer_ms, original_ms, sleep_s
        self.calls = []

    def __call__(self, job) -> float:
        self.calls.append(job.rank)
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return self.original_ms if job.rank is None else self.layer_ms(job.rank)

    @property
    def ranks(self):
        return [r for r in self.calls if r is not None]


def staircase(rank, step=256, low=10.0, high=13.0):
    """Flat up to `step`, then a jump: the GPU-like shape of Fig. 2."""
    return low if rank <= step else high


def linear_model(width=1024):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width))


def optimize(model, plan, timer, inputs=None, **kwargs):
    inputs = torch.randn(8, model[0].in_features) if inputs is None else inputs
    kwargs.setdefault("cache", False)
    kwargs.setdefault("budget_s", None)
    return lrd.optimize_ranks(model, plan, inputs, timer=timer, **kwargs)


def test_staircase_snaps_to_the_step():
    model = linear_model()
    plan = lrd.plan(model, ranks={"0": 300})
    timer = FakeTimer(staircase)
    row = optimize(model, plan, timer)["0"]
    assert row.kind == "svd" and row.rank == 256
    assert (row.time_ms, row.time_ratio_rank_ms, row.time_original_ms) == (10.0, 13.0, 100.0)
    assert row.ratio_rank == 300 and "256" in row.reason
    assert 256 in timer.ranks and 257 in timer.ranks  # refined around the best, not assumed


def test_smooth_curve_keeps_the_ratio_rank():
    model = linear_model()
    plan = lrd.plan(model, ranks={"0": 300})
    row = optimize(model, plan, FakeTimer(lambda r: 1.0 + 0.05 * r))["0"]
    assert row.rank == 300 and row.time_ms == row.time_ratio_rank_ms
    assert "ratio rank 300 kept" in row.reason


def test_smooth_curve_keeps_the_ratio_rank_for_tucker():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1))
    plan = lrd.plan(model, ratio=2.0)
    ratio_rank = plan["0"].rank

    def by_params(rank):
        return 0.5 + 1e-5 * tucker2_params(256, 256, 9, *rank)

    row = optimize(model, plan, FakeTimer(by_params), inputs=torch.randn(2, 256, 8, 8))["0"]
    assert row.rank == ratio_rank


def test_tucker_searches_pairs_and_snaps_rank_in_to_the_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1))
    plan = lrd.plan(model, ratio=2.0)
    r_in, r_out = plan["0"].rank
    budget = tucker2_params(256, 256, 9, r_in, r_out)
    timer = FakeTimer(lambda rank: staircase(rank[0], step=r_in - 2))
    row = optimize(model, plan, timer, inputs=torch.randn(2, 256, 8, 8))["0"]
    assert isinstance(row.rank, tuple) and row.rank[0] <= r_in - 2
    assert row.params_after <= budget
    # rank_out grew into the budget rank_in freed: more capacity than the square pair at the step
    assert row.params_after > tucker2_params(256, 256, 9, r_in - 2, r_in - 2)
    assert any(a != b for a, b in timer.ranks)  # pairs off the diagonal were tried


def test_keeps_the_original_when_decomposed_is_slower():
    model = linear_model()
    plan = lrd.plan(model, ratio=2.0)
    result = optimize(model, plan, FakeTimer(lambda r: 5.0 + r, original_ms=1.0))
    row = result["0"]
    assert row.kind == "keep" and row.rank is None
    assert row.time_ms == row.time_original_ms == 1.0
    assert row.params_after == row.params_before
    assert row.reason.startswith("kept:")


def test_max_growth_is_respected():
    model = linear_model()
    plan = lrd.plan(model, ranks={"0": 300})
    p_ratio = svd_params(1024, 1024, 300)
    flat = FakeTimer(lambda r: 10.0)
    row = optimize(model, plan, flat, max_growth=0.1)["0"]
    assert all(svd_params(1024, 1024, r) <= 1.1 * p_ratio for r in flat.ranks)
    assert max(flat.ranks) > 300  # it did look above R
    assert p_ratio < row.params_after <= 1.1 * p_ratio  # same time, more capacity: worth taking

    none = FakeTimer(lambda r: 10.0)
    row = optimize(model, plan, none)["0"]
    assert max(none.ranks) <= 300 and row.rank == 300


def test_time_budget_bounds_each_layer():
    model = linear_model()
    plan = lrd.plan(model, ranks={"0": 300})
    unbounded = FakeTimer(staircase)
    optimize(model, plan, unbounded)
    sleep_s, budget_s = 0.02, 0.1
    bounded = FakeTimer(staircase, sleep_s=sleep_s)
    row = optimize(model, plan, bounded, budget_s=budget_s)["0"]
    # each call costs at least sleep_s; the budget is checked before every optional call
    assert len(bounded.calls) <= 1 + math.ceil(budget_s / sleep_s)
    assert len(bounded.calls) < len(unbounded.calls)
    assert "budget" in row.reason
    assert bounded.calls[:2] == [None, 300]  # the original and the ratio rank are always measured


def test_budget_tries_hardware_friendly_ranks_first():
    model = linear_model()
    plan = lrd.plan(model, ranks={"0": 300})
    timer = FakeTimer(staircase)
    optimize(model, plan, timer)
    first = timer.ranks[1:6]  # after R itself; searched range is [150, 300]
    assert sorted(first[:2]) == [192, 256]  # the multiples of 64, then of 32
    assert all(r % 32 == 0 and r % 64 != 0 for r in first[2:])


def test_identical_layers_are_timed_once():
    torch.manual_seed(0)
    one = nn.Sequential(nn.Linear(512, 512))
    two = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))
    single, double = FakeTimer(staircase), FakeTimer(staircase)
    x = torch.randn(4, 512)
    optimize(one, lrd.plan(one, ratio=1.5), single, inputs=x)
    result = optimize(two, lrd.plan(two, ratio=1.5), double, inputs=x)
    assert len(double.calls) == len(single.calls)
    assert result["0"].rank == result["1"].rank
    assert result.meta["rank_optimization"]["distinct_layers"] == 1


def test_layers_the_inputs_never_reach_keep_their_ratio_rank():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(256, 256), nn.Linear(256, 256)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = Branchy()
    plan = lrd.plan(model, ratio=2.0)
    timer = FakeTimer(staircase)
    result = lrd.optimize_ranks(model, plan, torch.randn(4, 256), timer=timer, cache=False)
    row = result["unused"]
    assert row.rank == plan["unused"].rank and row.reason == NOT_REACHED and row.time_ms is None
    assert result["used"].time_ms is not None


def test_paper_rule_takes_the_rank_below_the_largest_drop():
    model = linear_model()
    plan = lrd.plan(model, ranks={"0": 300})
    timer = FakeTimer(lambda r: staircase(r, step=251))
    row = optimize(model, plan, timer, rule="paper", max_growth=0.5)["0"]
    assert row.rank == 251 and "paper rule" in row.reason
    assert max(timer.ranks) <= 300  # never above R, whatever max_growth says


def test_paper_rule_gives_up_capacity_on_a_smooth_curve_where_tradeoff_does_not():
    model = linear_model()
    plan = lrd.plan(model, ranks={"0": 300})
    smooth = lambda r: 1.0 + 0.05 * r  # noqa: E731
    paper = optimize(model, plan, FakeTimer(smooth), rule="paper")["0"]
    tradeoff = optimize(model, plan, FakeTimer(smooth))["0"]
    assert paper.rank < 300 and tradeoff.rank == 300


def test_higher_tradeoff_keeps_more_capacity():
    model = linear_model()
    plan = lrd.plan(model, ranks={"0": 300})
    # a small step at 256: 5% time for 15% params; worth it only if params are cheap
    step = lambda r: 10.0 if r <= 256 else 10.5 + 0.001 * r  # noqa: E731
    cheap = optimize(model, plan, FakeTimer(step), tradeoff=0.1)["0"]
    dear = optimize(model, plan, FakeTimer(step), tradeoff=1.0)["0"]
    assert cheap.rank == 256 and dear.rank == 300


def test_model_and_plan_are_not_changed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 1))
    model.train()
    plan = lrd.plan(model, ratio=2.0)
    before_plan = plan.to_json()
    before_state = copy.deepcopy(model.state_dict())
    optimize(model, plan, FakeTimer(lambda r: 1.0), inputs=torch.randn(2, 8, 6, 6))
    assert plan.to_json() == before_plan
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())
    assert type(model[0]) is nn.Conv2d


def test_timer_sees_the_captured_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 1))
    model = model.to(memory_format=torch.channels_last)
    seen = {}

    def timer(job):
        seen[job.rank is None and "orig" or "dec", tuple(job.input.shape)] = job.input.memory_format
        return 1.0

    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    lrd.optimize_ranks(model, lrd.plan(model, ratio=2.0, min_rank=1), x, timer=timer, cache=False,
                       objective="train")
    shapes = {shape for _, shape in seen}
    assert shapes == {(2, 8, 10, 10), (2, 16, 5, 5)}
    assert set(seen.values()) == {"channels_last"}


@pytest.mark.parametrize("kwargs, message", [
    ({"objective": "serve"}, "objective"),
    ({"rule": "fastest"}, "rule"),
    ({"tradeoff": -1.0}, "tradeoff"),
    ({"max_growth": float("nan")}, "max_growth"),
    ({"budget_s": 0}, "budget_s"),
    ({"lowest": 0.0}, "lowest"),
    ({"dtype": "int32"}, "dtype"),
    ({"cache": 3}, "cache"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    model = linear_model(64)
    with pytest.raises(ValueError, match=message):
        optimize(model, lrd.plan(model, ratio=2.0), FakeTimer(lambda r: 1.0), **kwargs)


def test_a_plan_for_another_model_is_rejected():
    model, other = linear_model(64), linear_model(32)
    with pytest.raises(ValueError, match="another architecture"):
        optimize(model, lrd.plan(other, ratio=2.0), FakeTimer(lambda r: 1.0))


def test_paper_rule_on_a_tucker_layer_with_a_clamped_side():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3))  # a ResNet stem: rank_in is capped at 3
    plan = lrd.plan(model, ratio=2.0)
    r_in, r_out = plan["0"].rank
    assert r_in == 3
    timer = FakeTimer(lambda rank: staircase(rank[1], step=r_out - 2))
    row = optimize(model, plan, timer, inputs=torch.randn(1, 3, 16, 16), rule="paper")["0"]
    assert row.rank == (3, r_out - 2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    conv=st.booleans(),
    c_in=st.integers(8, 160), c_out=st.integers(8, 160),
    ratio=st.floats(1.3, 4.0),
    rule=st.sampled_from(["tradeoff", "paper"]),
    tradeoff=st.floats(0.0, 3.0),
    max_growth=st.floats(0.0, 0.3),
    slope=st.floats(0.0, 0.2), step_at=st.integers(1, 160), jump=st.floats(0.0, 5.0),
    original=st.floats(0.5, 30.0),
)
def test_any_choice_is_within_bounds_and_never_slower_than_the_original(
        conv, c_in, c_out, ratio, rule, tradeoff, max_growth, slope, step_at, jump, original):
    torch.manual_seed(0)
    layer = nn.Conv2d(c_in, c_out, 3, padding=1) if conv else nn.Linear(c_in, c_out)
    model = nn.Sequential(layer)
    plan = lrd.plan(model, ratio=ratio)
    source = plan["0"]

    def ms(rank):
        r = rank if isinstance(rank, int) else rank[0] + rank[1]
        return 1.0 + slope * r + (jump if r > step_at else 0.0)

    x = torch.randn(1, c_in, 4, 4) if conv else torch.randn(2, c_in)
    row = optimize(model, plan, FakeTimer(ms, original_ms=original), inputs=x, rule=rule, tradeoff=tradeoff,
                   max_growth=max_growth)["0"]
    if not source.decomposed:
        assert row == source
        return
    assert row.time_original_ms == original and row.time_ratio_rank_ms == ms(source.rank)
    if row.kind == "keep":
        assert row.time_ms == original and row.rank is None
        return
    assert row.time_ms == ms(row.rank) < original
    ranks = row.rank if conv else (row.rank,)
    limits = (c_in, c_out) if conv else (min(c_in, c_out),)
    assert all(1 <= r <= limit for r, limit in zip(ranks, limits))
    growth = 0.0 if rule == "paper" else max_growth
    assert row.params_after <= source.params_after * (1 + growth) + 1e-9
    assert row.rank == source.rank or row.macs_after < row.macs_before


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), None])
def test_a_custom_timer_giving_no_usable_time_is_a_clear_error(bad):
    model = linear_model(64)
    plan = lrd.plan(model, ranks={"0": 16})
    with pytest.raises(ValueError, match=r"the timer gave .* ms for Linear 64x64.*finite number of milliseconds > 0"):
        optimize(model, plan, FakeTimer(lambda rank: bad))


@pytest.mark.parametrize("steep", [False, True])
def test_an_allocated_plan_trades_time_against_the_layers_loss_not_its_parameters(steep):
    model = linear_model()
    plan = lrd.plan(model, ranks={"0": 300})
    ranks = list(range(150, 601))
    # an insensitive layer: its loss barely rises below R; a sensitive one: it rises fast
    loss = [math.exp((300 - r) / 20) if steep else 1.0 + 1e-3 * (600 - r) / 300 for r in ranks]
    plan.meta["sensitivity"] = {"0": {"weight": 1.0, "energy": 1.0, "positions": 8, "ranks": ranks, "loss": loss}}
    smooth = FakeTimer(lambda r: 1.0 + 0.05 * r)
    row = optimize(model, plan, smooth)["0"]
    if steep:
        assert row.rank == 300 and "ratio rank 300 kept" in row.reason
    else:  # time saved is now worth it: parameters alone kept R (test_smooth_curve_keeps_the_ratio_rank)
        assert row.rank < 300 and "loss" in row.reason, row.reason


def test_layers_with_their_own_sensitivity_choose_alone_but_are_timed_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))
    plan = lrd.plan(model, ranks={"0": 128, "1": 128})
    ranks = list(range(64, 257))
    plan.meta["sensitivity"] = {
        "0": {"ranks": ranks, "loss": [1.0 + 1e-3 * (256 - r) / 128 for r in ranks]},
        "1": {"ranks": ranks, "loss": [math.exp((128 - r) / 10) for r in ranks]},
    }
    timer = FakeTimer(lambda r: 1.0 + 0.05 * r)
    optimized = optimize(model, plan, timer, inputs=torch.randn(8, 512))
    assert optimized["0"].rank < 128 and optimized["1"].rank == 128
    assert len(timer.ranks) == len(set(timer.ranks))  # the second layer's times came from the cache


def test_tucker_layers_take_a_branched_core_where_it_is_faster_within_the_same_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1))
    plan = lrd.plan(model, ratio=2.0)

    class BranchTimer(FakeTimer):
        def __call__(self, job):
            self.calls.append((job.rank, job.branches))
            if job.rank is None:
                return 100.0
            return 10.0 / job.branches if job.branches > 1 and fast else 10.0 + job.branches

    for fast in (True, False):
        timer = BranchTimer(None)
        row = optimize(model, plan, timer, inputs=torch.randn(2, 64, 8, 8), try_branches=4)["0"]
        branched = [(rank, n) for rank, n in timer.calls if n > 1]
        assert sorted({n for _, n in branched}) == [2, 4]
        if fast:
            assert row.kind == "tucker2_branched" and row.branches == 4 and row.time_ms == 2.5
            assert all(r % 4 == 0 for r in row.rank) and "4 branches" in row.reason
            # flat Tucker-2 times keep the ratio rank; the branched core keeps its parameters, no more
            assert 0.9 * plan["0"].params_after < row.params_after <= plan["0"].params_after
            decomposed = copy.deepcopy(model)
            lrd.decompose(decomposed, lrd.Plan([row]))
            assert isinstance(decomposed[0], lrd.BranchedTuckerConv2d) and decomposed[0].branches == 4
        else:
            assert row.kind == "tucker2" and "plain Tucker-2 core kept" in row.reason
    with pytest.raises(ValueError, match="try_branches"):
        lrd.SearchSettings(try_branches=0)
