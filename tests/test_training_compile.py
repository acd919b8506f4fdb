"""torch.compile keeps training correctly across phase switches: guards on requires_grad recompile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import lrdaccel as lrd


def _model():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    lrd.decompose(model, ratio=1.2, min_rank=1)  # layers this narrow fall under the default min_rank
    return model


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_model_matches_eager_across_switches(backend):
    torch._dynamo.reset()
    counters.clear()
    model = _model()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend)
    freezer = lrd.SequentialFreezer(compiled)  # the freezer sees through `_orig_mod`
    eager_freezer = lrd.SequentialFreezer(eager)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    eager_optimizer = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    graphs = []
    for phase in range(3):
        freezer.set_epoch(phase)
        eager_freezer.set_epoch(phase)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for _ in range(2):
            x = torch.randn(5, 8, generator=generator)
            for net, opt in ((compiled, optimizer), (eager, eager_optimizer)):
                opt.zero_grad()
                net(x).square().mean().backward()
            for (name, p), q in zip(model.named_parameters(), eager.parameters()):
                assert (p.grad is None) == (q.grad is None) == (not p.requires_grad), (phase, name)
                if p.grad is not None:
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
            optimizer.step()
            eager_optimizer.step()
        trainable = set(freezer.report().trainable)
        for name, p in model.named_parameters():
            assert torch.equal(p, before[name]) != (name in trainable), (phase, name)
        graphs.append(counters["stats"]["unique_graphs"])
    # One graph for phase 0 (first factors), a recompile for phase 1 (second factors), and
    # phase 2 trains the first factors again: the cached graph of phase 0 serves it.
    assert graphs == [1, 2, 2]
