"""`lrdaccel export --format onnx` and `lrdaccel compress --fuse` on a model given as
package.module:factory: a checked ONNX file whose BatchNorms are folded; clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.cli import main

ort = pytest.importorskip("onnxruntime")


def conv_bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return net


ARGS = ["--model", "test_cli_export:conv_bn_net", "--input-shape", "1,28,28", "--batch-size", "4"]


def onnx_output(path, x) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.slow
def test_compress_fuse_then_export_from_the_saved_model(tmp_path, capsys):
    out = tmp_path / "compressed"
    assert main(["compress", *ARGS, "--min-rank", "1", "-o", str(out), "--fuse"]) == 0
    printed = capsys.readouterr().out
    assert "2 BatchNorm2d folded" in printed and "max abs difference" in printed
    # the directory reloads (unfused, fine-tunable); model.onnx is that model with BN folded
    model = lrd.load(out, conv_bn_net()).eval()
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(onnx_output(out / "model.onnx", x) - expected).max() < 1e-4

    path = tmp_path / "exported.onnx"
    assert main(["export", "--format", "onnx", *ARGS, "--from", str(out), "--fuse", "--no-dynamic-batch",
                 "-o", str(path)]) == 0
    assert "fixed batch" in capsys.readouterr().out
    x4 = torch.randn(4, 1, 28, 28)  # the example's batch: the file takes no other
    with torch.no_grad():
        assert np.abs(onnx_output(path, x4) - model(x4).numpy()).max() < 1e-4


def test_export_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    assert main(["export", *ARGS, "--format", "tflite", "-o", str(tmp_path / "m.onnx")]) == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    assert main(["export", *ARGS, "--tolerance", "0", "-o", str(tmp_path / "m.onnx")]) == 2
    assert "tolerance must be a finite number > 0" in capsys.readouterr().err
    (tmp_path / "dir").mkdir()
    assert main(["export", *ARGS, "-o", str(tmp_path / "dir")]) == 2
    assert "--output" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def bottleneck_net() -> nn.Module:
    """Stem, one bottleneck (1x1 -> BN -> ReLU -> 3x3 -> BN -> ReLU -> 1x1 -> BN) with a residual, head."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
            self.block = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                       nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                       nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

        def forward(self, x):
            x = self.stem(x)
            return self.head(torch.relu(x + self.block(x)))

    return Net()


@pytest.mark.slow
def test_compress_merge_fuse_folds_every_batchnorm_of_the_merged_block(tmp_path, capsys):
    """Issue 20.5: the merged block's convs (MergedConv2d) absorb their BatchNorms in the export."""
    out = tmp_path / "merged"
    args = ["--model", "test_cli_export:bottleneck_net", "--input-shape", "1,28,28", "--batch-size", "4"]
    assert main(["compress", *args, "--ratio", "2", "--min-rank", "1", "--merge", "--calibration", "2",
                 "--calibration-data", "digits", "-o", str(out), "--fuse"]) == 0
    printed = capsys.readouterr().out
    assert "4 BatchNorm2d folded into the conv before them, 0 pairs left unfused, 0 BatchNorm2d remain" in printed
    model = lrd.load(out, bottleneck_net()).eval()
    assert isinstance(model.block[3], lrd.MergedConv2d)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert np.abs(onnx_output(out / "model.onnx", x) - model(x).numpy()).max() < 1e-4


@pytest.mark.slow
def test_export_quantize_int8_with_calibration_writes_a_static_int8_file(tmp_path, capsys):
    path = tmp_path / "m8.onnx"
    assert main(["export", *ARGS, "--fuse", "--quantize", "int8", "--calibration", "2", "--calibration-data", "digits",
                 "-o", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "int8 (" in printed and "cosine" in printed and "tolerance 0.25" in printed
    ops = {node.op_type for node in __import__("onnx").load(str(path)).graph.node}
    assert "QuantizeLinear" in ops and "MatMulInteger" in ops
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = conv_bn_net().eval()(x).numpy()
    assert np.abs(onnx_output(path, x) - expected).max() < 0.25 * max(1.0, np.abs(expected).max())


def test_export_calibration_without_quantize_is_refused(tmp_path, capsys):
    assert main(["export", *ARGS, "--calibration", "2", "-o", str(tmp_path / "m.onnx")]) == 2
    assert "--calibration is for --quantize int8" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


class FixedBatchNet(nn.Module):
    """A conv, then a reshape to a constant batch of 4 (issue 30, item 11)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 28 * 28, 10)

    def forward(self, x):
        return self.head(self.conv(x).reshape(4, -1))


def fixed_batch_net() -> nn.Module:
    torch.manual_seed(0)
    return FixedBatchNet()


def test_compress_fuse_of_a_fixed_batch_model_is_one_line_before_saving(tmp_path, capsys):
    """0.3.0 saved the checkpoint, then crashed in the export with a RuntimeError traceback."""
    args = ["--model", "test_cli_export:fixed_batch_net", "--input-shape", "1,28,28", "--batch-size", "4",
            "--min-rank", "1"]
    out = tmp_path / "out"
    assert main(["compress", *args, "-o", str(out), "--fuse"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fails at batch 5" in err[0] and "--no-dynamic-batch" in err[0]
    assert not out.exists()
    assert main(["compress", *args, "-o", str(out), "--fuse", "--no-dynamic-batch"]) == 0
    assert "fixed batch" in capsys.readouterr().out and (out / "model.onnx").is_file()
    assert main(["compress", *args, "-o", str(tmp_path / "x"), "--no-dynamic-batch"]) == 2
    assert "are for the --fuse export" in capsys.readouterr().err
