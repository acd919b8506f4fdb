"""ONNX export round trips, checked by running the file in ONNX Runtime: a decomposed small CNN
(with BatchNorm folding), a decomposed small ViT, GPT-2 with decomposed Conv1D layers; a mismatch
above the tolerance writes nothing; bad inputs are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel._modules import call_model, output_tensor
from lrdaccel.deploy import ExportConfig, export_onnx
from lrdaccel.deploy.onnx_session import export_program, feeds, make_session, reweighted
from lrdaccel.layers import SVDConv2d, SVDLinear, TuckerConv2d

ort = pytest.importorskip("onnxruntime")


def run_file(path, inputs) -> np.ndarray:
    session = make_session(str(path))
    return session.run(None, feeds(session, inputs))[0]


def expected(model, inputs) -> np.ndarray:
    with torch.no_grad():
        return output_tensor(call_model(model, inputs)).numpy()


def small_cnn() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    lrd.decompose(model, ratio=2.0, min_rank=2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.slow
def test_small_cnn_fused_round_trip(tmp_path):
    model = small_cnn()
    assert {TuckerConv2d, SVDConv2d} <= {type(m) for m in model.modules()}
    x = torch.randn(2, 3, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = export_onnx(model, x, tmp_path / "cnn.onnx", fuse=True)
    assert sorted(report.max_abs_diff) == [2, 3] and report.worst < 1e-4
    assert len(report.fused.fused) == 3 and not report.fused.left
    # the file is what the model computes, at another batch size too; the model itself is untouched
    x5 = torch.randn(5, 3, 16, 16)
    assert np.abs(run_file(tmp_path / "cnn.onnx", x5) - expected(model, x5)).max() < 1e-4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "max abs difference batch 2:" in str(report) and "3 BatchNorm2d folded" in str(report)


@pytest.mark.slow
def test_small_vit_round_trip(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=128, num_labels=10))
    lrd.decompose(model, ratio=2.0, min_rank=2)
    assert isinstance(model.vit.embeddings.patch_embeddings.projection, TuckerConv2d)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    report = export_onnx(model, x, tmp_path / "vit.onnx")
    assert report.worst < 1e-4 * max(1.0, report.max_abs_output)
    assert np.abs(run_file(tmp_path / "vit.onnx", x) - expected(model, x)).max() < 1e-4


@pytest.mark.slow
def test_gpt2_conv1d_layers_round_trip_with_keyword_inputs(tmp_path):
    from transformers import GPT2Config, GPT2Model

    model = GPT2Model(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=100))
    plan = lrd.plan(model, ratio=2.0, min_rank=2)
    assert {row.layer_type for row in plan.decomposed} == {"Conv1D"}
    lrd.decompose(model, plan)
    model.eval()
    ids = torch.randint(0, 100, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    report = export_onnx(model, inputs, tmp_path / "gpt2.onnx")
    assert report.inputs == ["input_ids", "attention_mask"] and report.worst < 1e-4
    assert np.abs(run_file(tmp_path / "gpt2.onnx", inputs) - expected(model, inputs)).max() < 1e-4


@pytest.mark.slow
def test_a_mismatch_above_tolerance_writes_nothing(tmp_path):
    model, x = small_cnn(), torch.randn(2, 3, 16, 16)
    path = tmp_path / "cnn.onnx"
    path.write_text("the previous file")
    # folding in float32 moves outputs by rounding: a tolerance of 1e-12 cannot hold
    with pytest.raises(ValueError, match=r"differs from PyTorch by up to .* nothing written"):
        export_onnx(model, x, path, config=ExportConfig(fuse=True, tolerance=1e-12))
    assert path.read_text() == "the previous file" and [p.name for p in tmp_path.iterdir()] == ["cnn.onnx"]


def test_bad_inputs_are_refused(tmp_path):
    model = small_cnn()
    with pytest.raises(ValueError, match="tolerance must be"):
        export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", tolerance=0)
    with pytest.raises(ValueError, match="input 'mask' is a str"):
        export_onnx(model, {"x": torch.randn(2, 3, 8, 8), "mask": "all"}, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"call model.eval\(\) first"):
        export_onnx(model.train(), torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="unknown export_onnx settings"):
        export_onnx(model.eval(), torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", fold=True)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("dense, x, ranks", [
    (nn.Conv2d(32, 48, 1), torch.randn(2, 32, 7, 7), (8, 12)),
    (nn.Conv2d(32, 48, 3, stride=2, padding=1), torch.randn(2, 32, 9, 9), ((8, 12), (16, 6))),
    (nn.Linear(32, 48), torch.randn(2, 5, 32), (8, 12)),
])
def test_a_graph_reweighted_for_another_rank_computes_that_rank(dense, x, ranks):
    """Timing under onnxruntime exports a layer once and swaps the weights of each rank in."""
    layer_class = SVDLinear if isinstance(dense, nn.Linear) else SVDConv2d if dense.kernel_size == (1, 1) \
        else TuckerConv2d
    first, second = (layer_class.like(dense, r).eval() for r in ranks)
    proto = reweighted(export_program(first, x, optimize=False).model_proto, second)
    session = make_session(proto.SerializeToString())
    got = session.run(None, feeds(session, x))[0]
    assert got.shape == expected(second, x).shape
    assert np.abs(got - expected(second, x)).max() < 1e-4
