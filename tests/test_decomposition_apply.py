"""decompose(): atomic, exact at full rank, counts parameters and MACs, validates the plan."""

import copy

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from test_planning import Net


def snapshot(model):
    return copy.deepcopy(model.state_dict()), [type(m) for m in model.modules()]


def bitwise_equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def unchanged(model, snap):
    """Same module types and bitwise the same tensors (NaN included)."""
    state, types = snap
    now = model.state_dict()
    return state.keys() == now.keys() and all(bitwise_equal(state[k], now[k]) for k in state) and \
        types == [type(m) for m in model.modules()]


def test_full_rank_decomposition_reproduces_model():
    model = Net().double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    report = lrd.decompose(model, lrd.plan(model, ranks="full"))
    assert isinstance(model.conv, lrd.TuckerConv2d) and isinstance(model.fc, lrd.SVDLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
    assert max(r.relative_error for r in report.layers) < 1e-12


def test_ratio_counts_are_exact():
    model = Net()
    before = sum(p.numel() for p in model.parameters())
    report = lrd.decompose(model, ratio=2)
    after = sum(p.numel() for p in model.parameters())
    totals = report.totals()
    assert report.model_params_before == before and report.model_params_after == after
    # Biases are unchanged, so the whole difference is in the decomposed weights.
    assert before - after == totals["params_before"] - totals["params_after"]
    fc = next(r for r in report.layers if r.name == "fc")
    assert (fc.params_before, fc.params_after) == (25600, 35 * 356)
    assert 0 < fc.relative_error < 1 and report.macs_unit == "per output position"


def test_macs_counted_with_flop_counter_on_example_input():
    model = Net()
    x = torch.randn(2, 3, 32, 32)
    report = lrd.decompose(model, ratio=2, example_inputs=x)
    assert report.macs_unit == "per forward"
    assert report.model_macs_after < report.model_macs_before
    fc = next(r for r in report.layers if r.name == "fc")
    assert (fc.macs_before, fc.macs_after) == (2 * 25600, 2 * 35 * 356)  # batch 2, one position each
    pointwise = next(r for r in report.layers if r.name == "pointwise")
    assert pointwise.macs_after == 2 * 16 * 16 * 25 * (64 + 256)  # 16x16 positions after the stride-2 stem


def test_shortcut_and_plan_are_exclusive():
    model = Net()
    with pytest.raises(ValueError, match="not both"):
        lrd.decompose(model, lrd.plan(model), ratio=3)


def test_failure_midway_leaves_model_unchanged():
    model = Net()
    p = lrd.plan(model, ratio=2)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")  # the last decomposed layer fails after the others built
    snap = snapshot(model)
    with pytest.raises(ValueError, match="layer 'fc'.*NaN"):
        lrd.decompose(model, p)
    assert unchanged(model, snap)


@pytest.mark.parametrize("mutate,match", [
    (lambda m: setattr(m, "fc", nn.Linear(256, 50)), r"plan row 'fc'.*weight"),
    (lambda m: setattr(m, "fc", nn.Conv2d(256, 100, 1)), r"plan row 'fc'.*expected Linear"),
    (lambda m: delattr(m, "tiny"), r"plan row 'tiny'.*no such module"),
])
def test_plan_for_another_architecture_rejected(mutate, match):
    p = lrd.plan(Net(), ratio=2)
    other = Net()
    mutate(other)
    snap = snapshot(other)
    with pytest.raises(ValueError, match=match):
        lrd.decompose(other, p)
    assert unchanged(other, snap)


def test_plan_from_json_applies_identically():
    torch.manual_seed(1)
    a = Net()
    b = copy.deepcopy(a)
    p = lrd.plan(a, ratio=3)
    lrd.decompose(a, p)
    lrd.decompose(b, lrd.Plan.from_json(p.to_json()))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_training_mode_and_requires_grad_preserved():
    model = Net().eval()
    model.conv.requires_grad_(False)
    lrd.decompose(model, ratio=2)
    assert not model.training and not model.conv.core.training
    assert not any(p.requires_grad for p in model.conv.parameters())
    assert all(p.requires_grad for p in model.fc.parameters())


def test_report_prints():
    report = lrd.decompose(Net(), ratio=2, example_inputs=torch.randn(1, 3, 16, 16))
    text = str(report)
    assert "fc" in text and "model parameters" in text and "model MACs per forward" in text


def test_a_forward_that_fails_on_the_new_layers_rolls_the_swap_back():
    """MACs are counted after the swap; if the model's forward rejects the decomposed layers, the
    model ends exactly as it was (issue #13, item 2)."""

    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            if not isinstance(self.fc, nn.Linear):
                raise TypeError("Picky only runs nn.Linear")
            return self.fc(x)

    model = Picky()
    snap = snapshot(model)
    with pytest.raises(TypeError, match="Picky"):
        lrd.decompose(model, ratio=2.0, example_inputs=torch.randn(2, 64))
    assert unchanged(model, snap) and type(model.fc) is nn.Linear


def test_a_forward_reading_conv_attributes_works_after_the_swap():
    class ReadsPadding(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x):
            pad = self.c.padding[0]  # code in the wild reads the geometry of its convs
            return self.c(x)[..., pad:, pad:]

    model = ReadsPadding()
    report = lrd.decompose(model, ratio=2.0, example_inputs=torch.randn(1, 16, 8, 8))
    assert report.model_macs_after < report.model_macs_before


def test_the_report_of_a_model_without_parameters_prints():
    report = lrd.decompose(nn.Sequential(nn.ReLU()), ratio=2.0)
    assert "model parameters: 0 -> 0" in str(report)
