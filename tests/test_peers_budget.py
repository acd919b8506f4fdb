"""peers/budget.py: the fewest parameters pruning can leave (a budget below it is refused early)."""

import pytest
import torch
from torch import nn

from lrdaccel.measure.counting import count_params

pytest.importorskip("torch_pruning")

from lrdaccel.peers.budget import pruning_floor  # noqa: E402
from lrdaccel.peers import prune  # noqa: E402


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def test_the_floor_is_the_model_pruned_at_the_largest_ratio_and_the_model_is_unchanged():
    model, x = mlp(), torch.randn(4, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    floor = pruning_floor(model, x)
    # 64 -> 6 hidden channels (ratio 0.9): 32*6+6 + 6*6+6 + 6*4+4, the output width kept
    assert floor == 268 == count_params(prune(model, x, pruning_ratio=0.9)[0])
    assert pruning_floor(model, x, exclude=["2"]) > floor  # an excluded layer keeps its width
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
