"""Real timing (no fakes) on small models: valid plans, the whole-model check, the staircase, capture.

Nothing here asserts a measured time: the machine is shared and noisy.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.rankopt import (BenchmarkTimer, capture_inputs, compare_end_to_end, measure_staircase,
                              plot_staircase, timing_table)


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


FAST = BenchmarkTimer(min_run_time=0.005)


def assert_valid(plan: lrd.Plan, source: lrd.Plan) -> None:
    for row, before in zip(plan, source):
        assert row.name == before.name
        if not before.decomposed:
            assert row == before
            continue
        assert row.time_original_ms > 0 and row.time_ratio_rank_ms > 0 and row.time_ms > 0
        if row.kind == "keep":
            assert row.rank is None and row.time_ms == row.time_original_ms
            continue
        ranks = row.rank if isinstance(row.rank, tuple) else (row.rank,)
        limits = ((row.shape["in"], row.shape["out"]) if row.kind == "tucker2"
                  else (min(row.shape["in"], row.shape["out"]),))
        assert all(1 <= r <= limit for r, limit in zip(ranks, limits))
        ratio = before.rank if isinstance(before.rank, tuple) else (before.rank,)
        assert all(r >= math.ceil(0.5 * q) for r, q in zip(ranks, ratio))
        assert row.params_after <= before.params_after  # max_growth 0: never more than the ratio allows
        assert row.macs_after < row.macs_before


@pytest.mark.parametrize("objective", ["infer", "train"])
def test_real_run_gives_a_plan_that_decompose_applies(tmp_path, objective):
    model = small_cnn()
    x = torch.randn(4, 3, 8, 8)
    plan = lrd.plan(model, ratio=2.0)
    optimized = lrd.optimize_ranks(model, plan, x, objective, cache=tmp_path / "t.json", timer=FAST, budget_s=0.5)
    assert_valid(optimized, plan)
    assert "rank" in timing_table(optimized)
    again = lrd.Plan.from_json(optimized.to_json())
    assert [(r.kind, r.rank, r.time_ms) for r in again] == [(r.kind, r.rank, r.time_ms) for r in optimized]

    target = copy.deepcopy(model).eval()
    report = lrd.decompose(target, again)
    assert len(report.layers) == len(optimized.decomposed)
    assert target(x).shape == (4, 10)

    rerun = lrd.optimize_ranks(model, plan, x, objective, cache=tmp_path / "t.json", timer=FAST, budget_s=0.5)
    assert rerun.meta["rank_optimization"]["timed"] == 0
    assert [r.rank for r in rerun] == [r.rank for r in optimized]


def test_default_timer_and_paper_rule_on_a_linear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))
    plan = lrd.plan(model, ratio=2.0)
    optimized = lrd.optimize_ranks(model, plan, torch.randn(16, 128), rule="paper", cache=False, budget_s=0.3,
                                   timer=BenchmarkTimer(min_run_time=0.01))
    assert_valid(optimized, plan)
    assert all(r.rank is None or r.rank <= plan[r.name].rank for r in optimized)


@pytest.mark.parametrize("objective", ["infer", pytest.param("train", marks=pytest.mark.slow)])
def test_end_to_end_comparison_times_every_variant_each_round(objective):
    model = small_cnn()
    x = torch.randn(1, 3, 8, 8)
    plan = lrd.plan(model, ratio=2.0)
    kept = lrd.plan(model, ratio=2.0, exclude=["8", "10"])
    state = copy.deepcopy(model.state_dict())
    report = compare_end_to_end(model, {"ratio": plan, "fewer": kept}, x, objective, rounds=2, min_run_time=0.005)
    assert list(report.times_ms) == ["original", "ratio", "fewer"]
    assert all(len(times) == 2 and min(times) > 0 for times in report.times_ms.values())
    summary = report.summary()
    assert summary["original"]["speedup_median"] == 1.0
    assert summary["ratio"]["ms_min"] <= summary["ratio"]["ms_median"] <= summary["ratio"]["ms_max"]
    assert "speed-up" in str(report)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert type(model[0]) is nn.Conv2d


def test_end_to_end_rejects_bad_arguments():
    model = small_cnn()
    plan = lrd.plan(model, ratio=2.0)
    with pytest.raises(ValueError, match="rounds"):
        compare_end_to_end(model, {"ratio": plan}, torch.randn(1, 3, 8, 8), rounds=0)
    with pytest.raises(ValueError, match="reserved"):
        compare_end_to_end(model, {"original": plan}, torch.randn(1, 3, 8, 8))


def test_staircase_png(tmp_path):
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1)
    stairs = measure_staircase(conv, (2, 32, 6, 6), range(10, 14), cache=False, timer=FAST)
    assert stairs.ranks == [(10, 10), (11, 11), (12, 12), (13, 13)]
    assert len(stairs.times_ms) == 4 and stairs.original_ms > 0
    assert stairs.params == sorted(stairs.params) and stairs.original_params == conv.weight.numel()
    path = plot_staircase(stairs, tmp_path / "plots" / "stairs.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="rank"):
        measure_staircase(conv, (2, 32, 6, 6), [33], cache=False, timer=FAST)


def test_capture_records_shape_dtype_format_and_restores_modes():
    model = small_cnn().to(memory_format=torch.channels_last).train()
    model[1].eval()  # a mixed-mode model must come back exactly as it was
    stats = model[1].running_mean.clone()
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    specs = capture_inputs(model, ["0", "3", "8", "10"], x)
    assert specs["0"].shape == (2, 3, 8, 8) and specs["3"].shape == (2, 16, 8, 8)
    assert specs["8"].shape == (2, 512) and specs["10"].shape == (2, 64)
    assert specs["3"].memory_format == "channels_last" and specs["8"].memory_format == "contiguous"
    assert specs["0"].dtype == torch.float32 and specs["0"].device.type == "cpu"
    assert model.training and not model[1].training and torch.equal(model[1].running_mean, stats)
    assert not any(m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match="nope"):
        capture_inputs(model, ["nope"], x)
