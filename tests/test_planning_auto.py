"""form="auto": per width and per layer, keep / factor / narrow by time saved against output error
lost, with a deterministic timer (time = weights), so that only the measured errors decide."""

import copy

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.planning import Plan
from lrdaccel.planning.auto_measure import narrow_error
from lrdaccel.calibration.statistics import collect_input_stats
from test_decomposition_narrow import hidden, token_batches
from test_planning_narrow import tiny_bert


def weights_ms(module, shape):
    """A deterministic timer: 1 ms per thousand weights, whatever the input."""
    return sum(p.numel() for name, p in module.named_parameters() if not name.endswith("bias")) / 1e3


def ffn(d=64, n=256, duplicated=False, low_rank=None, seed=0):
    """Linear(d, n) -> ReLU -> Linear(n, d): with duplicated neurons (activations of rank n / 2,
    weights of full rank) or with both weights of rank `low_rank` plus noise (activations of
    high rank, weights not)."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, n), nn.ReLU(), nn.Linear(n, d))
    with torch.no_grad():
        if duplicated:
            half = torch.randn(n // 2, d, generator=generator) / d ** 0.5
            model[0].weight.copy_(torch.cat([half, half]))
            model[0].bias.copy_(model[0].bias[: n // 2].repeat(2))
        if low_rank:
            def near(rows, cols):
                left = torch.randn(rows, low_rank, generator=generator)
                right = torch.randn(low_rank, cols, generator=generator)
                return left @ right / cols ** 0.5 + 1e-3 * torch.randn(rows, cols, generator=generator)
            model[0].weight.copy_(near(n, d))
            model[2].weight.copy_(near(d, n))
    return model


def batches(d=64, count=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(256, d, generator=generator) for _ in range(count)]


def auto(model, calibration, **settings):
    settings = {"timer": weights_ms, **settings}
    return lrd.plan(model, ratio=2.0, form="auto", example_inputs=calibration[0], calibration=calibration,
                    min_rank=1, **settings)


def test_low_rank_activations_narrow():
    model, x = ffn(duplicated=True), batches()
    plan = auto(model, x)
    assert [(row.name, row.kind, row.rank) for row in plan] == [("0", "narrow", 128)]
    unit = plan.meta["auto_form"]["units"]["0"]
    assert unit["form"] == "narrow" and unit["layers"] == ["0", "2"]
    assert unit["narrow_error"] < 1e-4 and unit["factor_error"] > 0.3  # a duplicate is dropped losslessly
    assert (unit["keep_ms"], unit["narrow_ms"], unit["factor_ms"]) == (32.768, 16.384, 16.0)
    assert "auto: narrow (keep 32.768 ms; factor 16.000 ms, error 0." in plan["0"].reason
    assert "narrow 16.384 ms, error 0.000, score +0.500)" in plan["0"].reason


def test_low_rank_weights_factor():
    model, x = ffn(low_rank=8), batches()
    plan = auto(model, x)
    assert [(row.name, row.kind, row.rank) for row in plan] == [("0", "svd", 25), ("2", "svd", 25)]
    unit = plan.meta["auto_form"]["units"]["0"]
    assert unit["factor_error"] < 0.01 < 0.03 < unit["narrow_error"]
    assert plan["0"].reason.startswith("ratio 2; auto: factor (keep 32.768 ms; factor 16.000 ms, error 0.00")
    assert plan["2"].reason == "ratio 2; auto: factor, with the pair of 0"
    # the measured narrow error is the one decompose's refit gives
    stats = collect_input_stats(model, ["2"], x)["2"]
    assert unit["narrow_error"] == pytest.approx(narrow_error(model[2], stats, 128), abs=1e-6)


def test_a_heavy_tradeoff_keeps_what_loses_anything():
    model, x = ffn(low_rank=8), batches()
    plan = auto(model, x, tradeoff=1000.0)
    assert [(row.name, row.kind) for row in plan] == [("0", "keep"), ("2", "keep")]
    assert "auto: keep (keep 32.768 ms; factor 16.000 ms" in plan["0"].reason


def test_a_layer_outside_any_pair_is_decided_alone_and_the_mixed_plan_round_trips(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(ffn(duplicated=True), ffn(low_rank=8, seed=2), nn.Linear(64, 64))
    with torch.no_grad():  # the last layer: near rank 4, so factoring it loses little
        model[2].weight.copy_(torch.randn(64, 4) @ torch.randn(4, 64) / 8)
    x = batches()
    before = copy.deepcopy(model.state_dict())
    plan = auto(model, x)
    assert [(row.name, row.kind) for row in plan] == [("0.0", "narrow"), ("1.0", "svd"), ("1.2", "svd"), ("2", "svd")]
    assert plan.meta["auto_form"]["units"]["2"]["layers"] == ["2"]
    assert "narrow_ms" not in plan.meta["auto_form"]["units"]["2"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # planning changed nothing
    plan = Plan.from_json(plan.to_json())
    compressed = copy.deepcopy(model)
    lrd.decompose(compressed, plan, calibration=x, method="whiten")
    error = (compressed(x[0]) - model(x[0])).norm() / model(x[0]).norm()
    assert error < 0.05
    lrd.save(compressed, tmp_path / "auto")
    loaded = lrd.load(tmp_path / "auto", copy.deepcopy(model))
    assert torch.equal(loaded(x[1]), compressed(x[1]))


def test_attention_heads_and_ffns_get_one_row_per_unit():
    torch.manual_seed(0)
    model = tiny_bert()
    data = token_batches()
    plan = lrd.plan(model, ratio=2.0, form="auto", example_inputs=data[0], calibration=data, timer=weights_ms,
                    min_rank=1)
    units = plan.meta["auto_form"]["units"]
    value = "encoder.layer.0.attention.self.value"
    assert units[value]["layers"] == [value, "encoder.layer.0.attention.self.query",
                                      "encoder.layer.0.attention.self.key", "encoder.layer.0.attention.output.dense"]
    assert 0 < units[value]["narrow_error"] < 1 and 0 < units[value]["factor_error"]
    names = [row.name for row in plan]
    assert len(names) == len(set(names))
    chosen = {name: unit["form"] for name, unit in units.items()}
    for name, form in chosen.items():
        if form == "narrow":
            assert plan[name].kind == "narrow"
            assert all(other not in names for other in plan[name].narrow.module_names())
        else:
            assert all(plan[n].kind == ("keep" if form == "keep" else plan[n].kind) for n in units[name]["layers"])
    compressed = copy.deepcopy(model)
    lrd.decompose(compressed, plan, calibration=data)
    assert hidden(compressed, data[1]).shape == hidden(model, data[1]).shape


@pytest.mark.parametrize("settings, message", [
    ({"calibration": None}, "form='auto' needs calibration batches"),
    ({"example_inputs": None}, "form='auto' needs example_inputs"),
    ({"merge": True}, "form='auto' does not combine with merge=True"),
    ({"tradeoff": -1.0}, "tradeoff"),
])
def test_bad_input_is_refused(settings, message):
    model, x = ffn(duplicated=True), batches()
    arguments = {"ratio": 2.0, "form": "auto", "example_inputs": x[0], "calibration": x, **settings}
    with pytest.raises(ValueError, match=message):
        lrd.plan(model, **arguments)


def test_a_timer_without_a_positive_time_is_refused():
    model, x = ffn(duplicated=True), batches()
    with pytest.raises(ValueError, match=r"the timer gave 0.0 ms for a Linear on input \(256, 64\)"):
        auto(model, x, timer=lambda module, shape: 0.0)


class Branchy(nn.Module):
    """Two layers; the example inputs reach only the first (the calibration batches reach both)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.b(x) if x.shape[0] > 100 else self.a(x)


def test_a_layer_the_example_inputs_miss_keeps_its_factor_row_and_says_so():
    model, x = Branchy(), batches() + [torch.randn(8, 64)]
    plan = lrd.plan(model, ratio=2.0, form="auto", example_inputs=x[-1], calibration=x, timer=weights_ms)
    assert plan["b"].kind == "svd"
    assert plan["b"].reason == "ratio 2; auto: not reached by the example inputs, not decided"
    assert plan["a"].reason.startswith("ratio 2; auto: ")
    assert set(plan.meta["auto_form"]["units"]) == {"a"}
