"""`lrd.quantize`: an int8 copy of an original, decomposed, merged-free or pruned model, the input
bitwise unchanged; it prints; `lrd.save` refuses it before writing; nothing to quantize is a
one-line error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.layers import SVDConv2d, SVDLinear, TuckerConv2d


def state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                         nn.Conv2d(32, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def test_decomposed_linear_model_quantizes_to_a_copy_close_to_the_float_model():
    model = mlp()
    lrd.decompose(model, ratio=2.0)
    model.train()
    before = state(model)
    quantized = lrd.quantize(model, "int8")
    assert unchanged(model, before) and model.training and isinstance(model[0].first, nn.Linear)
    kinds = [m._get_name() for m in quantized.modules()]
    assert kinds.count("DynamicQuantizedLinear") == 4  # the two factors of each of the two SVDLinear
    x = torch.randn(16, 64)
    with torch.no_grad():
        expected, got = model.eval()(x), quantized(x)
    assert not quantized.training and (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_quantized_decomposed_model_prints_its_ranks():
    """0.3.0: repr raised AttributeError: 'SVDLinear' object has no attribute 'rank'."""
    model = mlp()
    lrd.decompose(model, ratio=2.0)
    text = repr(lrd.quantize(model, "int8"))
    assert f"kind=svd, rank={model[0].rank}, compression=" in text and model[0].extra_repr() in text
    assert "DynamicQuantizedLinear" in text


def test_save_refuses_a_quantized_model_before_writing(tmp_path):
    """0.3.0: lrd.save raised "'torch.dtype' object has no attribute 'numel'"."""
    model = mlp()
    lrd.decompose(model, ratio=2.0)
    quantized = lrd.quantize(model, "int8")
    with pytest.raises(ValueError, match=r"^lrd.save: layer '0.first' is quantized \(DynamicQuantizedLinear\).*"
                                         r"save the float model and quantize after lrd.load") as error:
        lrd.save(quantized, tmp_path / "out")
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_save_refuses_a_model_quantized_by_hand_too(tmp_path):
    model = mlp()
    lrd.decompose(model, ratio=2.0)
    by_hand = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ValueError, match="is quantized"):
        lrd.save(by_hand, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_float_model_saved_loads_and_quantizes_to_identical_outputs(tmp_path):
    """The way to serve a saved model in int8: save the float model, quantize after loading."""
    model = mlp()
    lrd.decompose(model, ratio=2.0)
    lrd.save(model, tmp_path / "out")
    loaded = lrd.load(tmp_path / "out", mlp())
    x = torch.randn(8, 64)
    with torch.no_grad():
        assert torch.equal(lrd.quantize(loaded, "int8")(x), lrd.quantize(model, "int8")(x))


def test_cnn_with_calibration_gets_static_int8_convs_decomposed_ones_as_one_unit():
    model = cnn()
    lrd.decompose(model, ratio=2.0)
    assert isinstance(model[2], TuckerConv2d) and isinstance(model[4], SVDConv2d)
    before = state(model)
    x = torch.randn(16, 3, 16, 16)
    quantized = lrd.quantize(model, "int8", calibration=[x[:8], x[8:]])
    assert unchanged(model, before)
    names = [m._get_name() for m in quantized.modules()]
    assert names.count("QuantizedConv2d") == 1 + 3 + 2 and names.count("ServedConv") == 3
    assert quantized[2].module.rank == model[2].rank and "kind=tucker2" in repr(quantized)
    with torch.no_grad():
        expected = model(x)
        assert (quantized(x) - expected).abs().max() < 0.05 * expected.abs().max()


def test_cnn_without_calibration_quantizes_only_its_linear():
    quantized = lrd.quantize(cnn(), "int8")
    names = [m._get_name() for m in quantized.modules()]
    assert names.count("DynamicQuantizedLinear") == 1 and "QuantizedConv2d" not in names


def test_pruned_model_quantizes():
    pytest.importorskip("torch_pruning")
    from lrdaccel.peers import prune

    model = mlp()
    x = torch.randn(4, 64)
    pruned, _ = prune(model, x, pruning_ratio=0.5)
    quantized = lrd.quantize(pruned, "int8")
    assert [m.out_features for m in quantized.modules() if m._get_name() == "DynamicQuantizedLinear"] == [64, 32]


def test_hf_conv1d_becomes_a_quantized_linear_with_the_same_output():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(96, 64), nn.ReLU(), Conv1D(32, 96)).eval()
    lrd.decompose(model, ratio=2.0, include=["0"])
    assert isinstance(model[0], SVDLinear) and model[0].transposed and type(model[2]) is Conv1D
    before = state(model)
    quantized = lrd.quantize(model, "int8")
    assert unchanged(model, before) and transformers
    assert [m._get_name() for m in quantized.modules()].count("DynamicQuantizedLinear") == 3
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = model(x)
        assert (quantized(x) - expected).abs().max() < 0.05 * expected.abs().max()


def test_nothing_to_quantize_is_a_one_line_error_naming_the_convs_that_need_calibration():
    convs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match=r"^lrd.quantize: Sequential has no layer int8 can quantize .*its 2 "
                                         r"Conv2d layer\(s\) need calibration batches") as error:
        lrd.quantize(convs, "int8")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="no layer int8 can quantize"):
        lrd.quantize(nn.Sequential(nn.ReLU()), "int8")


def test_unknown_dtype_and_bad_calibration_are_refused():
    with pytest.raises(ValueError, match="int4"):
        lrd.quantize(mlp(), "int4")
    with pytest.raises(ValueError, match="single Tensor"):
        lrd.quantize(cnn(), "int8", calibration=torch.randn(2, 3, 16, 16))


def test_a_model_that_is_one_layer_is_quantized_too():
    """A bare Linear, conv or decomposed conv (what rank search times) comes back quantized."""
    x = torch.randn(2, 16, 4, 4)
    linear = lrd.quantize(nn.Linear(8, 8), "int8")
    assert linear._get_name() == "DynamicQuantizedLinear"
    conv = nn.Conv2d(16, 32, 3, padding=1).eval()
    quantized = lrd.quantize(conv, "int8", calibration=[x])
    assert quantized._get_name() == "ServedConv" and quantized.module._get_name() == "QuantizedConv2d"
    tucker = TuckerConv2d.from_dense(conv, (8, 8)).eval()
    quantized = lrd.quantize(tucker, "int8", calibration=[x])
    assert [m._get_name() for m in quantized.module.factors] == ["QuantizedConv2d"] * 3
    with torch.no_grad():
        assert (quantized(x) - tucker(x)).abs().max() < 0.05 * tucker(x).abs().max()


def test_a_bfloat16_model_is_served_in_float32_around_int8_layers_and_stays_bfloat16():
    model = mlp().to(torch.bfloat16)
    quantized = lrd.quantize(model, "int8")
    assert next(model.parameters()).dtype == torch.bfloat16
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = model.float()(x)
        assert (quantized(x) - expected).abs().max() < 0.05 * expected.abs().max()


def test_a_model_without_values_is_refused():
    with torch.device("meta"):
        model = mlp()
    with pytest.raises(ValueError, match=r"^lrd.quantize: 0.weight is on the meta device"):
        lrd.quantize(model, "int8")


def test_a_decomposed_hf_vit_quantizes_with_its_patch_conv_still_answering_weight():
    """HF ViT reads `projection.weight.dtype` on every forward: the int8 patch conv answers it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    lrd.decompose(model, ratio=2.0)
    x = torch.randn(4, 3, 16, 16)
    quantized = lrd.quantize(model, "int8", calibration=[x])
    projection = quantized.embeddings.patch_embeddings.projection
    assert projection._get_name() == "ServedConv" and projection.weight.dtype == torch.float32
    with torch.no_grad():
        expected = model(x).last_hidden_state
        got = quantized(x).last_hidden_state
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()


def test_the_dense_view_of_a_quantized_decomposed_layer_is_its_dequantized_product():
    model = mlp()
    lrd.decompose(model, ratio=2.0)
    quantized = lrd.quantize(model, "int8")
    with torch.no_grad():
        assert (quantized[0].weight - model[0].weight).abs().max() < 0.02 * model[0].weight.abs().max()
