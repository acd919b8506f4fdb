"""What the bench times: counts, inference and training steps, freezing phases."""

import copy

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.measure.counting import count_macs, count_params
from lrdaccel.bench.config import BenchConfig
from lrdaccel.bench.paper_table import structural_copy
from lrdaccel._modules import output_tensor
from lrdaccel.bench.workloads import make_freezer, training_phases
from lrdaccel.measure.steps import Placement as Runtime, inference_phase


def _net():
    # wide enough that every layer's ratio-2 rank is above the plan's min_rank
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 1), nn.Flatten(),
                         nn.Linear(32 * 6 * 6, 64))


def test_counts_are_exact():
    model = _net()
    assert count_params(model) == (16 * 32 * 9 + 32) + (32 * 32 + 32) + (1152 * 64 + 64)
    x = torch.randn(2, 16, 6, 6)
    # per image: 3x3 conv 32*16*9 per pixel, 1x1 conv 32*32 per pixel, 36 pixels; linear 1152*64
    assert count_macs(model, x) == 2 * (36 * (32 * 16 * 9 + 32 * 32) + 1152 * 64)
    model[0].weight.requires_grad_(False)
    assert count_params(model, trainable_only=True) == count_params(model) - 16 * 32 * 9


def test_count_macs_restores_the_mode():
    model = _net().train()
    count_macs(model, torch.randn(1, 16, 6, 6))
    assert model.training


def test_structural_copy_has_the_planned_shapes_and_leaves_the_original():
    model = _net()
    plan = lrd.plan(model, ratio=2.0)
    copied = structural_copy(model, plan, Runtime())
    assert isinstance(model[0], nn.Conv2d)
    assert len(plan.decomposed) == 3
    assert isinstance(copied[0], lrd.TuckerConv2d) and copied[0].rank == plan["0"].rank
    assert count_params(copied) == count_params(model) - sum(r.params_before - r.params_after for r in plan.decomposed)


def test_output_tensor():
    t = torch.ones(2)

    class Out:
        logits = t

    assert output_tensor(t) is t and output_tensor(Out()) is t and output_tensor((t, 1)) is t
    with pytest.raises(ValueError, match="output tensor"):
        output_tensor({"a": 1})


def test_inference_phase_changes_nothing():
    model = _net().train()
    state = copy.deepcopy(model.state_dict())
    phase = inference_phase(model, torch.randn(2, 16, 6, 6), Runtime())
    phase.prepare()
    phase.step()
    assert not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_training_phases_follow_the_freezer_and_frozen_factors_do_not_move():
    model = _net()
    lrd.decompose(model, ratio=2.0)  # a Tucker-2 (3 factors) and two SVD layers (2 factors)
    phases = training_phases(model, torch.randn(4, 16, 6, 6), Runtime(), schedule="rotate")
    assert len(phases) == 6  # lcm(3, 2): one full cycle of the schedule
    for index, phase in enumerate(phases):
        phase.prepare()
        assert model.training
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        phase.step()
        assert frozen, f"phase {index} froze nothing"
        for name, value in frozen.items():
            assert torch.equal(model.get_parameter(name), value), f"frozen {name} moved in phase {index}"
        assert any(not torch.equal(model.get_parameter(n), v) for n, v in trainable.items())
        tucker_trainable = [i for i, f in enumerate(model[0].factors) if f.weight.requires_grad]
        assert tucker_trainable == [index % 3]


def test_static_schedule_is_one_phase_and_unknown_schedules_fail():
    model = _net()
    lrd.decompose(model, ratio=2.0)
    assert len(training_phases(model, torch.randn(2, 16, 6, 6), Runtime(), schedule="static")) == 1
    with pytest.raises(ValueError, match="schedule"):
        make_freezer(model, "sometimes")


def test_runtime_rejects_bad_devices():
    with pytest.raises(ValueError, match="device"):
        Runtime("not-a-device")
    assert Runtime.default_for("cpu") == Runtime("cpu", False, False)


def test_runtime_channels_last_places_conv_models_and_4d_inputs():
    runtime = Runtime("cpu", channels_last=True)
    model = runtime.place_model(_net())
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = runtime.place_inputs({"pixel_values": torch.randn(2, 16, 6, 6), "mask": torch.ones(2, 3)})
    assert x["pixel_values"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kwargs, message", [
    ({"models": ["nope"]}, "unknown model"),
    ({"models": []}, "at least one"),
    ({"repeats": 0}, "repeats"),
    ({"batch_size": 0}, "batch_size"),
    ({"ratio": 1.0}, "ratio"),
    ({"objective": "fast"}, "objective"),
    ({"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "nope"}, "device"),
    ({"variants": ["lrd", "lrd_fast"]}, "variants: choose among"),
    ({"variants": []}, "variants"),
    ({"compile_mode": "fastest"}, "compile_mode"),
    ({"rank_runtime": "jit"}, "runtime"),
])
def test_bench_config_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BenchConfig(**kwargs)


def test_chosen_rows_keep_the_model_a_freezing_row_freezes():
    keys = lambda config: [v.key for v in config.rows()]  # noqa: E731
    assert keys(BenchConfig(models=["fmnist-cnn"], variants=["lrd_both"])) == ["original", "lrd_opt", "lrd_both"]
    assert keys(BenchConfig(models=["fmnist-cnn"], variants=["lrd_merge"])) == ["original", "lrd_merge"]
    assert len(keys(BenchConfig(models=["fmnist-cnn"]))) == 7


def test_ranks_searched_once_per_search_runtime(monkeypatch):
    """With rank_runtime="eager" every table shares the eager search; without, each runtime has its own."""
    from lrdaccel.bench import paper_table

    searched = []

    def fake_optimize(model, plan, inputs, runtime, **kwargs):
        searched.append(runtime)
        return plan

    monkeypatch.setattr(paper_table, "optimize_ranks", fake_optimize)
    model, x = _net(), torch.randn(1, 16, 6, 6)
    for rank_runtime, expected in ((None, ["eager", "compile"]), ("eager", ["eager"])):
        searched.clear()
        plans = paper_table._Plans(model, x, BenchConfig(models=["fmnist-cnn"], runtimes=["eager", "compile"],
                                                         rank_runtime=rank_runtime, timing_cache="none"), False)
        assert plans.merged is not None and not plans.merged.merged  # no bottleneck in _net
        for runtime in ("eager", "compile", "eager"):
            assert plans.optimized(runtime)[2] == (rank_runtime or runtime)
        assert searched == expected
