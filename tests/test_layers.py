"""Every decomposed layer reproduces its dense layer at full rank, over many geometries."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from lrdaccel.layers import SVDConv2d, SVDLinear, TuckerConv2d

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOLERANCE = {torch.float64: dict(rtol=1e-5, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def _close(actual, expected, dtype):
    # Relative to the output's scale: outputs near zero make element-wise relative checks meaningless.
    scale = expected.abs().max().clamp_min(1.0)
    tol = TOLERANCE[dtype]
    assert (actual - expected).abs().max() <= tol["rtol"] * scale + tol["atol"]


@st.composite
def conv_configs(draw, pointwise: bool):
    kh, kw = (1, 1) if pointwise else (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    if not pointwise and kh == kw == 1:
        kw = 2
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (1, 1) if pointwise else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = draw(st.one_of(
        st.tuples(st.integers(0, 3), st.integers(0, 3)),
        st.integers(0, 3),
        st.just("valid"),
        st.just("same") if stride == (1, 1) else st.just("valid"),
    ))
    return dict(
        in_channels=draw(st.integers(1, 9)), out_channels=draw(st.integers(1, 9)), kernel_size=(kh, kw),
        stride=stride, padding=padding, dilation=dilation, padding_mode=padding_mode,
        bias=draw(st.booleans()),
    )


def _input_for(conv: nn.Conv2d, dtype) -> torch.Tensor:
    # Big enough for reflect/circular padding and the dilated kernel.
    pad = conv.padding if isinstance(conv.padding, tuple) else (0, 0)
    size = [max(2 * p + 1, (k - 1) * d + 2) + 3 for p, k, d in zip(pad, conv.kernel_size, conv.dilation)]
    return torch.randn(2, conv.in_channels, *size, dtype=dtype)


@PROPERTY
@given(config=conv_configs(pointwise=False), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_tucker_full_rank_matches_conv(config, dtype):
    conv = nn.Conv2d(**config).to(dtype)
    layer = TuckerConv2d.from_dense(conv, (conv.in_channels, conv.out_channels))
    x = _input_for(conv, dtype)
    with torch.no_grad():
        _close(layer(x), conv(x), dtype)
        _close(layer.to_dense()(x), conv(x), dtype)


@PROPERTY
@given(config=conv_configs(pointwise=True), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_svd_conv_full_rank_matches_conv(config, dtype):
    conv = nn.Conv2d(**config).to(dtype)
    layer = SVDConv2d.from_dense(conv, min(conv.in_channels, conv.out_channels))
    x = _input_for(conv, dtype)
    with torch.no_grad():
        _close(layer(x), conv(x), dtype)
        _close(layer.to_dense()(x), conv(x), dtype)


@PROPERTY
@given(n_in=st.integers(1, 24), n_out=st.integers(1, 24), bias=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_svd_linear_full_rank_matches_linear(n_in, n_out, bias, dtype):
    linear = nn.Linear(n_in, n_out, bias=bias).to(dtype)
    layer = SVDLinear.from_dense(linear, min(n_in, n_out))
    x = torch.randn(3, 5, n_in, dtype=dtype)
    with torch.no_grad():
        _close(layer(x), linear(x), dtype)
        _close(layer.to_dense()(x), linear(x), dtype)


@PROPERTY
@given(nx=st.integers(1, 24), nf=st.integers(1, 24), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_svd_linear_from_hf_conv1d(nx, nf, dtype):
    conv1d = Conv1D(nf, nx).to(dtype)
    nn.init.normal_(conv1d.bias)
    layer = SVDLinear.from_dense(conv1d, min(nx, nf))
    x = torch.randn(2, 4, nx, dtype=dtype)
    with torch.no_grad():
        _close(layer(x), conv1d(x), dtype)
        dense = layer.to_dense()
        assert type(dense) is Conv1D and dense.weight.shape == conv1d.weight.shape
        _close(dense(x), conv1d(x), dtype)


def test_truncated_rank_has_exact_factor_shapes_and_params():
    conv = nn.Conv2d(32, 48, 3, stride=2, padding=1)
    layer = TuckerConv2d.from_dense(conv, (8, 12))
    assert [f.weight.shape for f in layer.factors] == [(8, 32, 1, 1), (12, 8, 3, 3), (48, 12, 1, 1)]
    assert layer.factor_params() == 32 * 8 + 9 * 8 * 12 + 12 * 48
    assert layer.last.bias is not None and layer.first.bias is None and layer.core.bias is None
    assert layer.core.stride == (2, 2) and layer.first.stride == (1, 1)
    linear = SVDLinear.from_dense(nn.Linear(20, 30), 5)
    assert linear.factor_params() == 5 * (20 + 30) and linear.rank == 5
    assert "rank=5" in repr(linear) and "compression=2.40x" in repr(linear)


def test_from_dense_copies_device_dtype_requires_grad_and_mode():
    conv = nn.Conv2d(4, 6, 3).double().eval()
    conv.requires_grad_(False)
    layer = TuckerConv2d.from_dense(conv, 3)
    assert layer.rank == (3, 3)
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in layer.parameters())
    assert not layer.training and not any(m.training for m in layer.modules())


def test_from_dense_leaves_dense_layer_untouched():
    linear = nn.Linear(10, 8)
    before = copy.deepcopy(linear.state_dict())
    SVDLinear.from_dense(linear, 3)
    assert all(torch.equal(before[k], v) for k, v in linear.state_dict().items())


@pytest.mark.parametrize("rank", [0, -1, 9, 2.5, True, None])
def test_bad_svd_rank_names_layer_and_value(rank):
    with pytest.raises(ValueError, match=r"layer 'enc\.fc'.*rank"):
        SVDLinear.from_dense(nn.Linear(10, 8), rank, name="enc.fc")


@pytest.mark.parametrize("rank", [0, (3, 0), (5, 2), (2, 7), (1, 2, 3)])
def test_bad_tucker_rank_names_layer_and_value(rank):
    with pytest.raises(ValueError, match=r"layer 'block\.conv'"):
        TuckerConv2d.from_dense(nn.Conv2d(4, 6, 3), rank, name="block.conv")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_rejected(bad):
    linear = nn.Linear(6, 6)
    with torch.no_grad():
        linear.weight[2, 3] = bad
    with pytest.raises(ValueError, match=r"layer 'head'.*NaN/Inf"):
        SVDLinear.from_dense(linear, 3, name="head")


def test_grouped_conv_refused():
    with pytest.raises(ValueError, match="groups"):
        TuckerConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), 2)
    with pytest.raises(ValueError, match="groups"):
        SVDConv2d.from_dense(nn.Conv2d(4, 4, 1, groups=4), 2)


def test_gradients_flow_through_all_factors():
    layer = TuckerConv2d.from_dense(nn.Conv2d(3, 5, 3, padding=1), 2)
    layer(torch.randn(1, 3, 6, 6)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
