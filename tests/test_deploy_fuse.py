"""BatchNorm folding: exact in float64 on HF ResNet (plain and decomposed), Sequential chains and
decomposed layers in either form; unfoldable pairs left and reported; training mode refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel._modules import output_tensor
from lrdaccel.deploy import fuse_batchnorm
from lrdaccel.layers import SVDConv2d, TuckerConv2d


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Random running statistics and affine parameters: folding must not rely on the defaults."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                if module.running_mean is not None:
                    module.running_mean.normal_(0, 0.5)
                    module.running_var.uniform_(0.3, 3.0)
                if module.affine:
                    module.weight.normal_(1, 0.5)
                    module.bias.normal_(0, 0.5)
    return model


def folded(model: nn.Module, x: torch.Tensor, with_inputs: bool = True):
    """(report, relative max error of the folded model against the original, folded model), float64;
    `x` is also given to fuse_batchnorm as example_inputs unless `with_inputs` is False."""
    model = randomize_batchnorm(model).double().eval()
    x = x.double()
    with torch.no_grad():
        expected = output_tensor(model(x))
        fused = copy.deepcopy(model)
        report = fuse_batchnorm(fused, x if with_inputs else None)
        got = output_tensor(fused(x))
    return report, float((got - expected).abs().max() / expected.abs().max()), fused


def hf_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 128, 256],
                                                     embedding_size=16, num_labels=10))


def bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_hf_resnet_every_batchnorm_folds_exactly():
    model = hf_resnet()
    total = bn_count(model)
    report, error, fused = folded(model, torch.randn(2, 3, 64, 64))
    assert error < 1e-5
    assert len(report.fused) == total == 17 and not report.skipped and not report.left and bn_count(fused) == 0
    # conv and norm are siblings inside ResNetConvLayer: found there, below the untraceable top
    assert ("resnet.embedder.embedder.convolution", "resnet.embedder.embedder.normalization") in report.fused
    assert "<model>" in report.untraced and "unchanged" in report.checked


def test_without_example_inputs_pairs_under_an_untraceable_parent_are_left_with_the_reason():
    model = hf_resnet()
    report, error, fused = folded(model, torch.randn(2, 3, 64, 64), with_inputs=False)
    assert error == 0 and not report.fused and bn_count(fused) == 17 and len(report.skipped) == 17
    assert all("pass example_inputs" in reason for _, _, reason in report.skipped)


def test_decomposed_hf_resnet_folds_into_the_last_factor():
    model = hf_resnet()
    lrd.decompose(model, ratio=2.0, min_rank=2)
    kinds = {type(m) for m in model.modules()}
    assert SVDConv2d in kinds and TuckerConv2d in kinds
    report, error, fused = folded(model, torch.randn(2, 3, 64, 64))
    assert error < 1e-5 and len(report.fused) == 17 and not report.left
    targets = {conv for conv, _ in report.fused}
    assert any(name.endswith(".last") for name in targets) and any(name.endswith(".second") for name in targets)
    for name in targets:
        parent = fused.get_submodule(name.rpartition(".")[0])
        if isinstance(parent, (SVDConv2d, TuckerConv2d)):
            assert parent.factors[-1] is fused.get_submodule(name) and parent.bias is not None


def test_sequential_chains_with_and_without_bias_affine_groups_and_padding_modes():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16, affine=False), nn.ReLU(),
        nn.Conv2d(16, 32, 1, stride=2, padding=1, padding_mode="reflect"), nn.BatchNorm2d(32), nn.ReLU())
    report, error, fused = folded(model, torch.randn(2, 3, 16, 16))
    assert error < 1e-5
    assert report.fused == [("0", "1"), ("3", "4"), ("6", "7")] and not report.left
    assert all(isinstance(fused[i], nn.Identity) for i in (1, 4, 7))
    assert fused[0].bias is not None  # the bias the folding needs was added


@pytest.mark.parametrize("form", SVDConv2d.FORMS)
def test_svd_conv_in_either_form_absorbs_the_norm(form):
    layer = SVDConv2d.from_dense(nn.Conv2d(8, 12, 1), 8).set_form(form)
    report, error, fused = folded(nn.Sequential(layer, nn.BatchNorm2d(12)), torch.randn(2, 8, 5, 5))
    assert error < 1e-5 and report.fused == [("0.second", "1")] and fused[0].form == form


class SharedOutput(nn.Module):
    """conv's output feeds the norm and the residual sum: folding would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(self.bn(y)) + y + self.bn2(self.conv2(x))


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class StandardizedConv(nn.Conv2d):
    """Normalises its weight in forward: scaling the weight would not fold anything."""

    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


def test_a_conv_output_read_elsewhere_is_left_and_reported():
    report, error, fused = folded(SharedOutput(), torch.randn(2, 8, 6, 6))
    assert error < 1e-5
    assert report.fused == [("conv2", "bn2")]
    assert report.skipped == [("conv", "bn", "the conv's output is also read elsewhere (2 readers, the BatchNorm "
                                             "among them: also add (functional code))")]
    assert report.left == ["bn"] and isinstance(fused.bn, nn.BatchNorm2d)
    assert "unfused conv -> bn" in str(report)


def test_a_module_called_twice_or_without_running_statistics_is_left():
    report, error, _ = folded(CalledTwice(), torch.randn(2, 8, 6, 6))
    assert error < 1e-5 and not report.fused and "runs 2 times and not every call feeds the BatchNorm alone" in \
        report.skipped[0][2]
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False))
    report, error, _ = folded(model, torch.randn(2, 3, 8, 8))
    assert error < 1e-5 and not report.fused and "no running statistics" in report.skipped[0][2]


def test_a_conv_subclass_is_not_folded():
    model = nn.Sequential(StandardizedConv(3, 8, 3), nn.BatchNorm2d(8))
    report, error, fused = folded(model, torch.randn(2, 3, 8, 8))
    assert error < 1e-5 and not report.fused and report.left == ["1"]
    (norm, reason), = report.unpaired
    assert norm == "1" and "StandardizedConv is a subclass of nn.Conv2d that redefines forward" in reason
    assert f"remains 1: {reason}" in str(report)


def test_training_mode_is_refused_and_the_model_is_unchanged():
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"eval-mode BatchNorm only.*call model.eval\(\) first"):
        fuse_batchnorm(model)
    model.eval()
    model[1].train()  # one norm left in training mode is refused too, naming it
    with pytest.raises(ValueError, match="training mode: 1"):
        fuse_batchnorm(model)
    assert isinstance(model[1], nn.BatchNorm2d) and model[0].bias is not None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
