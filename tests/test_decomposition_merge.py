"""Merging bottlenecks: exact folds, the approximate merge's initialisation on real data, exact
shapes and counts, atomic decompose, save/load and freezing on merged models."""

import copy

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.calibration import recalibrate_batchnorm
from lrdaccel.decomposition.build import swap_modules
from lrdaccel.decomposition.merge_build import build_merged, merged_like
from lrdaccel.decomposition.merge_statistics import collect_block_stats
from lrdaccel.decomposition.merged_blocks import merged_blocks
from lrdaccel.data import load, normalize
from lrdaccel.factorize.merging import batchnorm_affine, fold_input_factor, fold_output_factor
from lrdaccel.io import plan_of
from lrdaccel.layers.merged import BottleneckChain, MergedConv2d
from lrdaccel.layers.tucker import TuckerConv2d
from lrdaccel.rankopt.forms import timing_chain
from test_planning_merging import bottleneck


def randomise_batchnorms(model: nn.Module) -> nn.Module:
    """Trained-looking BatchNorms (a fresh one is the identity, which hides folding mistakes)."""
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


X = torch.randn(1, 16, 8, 8)


def merge_plan(model, **settings):
    return lrd.plan(model, ratio=2.0, merge=True, example_inputs=X, min_rank=1, **settings)


# ---- exact merges ----------------------------------------------------------------------------


def test_folding_a_factor_through_an_eval_batchnorm_is_exact():
    torch.manual_seed(1)
    a, bias, u = torch.randn(32, 16, dtype=torch.float64), torch.randn(32, dtype=torch.float64), \
        torch.randn(32, 7, dtype=torch.float64)
    s, t = batchnorm_affine(torch.rand(32) + 0.5, torch.randn(32), torch.randn(32), torch.rand(32) + 0.5, 1e-5)
    x = torch.randn(16, 50, dtype=torch.float64)
    new_a, shift = fold_input_factor(a, bias, s, t, u.T)
    reference = u.T @ (s[:, None] * (a @ x + bias[:, None]) + t[:, None])
    assert relative(new_a @ x + shift[:, None], reference) < 1e-12
    c, v, w = torch.randn(24, 32, dtype=torch.float64), torch.randn(32, 7, dtype=torch.float64), \
        torch.randn(7, 50, dtype=torch.float64)
    new_c, constant = fold_output_factor(c, s, t, v)
    assert relative(new_c @ w + constant[:, None], c @ (s[:, None] * (v @ w) + t[:, None])) < 1e-12


def test_a_bottleneck_without_activations_merges_exactly_into_its_tucker2_form():
    # No activation on either side: the merged block computes what the Tucker-2 decomposed block
    # computes (eval mode), at ranks well below full, without calibration data.
    model = randomise_batchnorms(bottleneck(act=False, bias=True))
    merged, tucker = copy.deepcopy(model), copy.deepcopy(model)
    plan = merge_plan(merged)
    (row,) = plan.merged
    assert row.rank == (19, 19) and row.merge.act1 is None and row.merge.act2 is None
    lrd.decompose(merged, plan)
    lrd.decompose(tucker, lrd.plan(tucker, ratio=2.0, include=["2"], min_rank=1))
    x = torch.randn(4, 16, 8, 8)
    assert [type(merged[i]).__name__ for i in (0, 2, 4)] == ["MergedConv2d"] * 3 and len(merged) == 6
    assert relative(merged(x), tucker(x)) < 1e-5
    assert relative(merged(x), model(x)) > 1e-2  # a real approximation: the ranks are below full


def test_a_linear_chain_of_1x1_convs_merges_its_factors_exactly():
    # 1x1 -> BN -> 1x1 -> BN -> 1x1: the middle conv's two factors fold into its neighbours, so the
    # chain keeps three convs and computes what the factorized middle conv computes.
    model = randomise_batchnorms(nn.Sequential(
        nn.Conv2d(16, 32, 1, bias=True), nn.BatchNorm2d(32), nn.Conv2d(32, 24, 1, bias=True), nn.BatchNorm2d(24),
        nn.Conv2d(24, 16, 1, bias=True)))
    plan = lrd.plan(model, ratio=2.0, merge=True, example_inputs=X, ranks={"2": (10, 12)})
    (row,) = plan.merged
    reference = copy.deepcopy(model)
    reference[2] = TuckerConv2d.from_dense(model[2], (10, 12))
    merged = copy.deepcopy(model)
    lrd.decompose(merged, plan)
    x = torch.randn(4, 16, 8, 8)
    assert (merged[0].out_channels, merged[2].in_channels, merged[2].out_channels) == (10, 10, 12)
    assert relative(merged(x), reference(x)) < 1e-5 and relative(merged(x), model(x)) > 1e-2


def test_full_width_merges_reproduce_the_block():
    calibration = [torch.randn(8, 16, 8, 8) for _ in range(3)]
    x = torch.randn(4, 16, 8, 8)
    for act in (True, False):
        model = randomise_batchnorms(bottleneck(act=act, bias=True))
        plan = lrd.plan(model, ratio=2.0, merge=True, example_inputs=X, ranks="full")
        (row,) = plan.merged
        assert row.rank == (32, 32)
        stats = collect_block_stats(model, plan.merged, calibration)
        merged = copy.deepcopy(model)
        swap_modules(merged, build_merged(model, row, stats[row.name]))
        # Selection at full width keeps every channel; the least-squares solves carry 1e-6 ridge.
        assert relative(merged(x), model(x)) < (1e-4 if act else 1e-5)


# ---- the approximate merge on real data --------------------------------------------------------


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block = bottleneck(inner=32, width=16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = self.stem(x)
        return self.fc(torch.relu(h + self.block(h)).mean((2, 3)))


@pytest.fixture(scope="module")
def trained():
    """SmallNet trained briefly on real Fashion-MNIST images; calibration and held-out batches
    (all from the 10k test file, which loads in a fraction of the training file's time)."""
    torch.manual_seed(0)
    data = load("fashion-mnist", "test")
    images, labels = normalize(data.tensors[0][:6400]), data.tensors[1][:6400]
    held_out = normalize(data.tensors[0][-256:])
    model = SmallNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for i in range(0, len(images), 64):
        loss = nn.functional.cross_entropy(model(images[i:i + 64]), labels[i:i + 64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    calibration = list(images[:256].split(64))
    return model, calibration, held_out


def branch_error(model, original, held_out) -> float:
    with torch.no_grad():
        h = original.stem(held_out)
        return relative(model.block(model.stem(held_out)), original.block(h))


@pytest.mark.slow
def test_the_merge_initialisation_beats_a_random_one_on_real_data(trained):
    original, calibration, held_out = trained
    plan = lrd.plan(original, ratio=2.0, merge=True, example_inputs=held_out[:1], include=["block.0", "block.3",
                                                                                               "block.6"])
    (row,) = plan.merged
    merged = copy.deepcopy(original)
    report = lrd.decompose(merged, plan, calibration=calibration)
    random_init = copy.deepcopy(original)
    torch.manual_seed(0)
    swap_modules(random_init, merged_like(random_init, row))
    recalibrate_batchnorm(random_init, calibration)
    ours, baseline = branch_error(merged, original, held_out), branch_error(random_init, original, held_out)
    assert ours < 0.5 * baseline and ours < 0.6, (ours, baseline)
    (layer,) = report.layers
    assert layer.kind == "merged" and 0 < layer.relative_error < 0.6  # the block's error on the first batch
    with torch.no_grad():
        labels = original(held_out).argmax(1)
        agree, agree_random = ((m(held_out).argmax(1) == labels).float().mean() for m in (merged, random_init))
    assert agree > agree_random + 0.2


# ---- structure, counts, atomicity ----------------------------------------------------------------


def test_merged_shapes_and_parameter_counts_are_exact():
    model = randomise_batchnorms(nn.Sequential(
        nn.Conv2d(24, 40, 1, bias=True), nn.BatchNorm2d(40), nn.ReLU(),
        nn.Conv2d(40, 48, 3, stride=2, padding=1, bias=True), nn.BatchNorm2d(48), nn.ReLU(),
        nn.Conv2d(48, 56, 1, bias=False)))  # no BN after: the constants go to a new bias
    x = torch.randn(1, 24, 8, 8)
    plan = lrd.plan(model, ratio=2.0, merge=True, example_inputs=x, ranks={"3": (20, 30)})
    (row,) = plan.merged
    before = sum(p.numel() for p in model.parameters())
    lrd.decompose(model, plan, calibration=[torch.randn(4, 24, 8, 8)])
    first, bn1, middle, bn2, last = model[0], model[1], model[3], model[4], model[6]
    assert (first.in_channels, first.out_channels, bn1.num_features) == (24, 20, 20)
    assert (middle.in_channels, middle.out_channels, middle.stride, bn2.num_features) == (20, 30, (2, 2), 30)
    assert (last.in_channels, last.out_channels) == (30, 56)
    assert first.bias is not None and middle.bias is not None and last.bias is not None
    assert sum(c.weight.numel() for c in (first, middle, last)) == row.params_after == 24 * 20 + 9 * 20 * 30 + 30 * 56
    removed = (row.params_before - row.params_after) + 2 * (40 - 20) + 2 * (48 - 30) + (40 - 20) + (48 - 30) - 56
    assert sum(p.numel() for p in model.parameters()) == before - removed
    assert model(x).shape == (1, 56, 4, 4)


def test_decompose_refuses_an_activation_merge_without_calibration_and_stays_atomic():
    model = randomise_batchnorms(bottleneck())
    plan = merge_plan(model)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"merged rows \['3'\] merge across an activation, which needs calibration"):
        lrd.decompose(model, plan)

    def bad_batches():
        yield torch.randn(4, 16, 8, 8)
        yield torch.randn(4, 3, 8, 8)  # wrong channels: the model fails on it

    with pytest.raises(ValueError, match="calibration batch 1: the model failed on it"):
        lrd.decompose(model, plan, calibration=bad_batches())
    assert all(type(m) in (nn.Conv2d, nn.BatchNorm2d, nn.ReLU) for m in model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_decompose_plans_merges_itself_from_example_inputs():
    model = randomise_batchnorms(bottleneck())
    report = lrd.decompose(model, ratio=2.0, merge=True, min_rank=1, example_inputs=X,
                           calibration=(torch.randn(4, 16, 8, 8) for _ in range(2)))  # a generator is read once
    (row,) = report.layers
    assert row.kind == "merged" and row.rank == (19, 19) and isinstance(model[3], MergedConv2d)
    assert row.macs_after < row.macs_before  # counted by flop_counter over the three convs


def test_a_failed_batchnorm_reestimation_puts_everything_back():
    model = randomise_batchnorms(bottleneck())
    plan = merge_plan(model)
    state = copy.deepcopy(model.state_dict())
    batches = [torch.randn(4, 16, 8, 8), torch.full((4, 16, 8, 8), float("nan"))]
    with pytest.raises(ValueError, match="NaN/Inf"):
        lrd.decompose(model, plan, calibration=batches)
    assert all(type(m) in (nn.Conv2d, nn.BatchNorm2d, nn.ReLU) for m in model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_merged_model_plans_as_already_merged_and_cannot_take_the_plan_again():
    model = randomise_batchnorms(bottleneck())
    plan = merge_plan(model)
    lrd.decompose(model, plan, calibration=[torch.randn(4, 16, 8, 8)])
    again = lrd.plan(model, ratio=2.0, merge=True, example_inputs=X)
    assert {row.reason for row in again} == {"already merged"} and not again.changed
    with pytest.raises(ValueError, match="already decomposed"):
        lrd.decompose(model, plan, calibration=[torch.randn(4, 16, 8, 8)])


def test_a_plan_for_another_bottleneck_is_refused_naming_what_differs():
    plan = merge_plan(randomise_batchnorms(bottleneck()))
    other = bottleneck(width=24)
    with pytest.raises(ValueError, match=r"plan row '3': first conv '0' has weight .* the plan says"):
        lrd.decompose(other, plan, calibration=[torch.randn(4, 24, 8, 8)])


# ---- save / load and freezing ----------------------------------------------------------------


def merged_model():
    torch.manual_seed(3)
    model = nn.Sequential(randomise_batchnorms(bottleneck()), nn.Conv2d(16, 16, 3, padding=1))
    plan = lrd.plan(model, ratio=2.0, merge=True, example_inputs=X, min_rank=1)
    lrd.decompose(model, plan, calibration=[torch.randn(8, 16, 8, 8) for _ in range(2)])
    return model, plan


def test_save_and_load_rebuild_a_merged_model_on_the_undecomposed_architecture(tmp_path):
    model, plan = merged_model()
    saved = plan_of(model)
    assert [(r.name, r.kind, r.rank) for r in saved] == [("0.3", "merged", (19, 19)), ("1", "tucker2", (9, 9))]
    assert saved.merged[0].merge == plan.merged[0].merge
    lrd.save(model, tmp_path)
    fresh = nn.Sequential(bottleneck(), nn.Conv2d(16, 16, 3, padding=1))
    lrd.load(tmp_path, fresh)
    x = torch.randn(2, 16, 8, 8)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
    assert plan_of(fresh).to_json() == saved.to_json()
    with pytest.raises(ValueError, match="first conv '0.0' has weight"):
        lrd.load(tmp_path, nn.Sequential(bottleneck(width=24), nn.Conv2d(16, 16, 3, padding=1)))


def test_plan_of_a_wrapped_merged_model_names_its_modules_from_the_root():
    model, _ = merged_model()
    wrapper = nn.Sequential(nn.Identity(), model)
    (row,) = plan_of(wrapper).merged
    assert row.name == "1.0.3" and (row.merge.first, row.merge.bn2, row.merge.bn3) == ("1.0.0", "1.0.4", "1.0.7")


def test_rotate_trains_one_conv_of_the_merged_block_at_a_time():
    model, _ = merged_model()
    freezer = lrd.SequentialFreezer(model, schedule="rotate", every_steps=2)
    assert list(freezer.layers) == ["0.3", "1"]
    block = freezer.layers["0.3"]
    assert block.kind == "merged" and [c for c in block.factors] == [model[0][0], model[0][3], model[0][6]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    freezer.check_optimizer(optimizer)
    x = torch.randn(4, 16, 8, 8)
    for phase in range(3):
        assert freezer.report().layers["0.3"] == (phase,)
        before = [c.weight.detach().clone() for c in block.factors]
        for _ in range(2):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
            freezer.step()
        moved = [not torch.equal(b, c.weight) for b, c in zip(before, block.factors)]
        assert moved == [i == phase for i in range(3)]  # frozen convs bitwise unchanged
    state = freezer.state_dict()
    resumed = lrd.SequentialFreezer(model, schedule="rotate", every_steps=2)
    resumed.load_state_dict(state)
    assert resumed.report().trainable == freezer.report().trainable


def test_static_freezing_trains_the_merged_blocks_inner_conv():
    model, _ = merged_model()
    report = lrd.SequentialFreezer(model, schedule="static").report()
    assert report.layers == {"0.3": (1,), "1": (1,)}
    assert "0.3.weight" in report.trainable and "0.0.weight" in report.frozen and "0.6.weight" in report.frozen


@pytest.mark.slow
def test_hf_resnet_merges_decomposes_saves_and_loads(tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(depths=[1, 2], hidden_sizes=[64, 128], embedding_size=16, num_labels=10)
    torch.manual_seed(0)
    model = ResNetForImageClassification(config).eval()
    x = torch.randn(2, 3, 32, 32)
    plan = lrd.plan(model, ratio=2.0, merge=True, example_inputs={"pixel_values": x[:1]}, min_rank=1)
    assert len(plan.merged) == 3
    original = copy.deepcopy(model)
    report = lrd.decompose(model, plan, calibration=[{"pixel_values": torch.randn(4, 3, 32, 32)} for _ in range(2)])
    assert len(merged_blocks(model)) == 3 and sum(isinstance(m, MergedConv2d) for m in model.modules()) == 9
    assert report.model_params_after < 0.6 * report.model_params_before
    lrd.save(model, tmp_path)
    loaded = lrd.load(tmp_path, original)
    assert torch.equal(loaded(pixel_values=x).logits, model(pixel_values=x).logits)


# ---- what rank search will time ------------------------------------------------------------------


def test_timing_chains_run_the_block_alone_in_each_form():
    model = randomise_batchnorms(bottleneck())
    (row,) = merge_plan(model).merged
    x = torch.randn(2, 16, 8, 8)
    original = timing_chain(model, row)
    assert isinstance(original, BottleneckChain) and torch.equal(original.eval()(x), model(x))
    chain = timing_chain(model, row, (12, 20))
    assert chain(x).shape == x.shape
    convs = [chain.first, chain.middle, chain.last]
    assert sum(c.weight.numel() for c in convs) == row.with_rank((12, 20), "").params_after == 16 * 12 + 9 * 240 + 320
    assert all(type(m) is nn.Conv2d or isinstance(m, MergedConv2d) for m in convs)
    assert type(model[0]) is nn.Conv2d  # the model itself is untouched


def test_block_statistics_of_a_training_mode_model_leave_its_batchnorms_alone():
    # The statistics pass runs in eval mode: a model in training mode keeps its running
    # statistics (BatchNorm would otherwise update them, and normalize by batch statistics).
    model = randomise_batchnorms(bottleneck()).train()
    (row,) = merge_plan(model).merged
    buffers = copy.deepcopy({k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k})
    batches = [torch.randn(4, 16, 8, 8) for _ in range(2)]
    in_training = collect_block_stats(model, [row], batches)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    assert all(m.training for m in model.modules())
    in_eval = collect_block_stats(model.eval(), [row], batches)
    assert torch.equal(in_training[row.name].h_second, in_eval[row.name].h_second)
