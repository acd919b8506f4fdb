"""fuse_batchnorm folds only what it proves: every use of the conv accounted for (weights read in
forward, calls from an untraceable parent, hooks, aliases), merged and branched convs folded
exactly, a block called twice folded once, a probe that undoes a wrong fold, any device."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrdaccel as lrd
from lrdaccel.deploy import fuse as fuse_module
from lrdaccel.deploy import fuse_batchnorm
from lrdaccel.layers import BranchedTuckerConv2d
from lrdaccel.layers.merged import MergedConv2d
from test_deploy_fuse import bn_count, folded, randomize_batchnorm

X = torch.randn(2, 3, 8, 8)


class WeightReadInForward(nn.Module):
    """The issue's reproducer: the conv's weight also feeds a functional conv."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)) + F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)


class BufferReadInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.bn.running_var.mean()


class Child(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class UntraceableParent(nn.Module):
    """Branches on a value (torch.fx cannot trace it) and calls the child's conv outside the child."""

    def __init__(self, call_conv: bool = True, read_weight: bool = False, call_child_twice: bool = False):
        super().__init__()
        self.child = Child()
        self.call_conv, self.read_weight, self.call_child_twice = call_conv, read_weight, call_child_twice

    def forward(self, x):
        y = self.child(x)
        if float(x.sum()) > -1e9:  # data-dependent: not traceable
            if self.call_conv:
                y = y + self.child.conv(x)
            if self.read_weight:
                y = y * self.child.conv.weight.mean()
            if self.call_child_twice:
                y = y + self.child(x)
        return y


def changed(model: nn.Module, x: torch.Tensor, **kwargs) -> tuple[lrd.FuseReport, float]:
    """Fold in float32 (as users do) and return the report and the largest relative change."""
    model = randomize_batchnorm(model).eval()
    with torch.no_grad():
        before = model(x)
        report = fuse_batchnorm(model, **kwargs)
        after = model(x)
    return report, float((after - before).abs().max() / before.abs().max())


@pytest.mark.parametrize("with_inputs", [True, False])
def test_a_conv_whose_weight_is_also_read_in_forward_is_left_with_the_reason(with_inputs):
    report, change = changed(WeightReadInForward(), X, example_inputs=X if with_inputs else None)
    assert change == 0 and not report.fused and report.left == ["bn"]
    assert report.skipped == [("conv", "bn", "the conv's weight is also read directly (conv.weight); "
                                             "the conv's bias is also read directly (conv.bias)")]


class ParametersSummed(nn.Module):
    """Reads the conv's parameters through .parameters(): torch.fx runs this on the real tensors
    and bakes the sum into the graph as a constant, so no node reads them."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)) + sum(p.sum() for p in self.conv.parameters())


def test_parameters_read_for_their_value_while_traced_keep_the_pair():
    model = ParametersSummed()
    attributes = set(vars(model))
    report, change = changed(model, X)
    assert change == 0 and not report.fused
    assert "the conv's weight is read for its value while the forward is traced" in report.skipped[0][2]
    assert set(vars(model)) == attributes  # torch.fx's constants (_tensor_constant0) are not left on the model


class ReadsMetadata(nn.Module):
    """Reads the conv weight's dtype and shape only: folding changes neither, so the pair folds."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.conv(x.to(self.conv.weight.dtype)))
        return y[:, :self.conv.weight.shape[0]] * self.conv.weight.size(1)


class PairInUntraceableModule(ReadsMetadata):
    def forward(self, x):
        if float(x.sum()) > -1e9:  # torch.fx cannot trace the module that holds both
            return self.bn(self.conv(x))
        return x


def test_metadata_reads_fold_and_a_pair_inside_an_untraceable_module_says_why_it_stays():
    report, change = changed(ReadsMetadata(), X)
    assert change < 1e-5 and report.fused == [("conv", "bn")]
    report, change = changed(PairInUntraceableModule(), X, example_inputs=X)
    assert change == 0 and not report.fused and report.untraced == ["<model>"]
    assert report.unpaired == [("bn", "the model calls it, and torch.fx cannot trace the model: what feeds it is "
                                      "unknown")]


def test_a_batchnorm_whose_statistics_are_read_in_forward_is_left():
    report, change = changed(BufferReadInForward(), X, example_inputs=X)
    assert change == 0 and not report.fused
    assert "the BatchNorm's running_var is also read directly (bn.running_var)" in report.skipped[0][2]


@pytest.mark.parametrize("kwargs, reason", [
    ({"call_conv": True}, "the conv runs 2 times on example_inputs, but the traced step accounts for 1"),
    ({"call_conv": False, "read_weight": True}, "the conv's weight is read outside its own call on example_inputs"),
])
def test_an_untraceable_parent_that_uses_the_conv_outside_the_traced_child_stops_the_fold(kwargs, reason):
    report, change = changed(UntraceableParent(**kwargs), X, example_inputs=X)
    assert change == 0 and not report.fused and report.untraced == ["<model>"]
    assert report.skipped[0][:2] == ("child.conv", "child.bn") and reason in report.skipped[0][2]
    # without a forward there is no proof at all
    report, change = changed(UntraceableParent(**kwargs), X)
    assert change == 0 and not report.fused and "pass example_inputs" in report.skipped[0][2]


def test_a_traced_child_called_twice_by_an_untraceable_parent_folds_once():
    report, change = changed(UntraceableParent(call_conv=False, call_child_twice=True), X, example_inputs=X)
    assert change < 1e-5 and report.fused == [("child.conv", "child.bn")] and not report.skipped


class BlockCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())

    def forward(self, x):
        return self.block(self.block(x))


@pytest.mark.parametrize("with_inputs", [True, False])
def test_a_block_called_twice_is_one_pair_and_folds(with_inputs):
    report, change = changed(BlockCalledTwice(), X, example_inputs=X if with_inputs else None)
    assert change < 1e-5 and report.fused == [("block.0", "block.1")] and not report.skipped


def test_hooks_aliases_and_shared_weights_keep_the_pair():
    hooked = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    hooked[0].register_forward_hook(lambda module, args, output: output * 2)
    report, change = changed(hooked, X, example_inputs=X)
    assert change == 0 and "forward hooks on 0" in report.skipped[0][2]

    aliased = Child()
    aliased.alias = aliased.conv
    report, change = changed(aliased, X)
    assert change == 0 and "registered under several names" in report.skipped[0][2]

    tied = Child()
    tied.extra = nn.Conv2d(3, 8, 3, padding=1)  # not called, but holds the same weight
    tied.extra.weight = tied.conv.weight
    report, change = changed(tied, X)
    assert change == 0 and "the conv's weight is shared with another module" in report.skipped[0][2]


def test_a_parametrized_conv_is_left():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    report, change = changed(model, X, example_inputs=X)
    assert change == 0 and not report.fused and "parametrized" in report.skipped[0][2]


def merged_net() -> nn.Module:
    """A bottleneck merged by lrd.decompose (MergedConv2d and resized BatchNorms) and a branched core."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
    x = torch.randn(1, 16, 8, 8)
    plan = lrd.plan(block, ratio=2.0, merge=True, branches=2, example_inputs=x, min_rank=1)
    lrd.decompose(block, plan, calibration=[torch.randn(8, 16, 8, 8) for _ in range(4)])
    return block.eval()


def test_batchnorms_after_merged_convs_and_branched_cores_fold_exactly():
    model = merged_net()
    assert isinstance(model[0], MergedConv2d) and isinstance(model[8], BranchedTuckerConv2d)
    x = torch.randn(2, 16, 8, 8)
    report, error, fused = folded(model, x)
    assert error < 1e-5 and not report.left and bn_count(fused) == 0
    assert report.fused == [("0", "1"), ("3", "4"), ("6", "7"), ("8.last", "9")]
    report, error, _ = folded(merged_net(), x, with_inputs=False)  # traced whole: proven without a forward
    assert error < 1e-5 and len(report.fused) == 4


def test_the_probe_undoes_every_fold_when_outputs_change(monkeypatch):
    """A second line: if a proof were wrong, the outputs on example_inputs give it away."""
    real_fold = fuse_module.fold_into

    def wrong(conv, norm):
        real_fold(conv, norm)
        with torch.no_grad():
            conv.bias.add_(1.0)

    monkeypatch.setattr(fuse_module, "fold_into", wrong)
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                              nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8))).eval()
    state = copy.deepcopy(model.state_dict())
    with pytest.warns(RuntimeWarning, match="folding changed the outputs"):
        report = fuse_batchnorm(model, X)
    assert not report.fused and len(report.skipped) == 2 and "every fold was undone" in report.checked
    assert bn_count(model) == 2 and model[3].bias is None
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)) + torch.rand(())


def test_a_model_whose_outputs_vary_from_run_to_run_is_left_as_it_was():
    model = Noisy().eval()
    report = fuse_batchnorm(model, X)
    assert not report.fused and "differ from run to run" in report.checked and isinstance(model.bn, nn.BatchNorm2d)


def test_meta_weights_and_failing_inputs_are_refused_and_the_model_is_unchanged():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    with pytest.raises(ValueError, match=r"0.weight is on the meta device"):
        fuse_batchnorm(model)
    assert isinstance(model[1], nn.BatchNorm2d)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    with pytest.raises(ValueError, match="the model fails on example_inputs"):
        fuse_batchnorm(model, torch.randn(2, 5, 8, 8))
    assert isinstance(model[1], nn.BatchNorm2d) and model[0].bias is not None


def fold_on(device: str) -> None:
    """fuse_batchnorm in place on `device`: parameters stay there, outputs as before."""
    model = randomize_batchnorm(Child()).eval().to(device)
    x = X.to(device)
    with torch.no_grad():
        before = model(x)
        report = fuse_batchnorm(model, X)  # inputs on the CPU are moved to the model's device
        after = model(x)
    assert report.fused == [("conv", "bn")]
    assert {p.device.type for p in model.parameters()} == {torch.device(device).type}
    assert float((after - before).abs().max()) <= 1e-4 * float(before.abs().max())


def test_folding_leaves_a_cpu_model_on_the_cpu():
    fold_on("cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_folding_a_model_on_a_gpu_keeps_it_there():
    fold_on("cuda")
