"""Real architectures no one here wrote: full rank reproduces them, ratio 2 halves the layers."""

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel._modules import call_model
from lrdaccel.factorize import svd_params, tucker2_params

pytestmark = pytest.mark.slow


def _hf_resnet50():
    from transformers import ResNetConfig, ResNetModel

    return ResNetModel(ResNetConfig()), torch.randn(1, 3, 64, 64)


def _hf_vit():
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=96, num_hidden_layers=3, num_attention_heads=4, intermediate_size=192,
                       image_size=64, patch_size=8)
    return ViTModel(config), torch.randn(2, 3, 64, 64)


def _hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    # GPT-2 small's real widths (768, Conv1D 768x2304 ...), two of its twelve blocks to keep CI short.
    return GPT2LMHeadModel(GPT2Config(n_layer=2)), {"input_ids": torch.randint(0, 50257, (1, 16))}


def _minilm():
    from lrdaccel import zoo

    tokenizer = zoo.minilm_tokenizer()
    batch = tokenizer(["Low-rank layers run faster.", "The cat sat on the mat."], padding=True, return_tensors="pt")
    return zoo.minilm(), dict(batch)


def _encoder():
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False), torch.randn(2, 7, 64)


MODELS = {"resnet50": _hf_resnet50, "vit": _hf_vit, "gpt2": _hf_gpt2, "minilm": _minilm, "encoder": _encoder}


def _output(model, inputs):
    with torch.no_grad():
        out = call_model(model, inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def _to_double(inputs):
    if isinstance(inputs, dict):
        return inputs
    return inputs.double()


@pytest.mark.parametrize("name", list(MODELS))
def test_full_rank_reproduces_output(name):
    model, inputs = MODELS[name]()
    model = model.double().eval()
    inputs = _to_double(inputs)
    expected = _output(model, inputs)
    report = lrd.decompose(model, lrd.plan(model, ranks="full"))
    assert len(report.layers) > 0
    actual = _output(model, inputs)
    scale = expected.abs().max()
    assert (actual - expected).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("name", list(MODELS))
def test_ratio_two_halves_decomposed_layers_exactly(name):
    model, inputs = MODELS[name]()
    model.eval()
    p = lrd.plan(model, ratio=2)
    lrd.decompose(model, p)
    assert p.decomposed
    for row in p.decomposed:
        module = model.get_submodule(row.name)
        c_out, c_in = row.shape["out"], row.shape["in"]
        if row.kind == "svd":
            expected = svd_params(c_out, c_in, row.rank)
        else:
            expected = tucker2_params(c_in, c_out, row.shape["kernel"][0] * row.shape["kernel"][1], *row.rank)
        assert module.factor_params() == expected == row.params_after
        assert row.params_after <= row.params_before / 2
    totals = p.totals()
    decomposed_before = sum(r.params_before for r in p.decomposed)
    decomposed_after = sum(r.params_after for r in p.decomposed)
    assert 0.40 < decomposed_after / decomposed_before <= 0.5
    assert totals["params_after"] < totals["params_before"]
    assert torch.isfinite(_output(model, inputs)).all()


def test_encoder_keeps_out_proj_with_reason():
    model, _ = _encoder()
    p = lrd.plan(model, ratio=2)
    out_proj = p["layers.0.self_attn.out_proj"]
    assert out_proj.kind == "keep" and "MultiheadAttention" in out_proj.reason
    lrd.decompose(model, p)
    assert isinstance(model.layers[0].linear1, lrd.SVDLinear)
    model.eval()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():  # fused fast path: reads linear1.weight, the dense weight rebuilt from factors
        fast = model(x)
    slow = model(x)  # with autograd on, the layer calls the factors
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_gpt2_lm_head_tied_to_embedding_is_kept():
    model, _ = _hf_gpt2()
    p = lrd.plan(model, ratio=2)
    assert p["lm_head"].kind == "keep" and "transformer.wte" in p["lm_head"].reason
    assert {r.layer_type for r in p.decomposed} == {"Conv1D"}
