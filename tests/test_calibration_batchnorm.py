"""calibration/batchnorm.py: BatchNorm running statistics re-estimated exactly on unlabeled batches, modes
restored, nothing changed on error."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrdaccel as lrd
from lrdaccel.calibration import recalibrate_batchnorm


class Net(nn.Module):
    """conv -> BN -> ReLU -> dropout -> conv -> BN -> linear: the second BN sees the first BN's
    output, and dropout must stay off during re-estimation."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=0.3)
        self.drop = nn.Dropout(0.5)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6, momentum=None)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.drop(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(self.bn2(self.conv2(x)).mean((2, 3)))


def batches(sizes=(5, 3, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64) * 2 + 1 for n in sizes]


def statistics(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_statistics_equal_the_ones_computed_by_hand():
    model = Net().double()
    model.train()
    model.fc.eval()
    data = batches()
    report = recalibrate_batchnorm(model, data)
    assert report.layers == ["bn1", "bn2"] and report.batches == 3 and report.samples["bn1"] == 17 * 36
    # By hand: every BN input over all batches, each sample alike; the first BN normalizes each
    # batch by that batch's own statistics (training mode) before the second BN sees it.
    with torch.no_grad():
        first = [model.conv1(x) for x in data]
        second = [model.conv2(torch.relu(F.batch_norm(y, None, None, model.bn1.weight, model.bn1.bias, training=True,
                                                      eps=model.bn1.eps))) for y in first]
    for bn, inputs in ((model.bn1, first), (model.bn2, second)):
        values = torch.cat([y.movedim(1, -1).reshape(-1, y.shape[1]) for y in inputs])
        torch.testing.assert_close(bn.running_mean, values.mean(0))
        torch.testing.assert_close(bn.running_var, values.var(0, unbiased=True))
        assert bn.num_batches_tracked.item() == 3
    # Modes as they came in; momentum untouched.
    assert model.training and model.bn1.training and model.drop.training and not model.fc.training
    assert model.bn1.momentum == 0.3 and model.bn2.momentum is None
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == 0


def test_recovers_accuracy_lost_to_stale_statistics_after_decomposition():
    """A decomposed model's eval-mode output moves back towards the original once its BatchNorm
    statistics describe its own activations."""
    torch.manual_seed(0)
    original = Net().double()
    data = batches(sizes=(64, 64, 64), seed=1)
    recalibrate_batchnorm(original, data)  # statistics of the data, as a trained model has
    original.eval()
    decomposed = copy.deepcopy(original)
    lrd.decompose(decomposed, lrd.plan(decomposed, ranks={"conv1": (2, 2), "conv2": 2}, include=["conv1", "conv2"]))
    held_out = batches(sizes=(128,), seed=2)[0]
    with torch.no_grad():
        reference = original(held_out)
        stale = (decomposed(held_out) - reference).norm()
        recalibrate_batchnorm(decomposed, data)
        fresh = (decomposed(held_out) - reference).norm()
    assert fresh < stale


@pytest.mark.parametrize("data, message", [
    ([], "no batches"),
    (torch.randn(2, 3, 6, 6), "single Tensor"),
    ([torch.randn(4, 3, 6, 6), torch.randn(4, 5)], "calibration batch 1: the model failed"),
    ([torch.randn(4, 3, 6, 6), torch.full((4, 3, 6, 6), float("nan"))], "calibration batch 1: NaN/Inf reached BatchNorm 'bn1'"),
])
def test_errors_leave_every_statistic_and_mode_as_it_was(data, message):
    model = Net()
    recalibrate_batchnorm(model, [torch.randn(8, 3, 6, 6)])
    model.eval()
    model.drop.train()
    before = statistics(model)
    with pytest.raises(ValueError, match=message):
        recalibrate_batchnorm(model, data)
    after = statistics(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training and model.drop.training and not model.bn1.training


def test_a_model_without_batchnorm_and_a_single_value_per_channel():
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_batchnorm(nn.Sequential(nn.Linear(3, 3)), [torch.randn(2, 3)])
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="calibration batch 0: .*more than 1 value per channel"):
        recalibrate_batchnorm(model, [torch.randn(1, 3)])


def test_a_batchnorm_the_forward_never_reaches_keeps_its_statistics():
    class WithUnused(Net):
        def __init__(self):
            super().__init__()
            self.spare = nn.BatchNorm2d(8)
            self.spare.running_mean.fill_(3.0)

    model = WithUnused()
    report = recalibrate_batchnorm(model, [torch.randn(4, 3, 6, 6)])
    assert report.layers == ["bn1", "bn2"] and torch.all(model.spare.running_mean == 3.0)


def test_a_model_on_the_meta_device_is_refused_with_a_value_error():
    with torch.device("meta"):
        model = Net()
    with pytest.raises(ValueError, match=r"recalibrate_batchnorm: conv1.weight is on the meta device"):
        recalibrate_batchnorm(model, batches())
