"""`lrdaccel compress --method whiten --calibration N`: real images in, a whitened model out."""

import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel import data
from lrdaccel.cli import main
from lrdaccel.cli.compress import calibration_batches


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 24, 1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(24, 10))


ARGS = ["--model", "test_cli_compress:small_cnn", "--input-shape", "1,28,28", "--batch-size", "8", "--min-rank", "1"]


def test_compress_whiten_writes_a_loadable_whitened_model(tmp_path, capsys):
    plain_dir, white_dir = tmp_path / "svd", tmp_path / "white"
    assert main(["compress", *ARGS, "-o", str(plain_dir)]) == 0
    assert main(["compress", *ARGS, "-o", str(white_dir), "--method", "whiten", "--calibration", "3",
                 "--calibration-data", "digits"]) == 0
    plain, white = lrd.load(plain_dir, small_cnn()).eval(), lrd.load(white_dir, small_cnn()).eval()
    assert [type(m) for m in plain.modules()] == [type(m) for m in white.modules()]
    assert not torch.equal(plain[2].core.weight, white[2].core.weight)
    # The whitened factors are the ones decompose(method="whiten") gives on the same batches.
    expected = small_cnn()
    lrd.decompose(expected, ratio=2.0, min_rank=1, method="whiten", calibration=calibration_batches("digits", 3, 8))
    x = data.normalize(data.load("digits", "test", limit=16).tensors[0])
    with torch.no_grad():
        torch.testing.assert_close(white(x), expected.eval()(x))


def test_calibration_batches_are_normalised_fixed_and_sized():
    batches = calibration_batches("digits", 3, 5)
    assert [tuple(b.shape) for b in batches] == [(5, 1, 28, 28)] * 3
    assert all(torch.equal(a, b) for a, b in zip(batches, calibration_batches("digits", 3, 5)))
    assert batches[0].min() < 0  # normalised, not raw [0, 1] pixels


def test_compress_flag_errors(tmp_path, capsys):
    assert main(["compress", *ARGS, "-o", str(tmp_path / "a"), "--method", "whiten"]) == 2
    assert "--method whiten and --allocate need --calibration" in capsys.readouterr().err
    assert main(["compress", *ARGS, "-o", str(tmp_path / "a"), "--allocate", "sensitivity"]) == 2
    assert "need --calibration" in capsys.readouterr().err
    assert main(["compress", *ARGS, "-o", str(tmp_path / "a"), "--sequential", "--calibration", "2",
                 "--calibration-data", "digits"]) == 2
    assert "pass method='whiten'" in capsys.readouterr().err
    assert main(["compress", *ARGS, "-o", str(tmp_path / "a"), "--calibration-data", "text"]) == 2
    assert "for --model minilm" in capsys.readouterr().err
    assert main(["compress", *ARGS, "-o", str(tmp_path / "b"), "--calibration", "2"]) == 2
    assert "only used by --method whiten, --merge and --allocate" in capsys.readouterr().err
    assert main(["compress", *ARGS, "-o", str(tmp_path / "c"), "--method", "whiten", "--calibration", "1000",
                 "--calibration-data", "digits"]) == 2
    assert "more images than 'digits'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_compress_allocated_and_sequential_is_the_library_call(tmp_path):
    out = tmp_path / "seq"
    assert main(["compress", *ARGS, "-o", str(out), "--allocate", "sensitivity", "--budget", "macs",
                 "--method", "whiten", "--sequential", "--refit", "last", "--calibration", "3",
                 "--calibration-data", "digits"]) == 0
    batches = calibration_batches("digits", 3, 8)
    expected = small_cnn()
    plan = lrd.plan(expected, ratio=2.0, min_rank=1, allocate="sensitivity", budget="macs", calibration=batches)
    assert "allocated by fisher sensitivity, macs budget" in plan.decomposed[0].reason
    lrd.decompose(expected, plan, method="whiten", sequential=True, refit="last", calibration=batches)
    loaded = lrd.load(out, small_cnn()).eval()
    assert [(r.name, r.kind, r.rank) for r in lrd.io.plan_of(loaded)] == [(r.name, r.kind, r.rank) for r in plan.changed]
    x = data.normalize(data.load("digits", "test", limit=16).tensors[0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected.eval()(x))


def test_plan_and_compress_merge_a_bottleneck_model(tmp_path, capsys):
    zoo_args = ["--model", "fmnist-bottleneck", "--batch-size", "16"]
    assert main(["plan", *zoo_args, "--merge", "-o", str(tmp_path / "plan.json")]) == 0
    plan = lrd.Plan.load(tmp_path / "plan.json")
    assert len(plan.merged) == 6 and "merged" in capsys.readouterr().out
    assert main(["compress", *zoo_args, "--merge", "-o", str(tmp_path / "m")]) == 2
    assert "calibration" in capsys.readouterr().err
    assert main(["compress", *zoo_args, "--plan", str(tmp_path / "plan.json"), "--calibration", "4",
                 "--calibration-data", "digits", "-o", str(tmp_path / "m")]) == 0
    model = lrd.load(tmp_path / "m", lrd.zoo.get("fmnist-bottleneck").build())
    assert sum(isinstance(m, lrd.MergedConv2d) for m in model.modules()) == 18
