"""Runtimes: one name everywhere speed is measured, the same outputs in each, clear refusals."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.bench.config import BenchConfig
from lrdaccel.measure.runtimes import COMPILE_MODES, RUNTIMES, check_runtime, inference_step, runtime_label
from lrdaccel.measure.steps import Placement, make_train_step
from lrdaccel.rankopt import compare_end_to_end, measure_staircase


def small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 5)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_every_runtime_computes_the_model(runtime):
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
    model, x = small_model(), torch.randn(3, 4, 6, 6)
    with torch.no_grad():
        expected = model(x)
    got = inference_step(model, x, runtime)()
    got = torch.as_tensor(got[0]) if isinstance(got, list) else got
    # int8 rounds every weight and activation: within 5% of the output's range, not float rounding
    atol = 0.05 * float(expected.abs().max()) if runtime == "int8" else 1e-5
    assert torch.allclose(got, expected, atol=atol)
    assert not model.training  # the model is left in its mode


@pytest.mark.slow
def test_compiled_training_step_trains_like_eager():
    """One SGD step compiled moves the weights as the eager step does."""
    x = torch.randn(3, 4, 6, 6)
    eager, compiled = small_model().train(), small_model().train()
    compiled.load_state_dict(eager.state_dict())
    make_train_step(eager, x, Placement(), lr=0.1)()
    make_train_step(compiled, x, Placement(runtime="compile"), lr=0.1)()
    for a, b in zip(eager.parameters(), compiled.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_bad_runtime_names_are_refused_everywhere_and_change_nothing():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 4, 6, 6)
    plan = lrd.plan(model, ratio=2.0, min_rank=1)
    message = r"runtime must be one of \('eager', 'compile', 'onnxruntime', 'int8'\), got 'jit'"
    with pytest.raises(ValueError, match=message):
        lrd.optimize_ranks(model, plan, x, runtime="jit", cache=False)
    with pytest.raises(ValueError, match=message):
        lrd.SearchSettings(runtime="jit")
    with pytest.raises(ValueError, match=message):
        compare_end_to_end(model, {"ratio": plan}, x, runtime="jit")
    with pytest.raises(ValueError, match=message):
        Placement(runtime="jit")
    with pytest.raises(ValueError, match=message):
        BenchConfig(models=["fmnist-cnn"], runtimes=["eager", "jit"])
    with pytest.raises(ValueError, match=message):
        measure_staircase(nn.Linear(8, 8), (2, 8), [2], runtime="jit", cache=False)
    with pytest.raises(ValueError, match="at most once"):
        BenchConfig(models=["fmnist-cnn"], runtimes=["eager", "eager"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_under_onnxruntime_is_refused_clearly():
    pytest.importorskip("onnxruntime")
    model, x = small_model(), torch.randn(2, 4, 6, 6)
    plan = lrd.plan(model, ratio=2.0, min_rank=1)
    message = "runtime 'onnxruntime' runs inference only"
    with pytest.raises(ValueError, match=message):
        lrd.optimize_ranks(model, plan, x, objective="train", runtime="onnxruntime", cache=False)
    with pytest.raises(ValueError, match=message):
        compare_end_to_end(model, {"ratio": plan}, x, objective="train", runtime="onnxruntime")
    with pytest.raises(ValueError, match="inference only"):
        make_train_step(model, x, Placement(runtime="onnxruntime"))


def test_missing_onnxruntime_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ValueError, match=r"pip install lrdaccel\[onnx\]"):
        check_runtime("onnxruntime")
    with pytest.raises(ImportError, match=r"pip install lrdaccel\[onnx\]"):
        lrd.SearchSettings(runtime="onnxruntime")
    check_runtime("compile")  # the others need nothing more


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reduce-overhead"])
def test_a_compile_mode_compiles_the_same_model(mode):
    """The mode GPU users run (CUDA graphs, autotuning) is passed to torch.compile; on the CPU
    it compiles without graphs, and both steps compute what eager does."""
    model, x = small_model(), torch.randn(3, 4, 6, 6)
    with torch.no_grad():
        expected = model(x)
    placement = Placement(runtime="compile", compile_mode=mode)
    assert torch.allclose(inference_step(model, x, "compile", compile_mode=mode)(), expected, atol=1e-5)
    eager, compiled = small_model().train(), small_model().train()
    compiled.load_state_dict(eager.state_dict())
    make_train_step(eager, x, Placement(), lr=0.1)()
    make_train_step(compiled, x, placement, lr=0.1)()
    for a, b in zip(eager.parameters(), compiled.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_compile_modes_are_named_in_labels_and_checked():
    assert runtime_label("compile") == "compile" and runtime_label("eager", "max-autotune") == "eager"
    assert runtime_label("compile", "max-autotune") == "compile max-autotune"
    assert "reduce-overhead" in COMPILE_MODES
    for make in (lambda: Placement(runtime="compile", compile_mode="fastest"),
                 lambda: lrd.SearchSettings(runtime="compile", compile_mode="fastest"),
                 lambda: BenchConfig(models=["fmnist-cnn"], compile_mode="fastest")):
        with pytest.raises(ValueError, match="compile_mode must be one of"):
            make()
