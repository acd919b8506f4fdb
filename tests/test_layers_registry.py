"""Which layers the registry decomposes: subclasses that keep the base forward are decomposed
(exactly at full rank); subclasses with their own forward, computed weights, and unsupported
layer types are kept with a reason (issue #13, items 1 and 3)."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lrdaccel as lrd
from lrdaccel.layers.registry import REGISTRY


def _examples():
    """One (module, input) per registry entry, in registry order."""
    return [
        (lambda cls: cls(12, 10), (4, 12), nn.Linear),
        (lambda cls: cls(10, 12), (4, 12), Conv1D),  # nf=10 out, nx=12 in
        (lambda cls: cls(6, 8, 1, stride=2, padding=1), (2, 6, 7, 7), nn.Conv2d),
        (lambda cls: cls(6, 8, 3, padding=1), (2, 6, 7, 7), nn.Conv2d),
    ]


def test_every_registry_entry_has_an_example():
    kinds = [entry.layer_class.__name__ for entry in REGISTRY]
    assert kinds == ["SVDLinear", "SVDLinear", "SVDConv2d", "TuckerConv2d"]
    assert len(_examples()) == len(REGISTRY)


@pytest.mark.parametrize("index", range(4))
def test_a_subclass_with_its_own_forward_is_kept(index):
    make, shape, base = _examples()[index]

    class Doubled(base):
        def forward(self, x):  # noqa: D401 - a layer that does more than its base
            return super().forward(x) * 2

    model = nn.Sequential(make(Doubled)).double()
    x = torch.randn(*shape, dtype=torch.float64)
    expected = model(x)
    plan = lrd.plan(model, ranks="full", min_rank=1)
    row = plan["0"]
    assert row.kind == "keep" and "Doubled subclasses" in row.reason and "own forward" in row.reason
    assert not row.supported
    lrd.decompose(model, plan)
    assert type(model[0]) is Doubled and torch.equal(model(x), expected)


@pytest.mark.parametrize("index", range(4))
def test_a_subclass_that_keeps_the_base_forward_is_decomposed_exactly(index):
    make, shape, base = _examples()[index]

    class Tagged(base):
        tag = "mine"

    model = nn.Sequential(make(Tagged)).double()
    x = torch.randn(*shape, dtype=torch.float64)
    expected = model(x)
    report = lrd.decompose(model, ranks="full", min_rank=1)
    assert isinstance(model[0], lrd.LowRankModule) and report.layers[0].name == "0"
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
    assert lrd.plan(nn.Sequential(make(Tagged))).layers[0].layer_type == "Tagged"


def test_the_issue_reproducer_scaled_linear():
    class ScaledLinear(nn.Linear):
        forward = lambda self, x: super(ScaledLinear, self).forward(x) * 2  # noqa: E731

    model = nn.Sequential(ScaledLinear(32, 32))
    x = torch.randn(3, 32)
    expected = model(x)
    lrd.decompose(model, ranks={"0": 32})
    assert torch.equal(model(x), expected)  # kept, so nothing lost (was 0.49 error at full rank)


def test_qat_linear_from_pytorch_is_kept():
    from torch.ao.nn.qat import Linear as QATLinear
    from torch.ao.quantization import get_default_qat_qconfig

    layer = QATLinear(16, 16, qconfig=get_default_qat_qconfig("x86"))
    row = lrd.plan(nn.Sequential(layer), ranks="full").layers[0]
    assert row.kind == "keep" and "own forward" in row.reason


@pytest.mark.parametrize("parametrize", ["weight_norm", "spectral_norm", "orthogonal", "old_weight_norm",
                                         "old_spectral_norm"])
def test_parametrized_layers_are_planned_not_crashed_on(parametrize):
    from torch.nn.utils import parametrizations

    layer = nn.Linear(16, 16)
    if parametrize == "old_weight_norm":
        layer = nn.utils.weight_norm(layer)
    elif parametrize == "old_spectral_norm":
        layer = nn.utils.spectral_norm(layer)
    else:
        layer = getattr(parametrizations, parametrize)(layer)
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(16, 16))
    plan = lrd.plan(model, ratio=2.0, min_rank=1)
    assert plan["0"].kind == "keep" and "weight is computed" in plan["0"].reason
    assert plan["2"].kind == "svd"
    # include / exclude still apply to it, and decomposing the rest leaves it working
    assert lrd.plan(model, ratio=2.0, min_rank=1, exclude=["0"])["0"].reason == "excluded by user"
    x = torch.randn(2, 16)
    lrd.decompose(model, plan)
    assert model(x).shape == (2, 16) and model[0] is layer


@pytest.mark.parametrize("layer, reason", [
    (nn.Conv1d(4, 8, 3), "Conv1d is not supported"),
    (nn.Conv3d(4, 8, 3), "Conv3d is not supported"),
    (nn.ConvTranspose2d(4, 8, 3), "transposed conv"),
    (nn.LazyLinear(8), "lazy module"),
    (nn.LazyConv2d(8, 3), "lazy module"),
    (nn.Embedding(10, 4), "table lookup"),
    (nn.Bilinear(4, 4, 4), "Bilinear is not supported"),
])
def test_unsupported_layer_types_are_in_the_plan_with_a_reason(layer, reason):
    model = nn.Sequential(layer, nn.Linear(64, 64))
    plan = lrd.plan(model)
    row = plan["0"]
    assert row.kind == "keep" and reason in row.reason and "supported:" in row.reason and not row.supported
    assert plan.totals()["params_before"] == 64 * 64  # unsupported rows are listed, not counted
    assert Plan_round_trip(plan)["0"].reason == row.reason
    assert "0" in str(plan)


def Plan_round_trip(plan):
    return lrd.Plan.from_json(plan.to_json())


def test_decomposed_convs_expose_the_conv_attributes_code_reads():
    conv = nn.Conv2d(8, 16, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), padding_mode="reflect")
    point = nn.Conv2d(8, 16, 1, stride=2, padding=1)
    model = nn.Sequential(conv, point)
    lrd.decompose(model, ranks={"0": 4, "1": 4})
    for original, new in ((conv, model[0]), (point, model[1])):
        for attribute in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                          "padding_mode"):
            assert getattr(new, attribute) == getattr(original, attribute), attribute


def test_writing_into_the_rebuilt_weight_raises_instead_of_doing_nothing():
    model = nn.Sequential(nn.Linear(16, 16))
    lrd.decompose(model, ranks={"0": 4})
    before = model[0].first.weight.clone()
    with pytest.raises(RuntimeError, match="rebuilt from its factors.*layer.factors"):
        nn.init.zeros_(model[0].weight)
    with pytest.raises(RuntimeError, match="rebuilt"):
        model[0].weight[0, 0] = 1.0
    assert torch.equal(model[0].first.weight, before)
    # reading it still works, with gradients to the factors
    weight = model[0].weight
    assert type(weight * 1) is torch.Tensor and weight.dtype == torch.float32
    weight.sum().backward()
    assert model[0].first.weight.grad is not None
