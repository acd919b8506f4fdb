"""export_onnx's failures are ValueErrors that say what failed, before any work where they can be:
dtypes ONNX Runtime cannot run, meta weights, a missing onnxscript; the user's model is never
changed or moved (a GPU model is exported from a CPU copy); missing folders are created."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel._extras import MissingDependency
from lrdaccel.deploy import export_onnx
from lrdaccel.deploy.onnx_export import cpu_copy
from lrdaccel.deploy.onnx_session import feeds, make_session

pytest.importorskip("onnxruntime")


def conv_bn(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_(0, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.to(dtype)


@pytest.mark.parametrize("dtype, message", [
    (torch.float64, "NOT_IMPLEMENTED : Could not find an implementation for Conv"),
    (torch.bfloat16, "INVALID_GRAPH"),
])
def test_a_dtype_onnx_runtime_cannot_run_is_a_value_error_naming_the_file(tmp_path, dtype, message):
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match=message) as error:
        export_onnx(conv_bn(dtype), torch.randn(2, 3, 8, 8, dtype=dtype), path)
    text = str(error.value)
    assert text.startswith(f"{path}: ONNX Runtime cannot load the exported graph") and "nothing written" in text
    assert f"model dtype {str(dtype)[6:]}" in text and ".m.onnx." not in text  # never the temporary name
    assert list(tmp_path.iterdir()) == []


def test_meta_weights_are_refused_before_any_work(tmp_path):
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    with pytest.raises(ValueError, match="0.weight is on the meta device"):
        export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", fuse=True)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_onnxscript_is_reported_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` fail
    model = conv_bn()
    with pytest.raises(MissingDependency, match=r"needs onnxscript, which is not installed: pip install lrdaccel\[onnx\]"):
        export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", fuse=True)
    assert list(tmp_path.iterdir()) == [] and isinstance(model[1], nn.BatchNorm2d)


def test_missing_folders_are_created(tmp_path):
    path = tmp_path / "a" / "b" / "m.onnx"
    report = export_onnx(conv_bn(), torch.randn(2, 3, 8, 8), path, fuse=True)
    assert path.is_file() and report.fused.fused == [("0", "1")]


def test_the_cpu_copy_shares_nothing_and_leaves_the_model_where_it_is():
    model = conv_bn()
    copied = cpu_copy(model)
    ours = {id(t) for t in (*model.parameters(), *model.buffers())}
    assert not ours & {id(t) for t in (*copied.parameters(), *copied.buffers())}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), copied.state_dict().values()))
    assert [p.requires_grad for p in copied.parameters()] == [p.requires_grad for p in model.parameters()]


def export_on(device: str, tmp_path) -> None:
    """Export a model that lives on `device`: the model stays there, unchanged; the file reproduces it."""
    model = conv_bn().to(device)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    report = export_onnx(model, x.to(device), tmp_path / "m.onnx", fuse=True)
    assert report.fused.fused == [("0", "1")] and report.worst < 1e-4
    assert {t.device.type for t in model.state_dict().values()} == {torch.device(device).type}
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert isinstance(model[1], nn.BatchNorm2d)
    session = make_session(str(tmp_path / "m.onnx"))
    with torch.no_grad():
        expected = model(x.to(device)).cpu().numpy()
    assert np.abs(session.run(None, feeds(session, x))[0] - expected).max() < 1e-3


def test_export_of_a_cpu_model(tmp_path):
    export_on("cpu", tmp_path)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_export_of_a_model_on_a_gpu_exports_a_cpu_copy(tmp_path):
    export_on("cuda", tmp_path)


def test_a_decomposed_model_on_the_cpu_exports_unchanged(tmp_path):
    model = conv_bn()
    lrd.decompose(model, ratio=2.0, min_rank=1)
    model.eval()
    before = [p.data_ptr() for p in model.parameters()]
    export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")
    assert [p.data_ptr() for p in model.parameters()] == before
