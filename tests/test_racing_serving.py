"""racing/serving.py: a race served in int8 (issue 29 item 3): every variant's trained model
quantized with lrd.quantize, timed against the original quantized the same way, and scored
after quantization beside its float accuracy; eager stays as it was."""

import json

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.deploy.quantize import ServedConv
from lrdaccel.measure.steps import Placement
from lrdaccel.racing import RaceConfig, race, serving
from lrdaccel.racing import runner
from lrdaccel.tasks.data import TensorData
from test_racing_runner import blobs, mlp

QUICK = dict(batch_size=16, eval_batch_size=64, lr=1e-2, evaluations=2, calibration_batches=2, infer_repeats=1,
             infer_batch_size=8, freeze_embeddings=False, max_steps=4, progress=False)
VARIANTS = "original,lrd(method=svd,ratio=2)"


def timed_models(monkeypatch) -> dict[int, nn.Module]:
    """Record every model the race times (serving.inference_phase), in order."""
    timed = []
    real = serving.inference_phase

    def spy(model, inputs, placement):
        timed.append((model, placement))
        return real(model, inputs, placement)

    monkeypatch.setattr(serving, "inference_phase", spy)
    return timed


def dynamic_int8(model: nn.Module) -> bool:
    return (any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())
            and not any(type(m) is nn.Linear for m in model.modules()))


def test_an_int8_race_scores_and_times_the_quantized_models(tmp_path, monkeypatch):
    timed = timed_models(monkeypatch)
    trained = {}
    results = race(mlp(), blobs(96, 0), blobs(40, 1), VARIANTS, serve="int8", out=tmp_path, trained=trained,
                   **QUICK)
    assert results["serve"] == "int8" and results["config"]["serve"] == "int8"
    assert "the original quantized the same way" in results["serve_baseline"]
    # what was timed: each variant's int8 copy on the CPU, the original's first (the baseline)
    assert [dynamic_int8(model) for model, _ in timed] == [True, True]
    assert all(placement == Placement("cpu") for _, placement in timed)
    data = TensorData(blobs(96, 0), blobs(40, 1), ["0", "1", "2", "3"])
    for row in results["variants"]:
        float_model = trained[row["name"]]
        assert type(float_model[0]) is not torch.ao.nn.quantized.dynamic.Linear  # handed back float
        assert row["final_accuracy"] == runner.evaluate(float_model, data, 64, Placement())
        served = lrd.quantize(float_model, "int8")
        assert row["final_accuracy_served"] == runner.evaluate(served, data, 64, Placement("cpu"))
        assert row["spread"]["final_accuracy_served"]["values"] == [row["final_accuracy_served"]]
    assert results["variants"][0]["infer_speedup"] == 1.0
    for row in results["variants"]:
        assert (f"serves {row['infer_speedup']:.2f}x in int8 ({row['final_accuracy_served']:.2f}% after "
                f"quantization) at {row['params']:.3f}x the parameters") in row["verdict"]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["serve"] == "int8" and "final_accuracy_served" in on_disk["seeds"][0]["variants"][1]
    report = (tmp_path / "report.md").read_text()
    assert "Served in int8" in report and results["serve_baseline"] in report
    assert "| inference speed-up | accuracy served in int8 |" in report
    lrd_row = results["variants"][1]
    assert f"| {lrd_row['infer_speedup']:.2f}x | {lrd_row['final_accuracy_served']:.2f}% |" in report


def test_an_eager_race_times_the_float_models_as_before(tmp_path, monkeypatch):
    timed = timed_models(monkeypatch)
    results = race(mlp(), blobs(96, 0), blobs(40, 1), VARIANTS, out=tmp_path, **QUICK)
    assert results["serve"] == "eager" and results["serve_baseline"] == "the original, as trained (eager PyTorch)"
    assert [dynamic_int8(model) for model, _ in timed] == [False, False]
    assert all("final_accuracy_served" not in row for row in results["variants"])
    report = (tmp_path / "report.md").read_text()
    assert "int8" not in report


def test_convs_are_calibrated_on_the_first_few_calibration_batches():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    batches = [torch.randn(2, 1, 8, 8) * (1 + 10 * (i >= serving.SERVE_CALIBRATION_BATCHES)) for i in range(6)]
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    served = serving.served_models({"cnn": cnn}, "int8", batches)["cnn"]
    assert isinstance(served[0], ServedConv)  # static int8 conv
    probe = torch.randn(3, 1, 8, 8)
    few = lrd.quantize(cnn, "int8", calibration=batches[:serving.SERVE_CALIBRATION_BATCHES])
    every = lrd.quantize(cnn, "int8", calibration=batches)
    assert torch.equal(served(probe), few(probe)) and not torch.equal(served(probe), every(probe))
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())  # the float model untouched
    assert serving.served_models({"cnn": cnn}, "eager", batches)["cnn"] is cnn


class NoLayers(nn.Module):
    """A classifier with nothing int8 can quantize."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(32, 4))

    def forward(self, x):
        return x @ self.weight


def test_a_model_int8_cannot_serve_is_refused_before_any_variant_is_built(monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("built a variant before refusing")

    monkeypatch.setattr(runner, "build_variant", no_build)
    with pytest.raises(ValueError, match="serve='int8' quantizes Linear, Conv1D and Conv2d layers, and NoLayers "
                                         "has none: race with serve='eager'"):
        race(NoLayers(), blobs(96, 0), blobs(40, 1), "original", serve="int8", **QUICK)


def test_an_unknown_serving_runtime_is_one_line():
    with pytest.raises(ValueError, match=r"serve must be one of \('eager', 'int8'\), got 'fp16'"):
        RaceConfig(serve="fp16")


@pytest.mark.parametrize("serve, searched", [("int8", {"runtime": "int8", "device": "cpu"}), ("eager", {})])
def test_ranks_for_inference_are_searched_as_the_race_serves(monkeypatch, serve, searched):
    from lrdaccel.racing import lrd_variant

    calls = []

    def record(model, plan, example_inputs, objective, **kwargs):
        calls.append((objective, kwargs))
        return plan

    monkeypatch.setattr(lrd_variant, "optimize_ranks", record)
    race(mlp(), blobs(96, 0), blobs(40, 1), "original,lrd(method=svd,optimize=infer),lrd(method=svd,optimize=train)",
         serve=serve, **QUICK)
    assert calls == [("infer", searched), ("train", {})]
