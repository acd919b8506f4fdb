"""`export_onnx(..., quantize="int8")` and the dynamic axes: an int8 file of a decomposed small BERT
runs at another batch size and sequence length; a CNN's convs go static int8 with calibration;
a model that fixes its batch is one line before anything is written."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.deploy.onnx_session import feeds, make_session

pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128)
    return transformers.BertModel(config).eval()


def tokens(batch: int, length: int) -> dict:
    torch.manual_seed(batch * 1000 + length)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2:] = 0  # one padded sentence
    return {"input_ids": torch.randint(1, 100, (batch, length)), "attention_mask": mask}


def run(path, inputs) -> np.ndarray:
    session = make_session(str(path))
    return session.run(None, feeds(session, inputs))[0]


def ops(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.slow
def test_int8_export_of_a_decomposed_bert_runs_at_another_batch_and_length(tmp_path):
    model = tiny_bert()
    lrd.decompose(model, ratio=2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = lrd.export_onnx(model, tokens(4, 16), tmp_path / "bert.onnx", quantize="int8")
    assert report.quantize == "int8" and report.int8_ops > 0 and "MatMulInteger" in ops(tmp_path / "bert.onnx")
    assert [(c["batch"], c["tokens"]) for c in report.checks] == [(4, 16), (5, 8)] and report.tolerance == 0.25
    assert min(c["cosine"] for c in report.checks) > 0.99 and "batch 5 x 8 tokens" in str(report)
    assert "(cosine 0.99" in str(report) or "(cosine 1.0000)" in str(report)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    other = tokens(3, 9)
    with torch.no_grad():
        expected = model(**other).last_hidden_state.numpy()
    got = run(tmp_path / "bert.onnx", other)
    assert got.shape == (3, 9, 32)
    keep = other["attention_mask"].bool().numpy()
    assert np.abs(got - expected)[keep].max() < 0.25 * max(1.0, np.abs(expected).max())


@pytest.mark.slow
def test_float_bert_exported_at_64_tokens_runs_at_32():
    """0.3.0 fixed the sequence length: `INVALID_ARGUMENT ... Got: 32 Expected: 64`."""
    import tempfile

    model = tiny_bert()
    with tempfile.TemporaryDirectory() as scratch:
        path = f"{scratch}/bert.onnx"
        lrd.export_onnx(model, tokens(2, 64), path)
        short = tokens(2, 32)
        with torch.no_grad():
            expected = model(**short).last_hidden_state.numpy()
        keep = short["attention_mask"].bool().numpy()
        assert np.abs(run(path, short) - expected)[keep].max() < 1e-4


def test_int8_cnn_export_quantizes_convs_statically_only_with_calibration(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    lrd.decompose(model, ratio=2.0)
    x = torch.randn(8, 3, 16, 16)
    dynamic = lrd.export_onnx(model, x, tmp_path / "d.onnx", quantize="int8")
    static = lrd.export_onnx(model, x, tmp_path / "s.onnx", quantize="int8", calibration=[x[:4], x[4:]])
    assert "QuantizeLinear" not in ops(tmp_path / "d.onnx") and "QuantizeLinear" in ops(tmp_path / "s.onnx")
    assert static.int8_ops > dynamic.int8_ops and static.worst <= static.tolerance * max(1, static.max_abs_output)


def test_a_fixed_batch_with_free_length_is_checked_at_both_lengths(tmp_path):
    model = tiny_bert()
    report = lrd.export_onnx(model, tokens(2, 12), tmp_path / "bert.onnx", dynamic_batch=False)
    assert [(c["batch"], c["tokens"]) for c in report.checks] == [(2, 12), (2, 6)] and report.worst < 1e-4


def test_int8_with_nothing_to_quantize_writes_nothing(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    with pytest.raises(ValueError, match="quantized nothing in the graph.*need calibration batches"):
        lrd.export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", quantize="int8")
    assert not (tmp_path / "m.onnx").exists()


class FixedBatch(nn.Module):
    """Reshapes to a constant batch of 4 (issue 30, item 11)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, x):
        return self.linear(x.reshape(4, -1))


def test_fixed_batch_model_is_one_line_suggesting_no_dynamic_batch(tmp_path):
    """0.3.0: a RuntimeError traceback."""
    with pytest.raises(ValueError, match=r"^export_onnx: FixedBatch fails at batch 5 .*--no-dynamic-batch") as error:
        lrd.export_onnx(FixedBatch().eval(), torch.randn(4, 2, 4), tmp_path / "m.onnx")
    assert "\n" not in str(error.value) and not (tmp_path / "m.onnx").exists()
    report = lrd.export_onnx(FixedBatch().eval(), torch.randn(4, 2, 4), tmp_path / "m.onnx", dynamic_batch=False)
    assert list(report.max_abs_diff) == [4]


def test_bad_quantize_settings_are_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    with pytest.raises(ValueError, match="quantize must be one of"):
        lrd.export_onnx(model, torch.randn(2, 4), tmp_path / "m.onnx", quantize="int4")
    with pytest.raises(ValueError, match="calibration batches are for quantize='int8'"):
        lrd.export_onnx(model, torch.randn(2, 4), tmp_path / "m.onnx", calibration=[torch.randn(2, 4)])
    assert not (tmp_path / "m.onnx").exists()


class FixedLength(nn.Module):
    """Flattens 16 token embeddings into one Linear: it takes no other length."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(50, 4), nn.Linear(16 * 4, 3)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids).flatten(1))


def test_fixed_length_model_is_one_line_suggesting_no_dynamic_sequence(tmp_path):
    ids = {"input_ids": torch.randint(0, 50, (2, 16))}
    with pytest.raises(ValueError, match=r"fails at batch 3 x 8 tokens .*--no-dynamic-sequence") as error:
        lrd.export_onnx(FixedLength().eval(), ids, tmp_path / "m.onnx")
    assert "\n" not in str(error.value) and not (tmp_path / "m.onnx").exists()
    report = lrd.export_onnx(FixedLength().eval(), ids, tmp_path / "m.onnx", dynamic_sequence=False)
    assert [(c["batch"], c["tokens"]) for c in report.checks] == [(2, None), (3, None)]
