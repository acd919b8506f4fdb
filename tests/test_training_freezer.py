"""SequentialFreezer: schedule tables, optimizer honesty, reporting, state_dict, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel._modules import clean_name


class Tiny(nn.Module):
    """One Tucker-2 conv, one SVD 1x1 conv, one SVD linear, and an undecomposed BatchNorm + head."""

    def __init__(self):
        super().__init__()
        self.conv = lrd.TuckerConv2d.from_dense(nn.Conv2d(3, 8, 3, padding=1), (3, 4))
        self.bn = nn.BatchNorm2d(8)
        self.point = lrd.SVDConv2d.from_dense(nn.Conv2d(8, 8, 1), 3)
        self.fc = lrd.SVDLinear.from_dense(nn.Linear(8, 6), 3)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.point(x)).mean((2, 3))
        return self.head(torch.relu(self.fc(x)))


def factor_names(model, freezer):
    """Per decomposed layer, the names of the factors whose parameters require grad now."""
    out = {}
    for layer_name in ("conv", "point", "fc"):
        layer = model.get_submodule(layer_name)
        names = [n for n, child in layer.named_children()
                 if all(p.requires_grad for p in child.parameters())]
        frozen = [n for n, child in layer.named_children() if not any(p.requires_grad for p in child.parameters())]
        assert sorted(names + frozen) == sorted(n for n, _ in layer.named_children())  # no half-frozen factor
        out[layer_name] = tuple(names)
    return out


# Expected trainable factors for phases 0..5, written out by hand: (Tucker conv, SVD conv, SVD linear).
SCHEDULE_TABLES = {
    "rotate": [
        (("first",), ("first",), ("first",)),
        (("core",), ("second",), ("second",)),
        (("last",), ("first",), ("first",)),
        (("first",), ("second",), ("second",)),
        (("core",), ("first",), ("first",)),
        (("last",), ("second",), ("second",)),
    ],
    "freeze_one": [
        (("core", "last"), ("second",), ("second",)),
        (("first", "last"), ("first",), ("first",)),
        (("first", "core"), ("second",), ("second",)),
        (("core", "last"), ("first",), ("first",)),
        (("first", "last"), ("second",), ("second",)),
        (("first", "core"), ("first",), ("first",)),
    ],
    "static": [(("core",), ("second",), ("second",))] * 6,
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULE_TABLES))
def test_schedule_table(schedule):
    model = Tiny()
    freezer = lrd.SequentialFreezer(model, schedule=schedule)
    for phase, expected in enumerate(SCHEDULE_TABLES[schedule]):
        freezer.set_epoch(phase)
        assert freezer.phase == phase
        got = factor_names(model, freezer)
        assert (got["conv"], got["point"], got["fc"]) == expected, f"phase {phase}"
        assert model.head.weight.requires_grad and model.bn.weight.requires_grad  # undecomposed untouched


def test_callable_schedule_and_bias_goes_with_its_factor():
    model = Tiny()
    freezer = lrd.SequentialFreezer(model, schedule=lambda phase, m: [len(m.factors) - 1] if phase % 2 else [0])
    assert not model.fc.second.bias.requires_grad and model.fc.first.weight.requires_grad
    freezer.set_epoch(1)
    assert model.fc.second.bias.requires_grad and model.conv.last.bias.requires_grad
    assert not model.fc.first.weight.requires_grad and not model.conv.core.weight.requires_grad
    assert freezer.report().layers == {"conv": (2,), "point": (1,), "fc": (1,)}


def test_every_epochs_and_every_steps():
    model = Tiny()
    freezer = lrd.SequentialFreezer(model, every_epochs=2)
    switched, phases = [], []
    for epoch in range(5):
        switched.append(freezer.set_epoch(epoch))
        phases.append(freezer.phase)
    assert phases == [0, 0, 1, 1, 2] and switched == [False, False, True, False, True]
    freezer = lrd.SequentialFreezer(Tiny(), every_steps=3)
    phases = []
    for _ in range(7):
        phases.append(freezer.phase)
        freezer.step()
    assert phases == [0, 0, 0, 1, 1, 1, 2]
    freezer.set_epoch(5)  # epochs do not switch phases in step mode
    assert freezer.phase == 2
    assert freezer.set_step(9) and freezer.phase == 3


def test_report_counts_and_share():
    model = Tiny()
    freezer = lrd.SequentialFreezer(model)
    report = freezer.report()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = (model.conv.first.weight.numel() + model.point.first.weight.numel() + model.fc.first.weight.numel()
                + sum(p.numel() for p in model.bn.parameters()) + sum(p.numel() for p in model.head.parameters()))
    assert report.trainable_params == trainable == expected
    assert report.total_params == total
    assert report.share == pytest.approx(expected / total)
    assert set(report.trainable) == {"conv.first.weight", "point.first.weight", "fc.first.weight",
                                     "bn.weight", "bn.bias", "head.weight", "head.bias"}
    assert len(report.trainable) + len(report.frozen) == len(list(model.parameters()))
    assert "phase 0" in str(report) and "conv" in report.table()
    assert freezer.cycle == 6


def test_freeze_undecomposed_and_user_frozen_params_stay_frozen():
    model = Tiny()
    model.fc.requires_grad_(False)  # the user froze this layer: never thawed
    freezer = lrd.SequentialFreezer(model, freeze_undecomposed=True)
    for phase in range(4):
        freezer.set_epoch(phase)
        assert not any(p.requires_grad for p in model.fc.parameters())
        assert not model.head.weight.requires_grad and not model.bn.weight.requires_grad
    freezer.restore()
    assert model.head.weight.requires_grad and model.conv.core.weight.requires_grad
    assert not model.fc.first.weight.requires_grad


OPTIMIZERS = {
    "sgd_momentum_wd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
    "adam_foreach_wd": lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=0.1, foreach=True),
    "adamw_wd": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
    "adamw_wd_forloop": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, foreach=False),
    "adamw_wd_fused": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, fused=True),
}


def _train(model, optimizer, steps, set_to_none, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=set_to_none)
        x = torch.randn(4, 3, 6, 6, generator=generator)
        model(x).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_frozen_factors_do_not_move(name, set_to_none):
    """Momentum, Adam moments and weight decay built up in phase 0 must not touch phase-1-frozen factors."""
    model = Tiny()
    optimizer = OPTIMIZERS[name](model.parameters())
    freezer = lrd.SequentialFreezer(model, schedule="rotate")
    freezer.check_optimizer(optimizer)
    _train(model, optimizer, 3, set_to_none, seed=1)  # phase 0: the first factors build up state
    assert all(optimizer.state[p] for p in (model.fc.first.weight, model.conv.first.weight))
    freezer.set_epoch(1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, optimizer, 3, set_to_none, seed=2)
    frozen = set(freezer.report().frozen)
    assert frozen == {"conv.first.weight", "conv.last.weight", "conv.last.bias", "point.first.weight",
                      "fc.first.weight"}
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, before[n]), f"frozen {n} moved under {name}"
            assert p.grad is None
        else:
            assert not torch.equal(p, before[n]), f"trainable {n} did not move under {name}"


def test_requires_grad_alone_is_not_enough():
    """The control for the test above: freezing without dropping .grad lets SGD momentum move a factor."""
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, optimizer, 2, set_to_none=False, seed=1)
    model.fc.first.weight.requires_grad_(False)
    before = model.fc.first.weight.detach().clone()
    _train(model, optimizer, 1, set_to_none=False, seed=2)
    assert not torch.equal(model.fc.first.weight, before)


def test_check_optimizer_names_missing_factors():
    model = Tiny()
    freezer = lrd.SequentialFreezer(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match="conv.core.weight|lacks"):
        freezer.check_optimizer(optimizer)


def test_state_dict_round_trip_through_wrapper_names():
    model = Tiny()
    freezer = lrd.SequentialFreezer(model, every_steps=2)
    for _ in range(5):
        freezer.step()
    freezer.set_epoch(3)
    state = copy.deepcopy(freezer.state_dict())
    assert state["phase"] == 2 and state["global_step"] == 5 and state["epoch"] == 3
    assert state["trainable"] == ["conv.last.bias", "conv.last.weight", "fc.first.weight", "point.first.weight"]
    # As saved from torch.compile(DDP(model)): every name carries both wrapper prefixes.
    state["trainable"] = [f"_orig_mod.module.{n}" for n in state["trainable"]]
    other = Tiny()
    restored = lrd.SequentialFreezer(other, every_steps=2)
    restored.load_state_dict(state)
    assert (restored.phase, restored.global_step, restored.epoch) == (2, 5, 3)
    assert restored.report().trainable == freezer.report().trainable
    restored.step()
    assert restored.phase == 3


def test_load_state_dict_rejects_other_runs():
    state = lrd.SequentialFreezer(Tiny()).state_dict()
    with pytest.raises(ValueError, match="schedule: saved 'rotate', here 'static'"):
        lrd.SequentialFreezer(Tiny(), schedule="static").load_state_dict(state)
    with pytest.raises(ValueError, match="every_steps"):
        lrd.SequentialFreezer(Tiny(), every_steps=4).load_state_dict(state)
    with pytest.raises(ValueError, match="newer"):
        lrd.SequentialFreezer(Tiny()).load_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="lacks"):
        lrd.SequentialFreezer(Tiny()).load_state_dict({**state, "trainable": ["encoder.0.first.weight"]})


def test_clean_name():
    assert clean_name("module._orig_mod.fc.first.weight") == "fc.first.weight"
    assert clean_name("fc.module.weight") == "fc.module.weight"


def test_bad_input():
    with pytest.raises(ValueError, match="schedule must be one of"):
        lrd.SequentialFreezer(Tiny(), schedule="sometimes")
    with pytest.raises(ValueError, match="every_epochs must be an int >= 1, got 0"):
        lrd.SequentialFreezer(Tiny(), every_epochs=0)
    with pytest.raises(ValueError, match="every_steps"):
        lrd.SequentialFreezer(Tiny(), every_steps=-1)
    with pytest.raises(ValueError, match="no decomposed layers"):
        lrd.SequentialFreezer(nn.Linear(3, 3))
    model = Tiny()
    with pytest.raises(ValueError, match=r"layer 'conv'.*\[0, 3\).*\[5\]"):
        lrd.SequentialFreezer(model, schedule=lambda phase, m: [5], freeze_undecomposed=True)
    assert all(p.requires_grad for p in model.parameters())  # the model as it was
    with pytest.raises(ValueError, match="epoch must be an int"):
        lrd.SequentialFreezer(Tiny()).set_epoch(-1)


def test_parameters_the_user_freezes_later_are_never_thawed_by_a_switch():
    torch.manual_seed(0)
    model = Tiny()
    freezer = lrd.SequentialFreezer(model, schedule="rotate")
    user_frozen = [model.conv.first.weight, model.head.weight]  # trainable in phase 0
    for p in user_frozen:
        p.requires_grad_(False)
    for epoch in range(6):  # every factor's turn to train comes round
        freezer.set_epoch(epoch)
        assert not any(p.requires_grad for p in user_frozen), epoch
    freezer.restore()
    assert not any(p.requires_grad for p in user_frozen)
    assert model.conv.core.weight.requires_grad and model.fc.second.weight.requires_grad  # the freezer's own: thawed


def test_a_resumed_freezer_respects_the_users_frozen_parameters_too():
    torch.manual_seed(0)
    model = Tiny()
    freezer = lrd.SequentialFreezer(model, schedule="freeze_one")
    freezer.set_epoch(1)
    state = freezer.state_dict()
    model.point.second.weight.requires_grad_(False)
    fresh = lrd.SequentialFreezer(model, schedule="freeze_one")
    fresh.load_state_dict(state)
    assert not model.point.second.weight.requires_grad
