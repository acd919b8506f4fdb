"""`--form factor|narrow|auto` on `lrdaccel plan`, `optimize` and `compress`."""

import re

import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel import data
from lrdaccel.cli import main


def mlp() -> nn.Module:
    """Flattened 28x28 images -> 64 -> ReLU -> 64 -> ReLU -> 10: two narrowable widths."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


ARGS = ["--model", "test_cli_plan_form:mlp", "--input-shape", "1,28,28", "--batch-size", "8", "--min-rank", "1"]
DIGITS = ["--calibration", "16", "--calibration-data", "digits"]  # 128 images: more than the widths


def test_plan_form_narrow_is_the_library_plan(tmp_path, capsys):
    assert main(["plan", *ARGS, "--form", "narrow", "-o", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "64 -> 32 channels through relu into 3" in out
    expected = lrd.plan(mlp(), ratio=2.0, min_rank=1, form="narrow", example_inputs=torch.zeros(8, 1, 28, 28))
    assert lrd.Plan.load(tmp_path / "p.json").to_dict()["layers"] == expected.to_dict()["layers"]


def test_optimize_times_a_narrow_plan_whole(capsys):
    assert main(["optimize", *ARGS, "--form", "narrow", "--no-cache", "--check-rounds=1", "--check-time=0.005"]) == 0
    out = capsys.readouterr().out
    assert "narrow  32" in out and "optimized" in out


def test_compress_form_auto_prints_its_choices_and_applies_them(tmp_path, capsys):
    assert main(["compress", *ARGS, "--form", "auto", "--tradeoff", "1000", *DIGITS, "-o", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert out.count("auto: keep (keep ") == 2  # the width 1 -> 3 and layer 5: any error outweighs time
    assert "decomposed 0 layers" in out
    assert main(["compress", *ARGS, "--form", "auto", "--tradeoff", "0", *DIGITS, "-o", str(tmp_path / "n")]) == 0
    out = capsys.readouterr().out
    printed = set(re.findall(r"^(\S+)\s+Linear\s+\S+\s+(narrow|svd)\s", out, re.MULTILINE))
    model = lrd.load(tmp_path / "n", mlp()).eval()
    assert {(row.name, row.kind) for row in lrd.io.plan_of(model)} == printed
    x = data.normalize(data.load("digits", "test", limit=8).tensors[0])
    with torch.no_grad():
        assert model(x).shape == (8, 10)


def test_form_errors_are_one_line_before_any_work(tmp_path, capsys):
    assert main(["plan", *ARGS, "--form", "auto"]) == 2
    assert "--form auto measures each form's output error on calibration batches" in capsys.readouterr().err
    assert main(["compress", *ARGS, "--form", "narrow", "-o", str(tmp_path / "a")]) == 2
    assert "--form narrow needs --calibration N" in capsys.readouterr().err
    assert main(["plan", *ARGS, "--form", "best"]) == 2
    assert "invalid choice 'best'" in capsys.readouterr().err
    assert main(["plan", *ARGS, "--form", "narrow", "--merge"]) == 2
    assert "form='narrow' does not combine with merge=True" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
