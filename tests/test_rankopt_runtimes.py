"""Rank search per runtime: a real search under `compile` picks and caches; each runtime's times
are cached apart; in eager the 1x1 SVD layers' execution form is timed and applied."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.bench.paper_table import structural_copy
from lrdaccel.layers import SVDConv2d
from lrdaccel.measure.steps import Placement
from lrdaccel.rankopt import compare_end_to_end
from lrdaccel.planning.forms import apply_forms, plan_forms


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 4 * 4, 32)).eval()


class RuntimeTimer:
    """A fake timer: decomposed layers are fast, the "linear" form faster; records each job."""

    def __init__(self):
        self.jobs = []

    def __call__(self, job) -> float:
        self.jobs.append(job)
        if job.rank is None:
            return 50.0
        return 5.0 if job.form == "linear" else 10.0


@pytest.mark.slow
def test_search_under_compile_picks_and_caches(tmp_path):
    model, x, path = tiny_cnn(), torch.randn(2, 16, 4, 4), tmp_path / "timings.json"
    plan = lrd.plan(model, ratio=2.0, min_rank=2)
    first = lrd.optimize_ranks(model, plan, x, runtime="compile", cache=path, budget_s=None, min_run_time=0.01,
                               lowest=0.9)
    info = first.meta["rank_optimization"]
    assert info["runtime"] == "compile" and info["timed"] > 0 and info["forms"] == {}
    for row in first:
        assert row.time_original_ms > 0 and row.reason
        assert row.kind == "keep" or row.time_ms < row.time_original_ms
    keys = list(json.loads(path.read_text())["entries"])
    assert keys and all("|runtime compile|infer|" in key for key in keys)
    again = lrd.optimize_ranks(model, plan, x, runtime="compile", cache=path, budget_s=None, min_run_time=0.01,
                               lowest=0.9)
    assert again.meta["rank_optimization"]["timed"] == 0
    assert again.meta["rank_optimization"]["cache_hits"] == info["timed"]
    assert [(r.kind, r.rank) for r in again] == [(r.kind, r.rank) for r in first]


def test_each_runtime_is_timed_and_cached_apart(tmp_path):
    pytest.importorskip("onnxruntime")
    model, x, path = tiny_cnn(), torch.randn(2, 16, 4, 4), tmp_path / "timings.json"
    plan = lrd.plan(model, ratio=2.0, min_rank=2)
    keys = {}
    for runtime in ("eager", "compile", "onnxruntime"):
        timer = RuntimeTimer()
        optimized = lrd.optimize_ranks(model, plan, x, runtime=runtime, timer=timer, cache=path)
        # nothing another runtime measured is reused: every time here was measured in this runtime
        assert optimized.meta["rank_optimization"]["cache_hits"] == 0 and timer.jobs
        assert {job.runtime for job in timer.jobs} == {runtime}
        entries = set(json.loads(path.read_text())["entries"])
        keys[runtime] = entries - set().union(*keys.values()) if keys else entries
        label = f"onnxruntime {pytest.importorskip('onnxruntime').__version__}" if runtime == "onnxruntime" else runtime
        assert keys[runtime] and all(f"|runtime {label}|" in key for key in keys[runtime])


@pytest.mark.parametrize("runtime, step", [("onnxruntime", 8), ("compile", 16)])
def test_under_compiled_runtimes_only_aligned_ranks_are_candidates(runtime, step):
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
    model, x = tiny_cnn(), torch.randn(2, 16, 4, 4)
    plan = lrd.plan(model, ratio=2.0, min_rank=2)
    timer = RuntimeTimer()
    optimized = lrd.optimize_ranks(model, plan, x, runtime=runtime, timer=timer, cache=False, lowest=0.2,
                                   max_growth=1.0)
    ratio_ranks = {row.rank for row in plan.decomposed}
    assert 15 in ratio_ranks and (13, 13) in ratio_ranks  # not aligned: timed as the reference only
    ranks = [job.rank for job in timer.jobs if job.rank is not None and job.rank not in ratio_ranks]
    sides = [r for rank in ranks for r in (rank if isinstance(rank, tuple) else (rank,))]
    assert sides and all(r % step == 0 for r in sides)
    for row in optimized.decomposed:  # aligned, or no aligned rank fits the budget (then it says so)
        sides = row.rank if isinstance(row.rank, tuple) else (row.rank,)
        assert all(r % step == 0 for r in sides) or f"no rank aligned to {step}" in row.reason, row


def test_eager_search_picks_the_linear_form_where_it_is_faster_and_models_apply_it():
    model, x = tiny_cnn(), torch.randn(2, 16, 4, 4)
    timer = RuntimeTimer()
    optimized = lrd.optimize_ranks(model, lrd.plan(model, ratio=2.0, min_rank=2), x, timer=timer, cache=False)
    # only the stride-1 1x1 conv has the form; the 3x3 (Tucker-2) and the Linear do not
    assert plan_forms(optimized) == {"2": "linear"}
    assert [job.form for job in timer.jobs if job.form] == ["linear"]
    assert optimized["2"].time_ms == 5.0 and "one linear over channels-last" in optimized["2"].reason
    copied = structural_copy(model, optimized, Placement())
    assert isinstance(copied[2], SVDConv2d) and copied[2].form == "linear" and copied[0].__class__ is not SVDConv2d
    # under compile the form is left to the compiler
    compiled = lrd.optimize_ranks(model, lrd.plan(model, ratio=2.0, min_rank=2), x, timer=RuntimeTimer(),
                                  cache=False, runtime="compile")
    assert plan_forms(compiled) == {}


def test_the_linear_form_is_the_same_math():
    dense = nn.Conv2d(16, 24, 1).double()
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, 16, 5, 5, dtype=torch.float64).contiguous(memory_format=memory_format)
        layer = SVDConv2d.from_dense(dense, 16)  # full rank: equals the dense conv
        conv_out = layer(x)
        conv_grads = torch.autograd.grad(conv_out.square().sum(), list(layer.parameters()))
        linear_out = layer.set_form("linear")(x)
        linear_grads = torch.autograd.grad(linear_out.square().sum(), list(layer.parameters()))
        assert torch.allclose(linear_out, dense(x), atol=1e-10) and torch.allclose(linear_out, conv_out, atol=1e-10)
        assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(conv_grads, linear_grads))
        # the memory format that came in goes out, so the layers after it run as they did
        assert linear_out.is_contiguous(memory_format=memory_format)


def test_forms_are_checked():
    strided = SVDConv2d.from_dense(nn.Conv2d(16, 24, 1, stride=2), 8)
    with pytest.raises(ValueError, match="stride"):
        strided.set_form("linear")
    with pytest.raises(ValueError, match="form must be one of"):
        strided.set_form("gemm")
    assert strided.form == "conv"
    model, plan = tiny_cnn(), lrd.plan(tiny_cnn(), ratio=2.0, min_rank=2)
    plan.meta["rank_optimization"] = {"forms": {"2": "linear"}}
    with pytest.raises(ValueError, match="no SVDConv2d there"):
        apply_forms(model, plan)  # not decomposed yet
    lrd.decompose(model, plan)
    assert apply_forms(model, plan) == ["2"] and model[2].form == "linear"


@pytest.mark.slow
def test_whole_model_check_runs_in_the_runtime():
    pytest.importorskip("onnxruntime")
    model, x = tiny_cnn(), torch.randn(2, 16, 4, 4)
    plan = lrd.plan(model, ratio=2.0, min_rank=2)
    report = compare_end_to_end(model, {"ratio ranks": plan}, x, runtime="onnxruntime", rounds=2, min_run_time=0.01)
    assert report.runtime == "onnxruntime" and "runtime onnxruntime" in str(report)
    assert len(report.speedups("ratio ranks")) == 2


def test_decompose_applies_the_plans_forms_and_save_load_keeps_them(tmp_path):
    model, plan = tiny_cnn(), lrd.plan(tiny_cnn(), ratio=2.0, min_rank=2)
    plan.meta["rank_optimization"] = {"forms": {"2": "linear"}}
    original = tiny_cnn()
    original.load_state_dict(model.state_dict())
    lrd.decompose(model, plan)
    assert model[2].form == "linear"
    lrd.save(model, tmp_path)
    loaded = lrd.load(tmp_path, original)
    assert loaded[2].form == "linear"
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(loaded(x), model(x))


def test_search_under_int8_times_each_candidate_quantized(tmp_path, monkeypatch):
    """runtime="int8": every layer and candidate is timed as `lrd.quantize` serves it (the
    decomposed Linear's factors dynamic int8, the convs static int8), and cached under int8."""
    import lrdaccel.rankopt.layer_timing as layer_timing
    from lrdaccel.measure.runtimes import int8_model, runtime_label

    timed = []

    def recording(module, x):
        quantized = int8_model(module, x)
        timed.append({m._get_name() for m in quantized.modules()})
        return quantized

    monkeypatch.setattr(layer_timing, "int8_model", recording)
    model, x, path = tiny_cnn(), torch.randn(2, 16, 4, 4), tmp_path / "timings.json"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimized = lrd.optimize_ranks(model, lrd.plan(model, ratio=2.0, min_rank=2), x, runtime="int8", cache=path,
                                   budget_s=None, min_run_time=0.01, lowest=0.9)
    assert optimized.meta["rank_optimization"]["runtime"] == "int8" and all(r.time_original_ms > 0 for r in optimized)
    assert any("DynamicQuantizedLinear" in names for names in timed)
    assert any("QuantizedConv2d" in names for names in timed)
    keys = list(json.loads(path.read_text())["entries"])
    assert keys and all(f"|runtime {runtime_label('int8')}|" in key for key in keys)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_under_int8_is_refused_clearly():
    model, x = tiny_cnn(), torch.randn(2, 16, 4, 4)
    plan = lrd.plan(model, ratio=2.0, min_rank=2)
    with pytest.raises(ValueError, match="runtime 'int8' runs inference only"):
        lrd.optimize_ranks(model, plan, x, objective="train", runtime="int8", cache=False)
    with pytest.raises(ValueError, match="runtime 'int8' is timed on the CPU"):
        from lrdaccel.measure.runtimes import check_runtime

        check_runtime("int8", "infer", "cuda")
