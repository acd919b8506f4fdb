"""planning/allocation.py and planning/sensitivity.py: ranks spent by measured sensitivity under
the budget of one ratio, met exactly; the model never changes."""

import copy
import itertools
import math
import random

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.planning.allocation import Option, allocate_ranks, choose_options
from lrdaccel.planning.sensitivity import fisher_weights, measure_sensitivity
from test_whiten import anisotropic_inputs


class TwoHeads(nn.Module):
    """Two identical branches read the same input; the second's output is scaled up before the
    logits, so an error there moves the output `gain` times as much. The weights are scaled down
    by the gain so that the logits stay moderate (a saturated softmax has no Fisher information)."""

    def __init__(self, gain=10.0, d=32, classes=12):
        super().__init__()
        self.a, self.b = nn.Linear(d, classes // 2), nn.Linear(d, classes // 2)
        with torch.no_grad():
            self.a.weight.mul_(3 / gain)
            self.a.bias.mul_(3 / gain)
        self.b.load_state_dict(self.a.state_dict())
        self.gain = gain

    def forward(self, x):
        return torch.cat([self.a(x), self.gain * self.b(x)], -1)


class Stack(nn.Module):
    """Linear layers of different shapes, a conv at two resolutions: costs that differ."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 24, 3, padding=1)
        self.pw = nn.Conv2d(24, 24, 1)
        self.conv2 = nn.Conv2d(24, 32, 3, stride=2, padding=1)
        self.fc1, self.fc2 = nn.Linear(32, 48), nn.Linear(48, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.pw(torch.relu(self.conv1(x))))))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


def vectors(n=4, d=32, seed=0):
    return list(anisotropic_inputs(n * 32, d, decades=1, seed=seed, dtype=torch.float32).reshape(n, 32, d))


def images(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 8, 12, 12, generator=g) for _ in range(n)]


def snapshot(model):
    return (copy.deepcopy(model.state_dict()), [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()])


def unchanged(model, snap):
    state, modes, flags = snap
    now = model.state_dict()
    return (all(torch.equal(state[k], now[k]) for k in state) and modes == [m.training for m in model.modules()]
            and flags == [p.requires_grad for p in model.parameters()]
            and all(p.grad is None for p in model.parameters())
            and sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == 0)


def spent(plan, uniform, budget="params", positions=None):
    """What the candidate rows cost in `plan` (kept ones at their dense cost)."""
    total = 0
    for row in uniform.decomposed:
        new = plan[row.name]
        cost = new.params_after if budget == "params" else new.macs_after * positions[row.name]
        total += cost if new.decomposed else (row.params_before if budget == "params"
                                              else row.macs_before * positions[row.name])
    return total


# ---- the sensitive layer gets the rank ---------------------------------------------------------------


@pytest.mark.parametrize("labels", [False, True])
def test_the_layer_that_moves_the_output_more_keeps_more_rank(labels):
    model = TwoHeads(gain=10.0)
    batches = vectors()
    targets = [torch.randint(0, 12, (32, 4)).T.reshape(-1)[:32] for _ in batches] if labels else None
    uniform = lrd.plan(model, ratio=2.0, min_rank=1)
    assert uniform["a"].rank == uniform["b"].rank
    plan = allocate_ranks(model, uniform, batches, labels=targets, min_rank=1)
    assert plan["b"].rank > plan["a"].rank, (plan["a"].rank, plan["b"].rank)
    assert plan["a"].rank in plan.meta["sensitivity"]["a"]["ranks"]
    # The same budget spent; both stay within it.
    assert plan.meta["allocation"]["used"] <= plan.meta["allocation"]["limit"] == math.floor(2 * 32 * 6 / 2.0)
    # "output" sensitivity cannot tell the branches apart: equal ranks (or one step apart).
    even = allocate_ranks(model, uniform, batches, sensitivity="output", min_rank=1)
    assert abs(even["a"].rank - even["b"].rank) <= 1


def test_fisher_weight_scales_with_the_square_of_the_gain():
    model = TwoHeads(gain=3.0)
    weights = fisher_weights(model, {"a": model.a, "b": model.b}, vectors(n=8), probes=8)
    assert 9 * 0.6 < weights["b"] / weights["a"] < 9 / 0.6


def test_a_layer_too_sensitive_for_any_saving_is_kept_with_that_reason():
    model = TwoHeads(gain=1e3)
    plan = allocate_ranks(model, lrd.plan(model, ratio=1.25, min_rank=1), vectors(), min_rank=1)
    assert plan["b"].kind == "keep" and plan["b"].reason.startswith("kept: too sensitive for any saving")
    assert plan["a"].decomposed and plan["a"].rank < lrd.plan(model, ratio=1.25, min_rank=1)["a"].rank


# ---- the budget is met exactly ----------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["params", "macs"])
def test_the_budget_is_met_and_no_layer_could_take_one_more_rank(budget):
    model = Stack()
    batches = images()
    uniform = lrd.plan(model, ratio=2.0, min_rank=1)
    plan = allocate_ranks(model, uniform, batches, budget=budget, min_rank=1)
    meta = plan.meta["allocation"]
    positions = {name: record["positions"] for name, record in plan.meta["sensitivity"].items()}
    # Positions are the output vectors per calibration forward of the first batch: by hand.
    assert positions == {"conv1": 6 * 144, "pw": 6 * 144, "conv2": 6 * 36, "fc1": 6, "fc2": 6}
    dense = sum(r.params_before if budget == "params" else r.macs_before * positions[r.name] for r in uniform.decomposed)
    assert meta["dense"] == dense and meta["limit"] == math.floor(dense / 2.0)
    used = spent(plan, uniform, budget, positions)
    assert used == meta["used"] <= meta["limit"]
    left = meta["limit"] - used
    for row in uniform.decomposed:  # one more rank (or dense) costs more than what is left
        new = plan[row.name]
        if not new.decomposed:
            continue
        rank = new.rank + 1 if row.kind == "svd" else (new.rank[0] + 1, new.rank[1] + 1)
        bigger = new.with_rank(rank, "")
        if bigger.params_after >= row.params_before or bigger.macs_after >= row.macs_before:
            bigger = new.with_rank(None, "", kind="keep")
        step = (bigger.params_after - new.params_after) if budget == "params" else \
            (bigger.macs_after - new.macs_after) * positions[row.name]
        assert step > left, (row.name, step, left)


def test_greedy_matches_brute_force_on_convex_curves():
    rng = random.Random(0)
    for trial in range(30):
        options = {}
        for name in "abc":
            step = 5  # one step size for all: then marginal-gain greedy is optimal on convex curves
            drops = sorted((rng.random() for _ in range(5)), reverse=True)  # convex: shrinking drops
            loss = sum(drops)
            choices = [Option(step, loss, 1)]
            for k, drop in enumerate(drops):
                loss -= drop
                choices.append(Option(step * (k + 2), max(loss, 0.0), k + 2))
            options[name] = choices
        budget = rng.randint(15, 80)
        chosen = choose_options(options, budget)
        best = min((sum(c.loss for c in combo), combo) for combo in itertools.product(*options.values())
                   if sum(c.cost for c in combo) <= budget)
        assert sum(c.cost for c in chosen.values()) <= budget
        assert sum(c.loss for c in chosen.values()) == pytest.approx(best[0], abs=1e-12), trial


def test_greedy_refuses_a_budget_below_the_lowest_ranks():
    with pytest.raises(ValueError, match="below the 20 that the lowest allowed ranks cost"):
        choose_options({"a": [Option(10, 1.0, 1)], "b": [Option(10, 1.0, 1)]}, 15)


# ---- rank optimization reads the sensitivity from the plan -------------------------------------------


def test_plan_carries_sensitivity_near_the_allocated_rank_and_round_trips(tmp_path):
    model = Stack()
    plan = allocate_ranks(model, lrd.plan(model, ratio=2.0, min_rank=1), images(), min_rank=1)
    for row in plan.decomposed:
        record = plan.meta["sensitivity"][row.name]
        rank = list(row.rank) if row.kind == "tucker2" else row.rank
        assert rank in record["ranks"] and row.ratio_rank == row.rank
        first = [r if isinstance(r, int) else r[0] for r in record["ranks"]]
        assert all((rank if isinstance(rank, int) else rank[0]) / 2 <= r <= 2 * (rank if isinstance(rank, int)
                                                                              else rank[0]) for r in first)
        assert all(a >= b for a, b in zip(record["loss"], record["loss"][1:]))  # more rank, less loss
        if row.kind == "tucker2":
            assert all(isinstance(r, list) and len(r) == 2 for r in record["ranks"])
    plan.save(tmp_path / "plan.json")
    assert lrd.Plan.load(tmp_path / "plan.json").meta == plan.meta


def test_allocated_plan_decomposes_and_hf_encoder_embedding_sensitivity():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=32), add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, 50, (4, 9), generator=g),
                "attention_mask": torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 7 + [0] * 2, [1] * 9])}
               for _ in range(2)]
    uniform = lrd.plan(model, ratio=1.5, min_rank=1)
    plan = allocate_ranks(model, uniform, batches, min_rank=1)
    assert plan.meta["allocation"]["used"] <= plan.meta["allocation"]["limit"]
    assert {r.rank for r in plan.decomposed} != {r.rank for r in uniform.decomposed}
    lrd.decompose(model, plan)
    assert sum(isinstance(m, lrd.SVDLinear) for m in model.modules()) == len(plan.decomposed)


# ---- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batches, settings, message", [
    ([], {}, "no batches"),
    (torch.randn(2, 8, 12, 12), {}, "single Tensor"),
    ([torch.randn(2, 8, 12, 12), torch.randn(2, 3)], {}, "calibration batch 1"),
    ([torch.full((2, 8, 12, 12), float("nan"))], {}, "layer 'conv1'.*NaN"),
    ([torch.randn(2, 8, 12, 12)], {"budget": "time"}, "budget must be one of"),
    ([torch.randn(2, 8, 12, 12)], {"sensitivity": "hessian"}, "sensitivity must be one of"),
    ([torch.randn(2, 8, 12, 12)], {"ratio": 1.0}, "ratio"),
    ([torch.randn(2, 8, 12, 12)], {"min_rank": 24, "ratio": 8.0}, "below the .* that the lowest allowed ranks cost"),
    ([torch.randn(2, 8, 12, 12)], {"labels": [torch.zeros(2, dtype=torch.long)] * 2}, "2 tensors for 1"),
])
def test_bad_inputs_are_clear_errors_and_the_model_never_changes(batches, settings, message):
    model = Stack()
    model.train()
    model.fc1.weight.requires_grad_(False)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        allocate_ranks(model, lrd.plan(model, ratio=2.0, min_rank=1), batches, **{"min_rank": 1, **settings})
    assert unchanged(model, before)
    allocate_ranks(model, lrd.plan(model, ratio=2.0, min_rank=1), images(n=1), min_rank=1)
    assert unchanged(model, before)


def test_fisher_needs_logits_or_token_states():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1))
    with pytest.raises(ValueError, match="sensitivity='fisher' reads logits"):
        measure_sensitivity(model, ["0", "1"], [torch.randn(2, 3, 4, 4)])
    curves = measure_sensitivity(model, ["0", "1"], [torch.randn(2, 3, 4, 4)], sensitivity="output")
    assert curves["0"].loss(3) == pytest.approx(float(curves["0"].truncation[3]) / curves["0"].energy)


# ---- reached through lrd.plan and lrd.decompose ------------------------------------------------------


def test_plan_allocate_equals_allocate_ranks_and_decompose_takes_it_in_one_call():
    model, batches = Stack(), images()
    direct = allocate_ranks(model, lrd.plan(model, ratio=2.0, min_rank=1), batches, budget="macs", min_rank=1)
    through_plan = lrd.plan(model, ratio=2.0, min_rank=1, allocate="sensitivity", budget="macs",
                            calibration=batches)
    assert through_plan.to_dict() == direct.to_dict()
    decomposed = copy.deepcopy(model)
    report = lrd.decompose(decomposed, ratio=2.0, min_rank=1, allocate="sensitivity", budget="macs",
                           calibration=iter(batches))  # a generator: read by the allocation and kept
    assert [(row.name, row.rank) for row in report.layers] == [(row.name, row.rank) for row in direct.changed]


@pytest.mark.parametrize("settings, message", [
    ({"allocate": "sensitivity"}, "needs calibration batches"),
    ({"calibration": [torch.randn(2, 8, 12, 12)]}, "only used by allocate='sensitivity'"),
    ({"allocate": "fisher", "calibration": [torch.randn(2, 8, 12, 12)]}, "allocate must be one of"),
    ({"allocate": "sensitivity", "branches": 2, "calibration": [torch.randn(2, 8, 12, 12)]}, "does not combine"),
    ({"budget": "time"}, "budget must be one of"),
])
def test_plan_allocation_settings_are_checked(settings, message):
    model = Stack()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        lrd.plan(model, ratio=2.0, min_rank=1, **settings)
    assert unchanged(model, before)
