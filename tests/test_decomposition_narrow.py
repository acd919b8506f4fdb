"""Applying narrow rows: exactness at full width, lossless dropping of duplicates, the HF config,
mixed plans through JSON and save/load, and bad input refused before any change."""

import copy

import pytest
import torch
import transformers
from torch import nn

import lrdaccel as lrd
from lrdaccel.planning import Plan
from test_decomposition_apply import snapshot, unchanged
from test_planning_narrow import tiny_bert, tiny_gpt2


def token_batches(count=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 50, (4, 8), generator=generator)} for _ in range(count)]


def hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2])
def test_full_width_reproduces_the_model(make):
    torch.manual_seed(0)
    model = make()
    batches = token_batches()
    reference = hidden(model, batches[0])
    plan = lrd.plan(model, ranks="full", form="narrow", example_inputs=batches[0])
    lrd.decompose(model, plan, calibration=batches)
    assert all(type(model.get_submodule(row.name)).__name__ == row.layer_type for row in plan.narrowed)
    torch.testing.assert_close(hidden(model, batches[0]), reference, rtol=0, atol=1e-5)


def test_dropping_duplicated_neurons_loses_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():  # neurons 8..15 copy neurons 0..7
        model[0].weight[8:] = model[0].weight[:8]
        model[0].bias[8:] = model[0].bias[:8]
    batches = [torch.randn(32, 8) for _ in range(4)]
    test = torch.randn(64, 8)
    reference = model(test)
    plan = lrd.plan(model, ratio=2, min_rank=1, form="narrow", example_inputs=batches[0])
    report = lrd.decompose(model, plan, calibration=batches)
    assert (model[0].out_features, model[2].in_features) == (8, 8)
    torch.testing.assert_close(model(test), reference, rtol=0, atol=1e-5)
    assert report.layers[0].kind == "narrow" and report.layers[0].relative_error < 1e-5
    assert report.model_params_after == 8 * 8 + 8 + 4 * 8 + 4


def test_half_width_is_close_and_the_hf_config_matches_the_shapes():
    torch.manual_seed(0)
    model = tiny_bert()
    batches = token_batches()
    reference = hidden(model, batches[0])
    plan = lrd.plan(model, ratio=2, form="narrow", example_inputs=batches[0], exclude=r".*attention.*")
    report = lrd.decompose(model, plan, calibration=batches)
    assert [layer.relative_error for layer in report.layers] == pytest.approx([0.05, 0.05], abs=0.05)
    out = hidden(model, batches[0])
    assert torch.nn.functional.cosine_similarity(out.flatten(1), reference.flatten(1)).min() > 0.99
    assert model.config.intermediate_size == 32
    rebuilt = transformers.BertModel(model.config).eval()  # what from_pretrained would build
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(hidden(rebuilt, batches[0]), out)


def test_gpt2_conv1d_layers_stay_conv1d_and_from_pretrained_shapes_match():
    torch.manual_seed(0)
    model = tiny_gpt2()
    batches = token_batches()
    plan = lrd.plan(model, ratio=4, form="narrow", example_inputs=batches[0])
    lrd.decompose(model, plan, calibration=batches)
    assert type(model.h[0].mlp.c_fc).__name__ == "Conv1D" and model.h[0].mlp.c_fc.weight.shape == (32, 32)
    assert model.config.n_inner == 32
    rebuilt = transformers.GPT2Model(model.config).eval()
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(hidden(rebuilt, batches[0]), hidden(model, batches[0]))


def test_decompose_plans_the_narrow_form_itself():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    batches = [torch.randn(16, 8) for _ in range(3)]
    report = lrd.decompose(model, ratio=4, form="narrow", example_inputs=batches[0], calibration=batches)
    assert [(layer.name, layer.kind, layer.rank) for layer in report.layers] == [("0", "narrow", 8)]
    assert (model[0].out_features, model[2].in_features) == (8, 8)
    # MACs per forward of the example batch (16 rows), producer and consumer together
    assert (report.layers[0].macs_before, report.layers[0].macs_after) == (16 * 2 * 32 * 8, 16 * 2 * 8 * 8)


def test_unequal_widths_leave_the_config_and_the_plan_records_them():
    model = tiny_bert()
    batches = token_batches()
    plan = lrd.plan(model, ranks={"encoder.layer.0.intermediate.dense": 20, "encoder.layer.1.intermediate.dense": 40},
                    form="narrow", example_inputs=batches[0], exclude=r".*attention.*")
    lrd.decompose(model, plan, calibration=batches)
    assert model.config.intermediate_size == 64
    assert model.encoder.layer[0].output.dense.in_features == 20
    assert [row.rank for row in lrd.io.plan_of(model).narrowed] == [20, 40]


def mixed_plan(model, batch):
    """Narrow FFNs and attention heads, an SVD pooler, everything else kept."""
    narrow = lrd.plan(model, ratio=2, min_rank=1, form="narrow", example_inputs=batch)
    factor = lrd.plan(model, ratio=2)
    rows = [factor[row.name] if row.name == "pooler.dense" else row for row in narrow]
    return Plan(rows, ratio=2.0)


def test_a_mixed_plan_round_trips_through_json_and_save_load(tmp_path):
    torch.manual_seed(0)
    original = tiny_bert()
    batches = token_batches()
    plan = Plan.from_json(mixed_plan(original, batches[0]).to_json())
    assert sorted({row.kind for row in plan}) == ["keep", "narrow", "svd"]
    model = copy.deepcopy(original)
    lrd.decompose(model, plan, calibration=batches)
    lrd.save(model, tmp_path / "out")
    base = copy.deepcopy(original)
    lrd.load(tmp_path / "out", base)
    assert torch.equal(hidden(base, batches[1]), hidden(model, batches[1]))
    assert base.config.intermediate_size == 32 and base.encoder.layer[1].attention.self.attention_head_size == 8
    saved = lrd.io.plan_of(base)
    assert [(row.name, row.kind, row.rank) for row in saved] == [
        (row.name, row.kind, row.rank) for row in plan if row.kind != "keep"]


def test_bad_input_is_refused_before_any_change():
    model = tiny_bert()
    batches = token_batches()
    plan = lrd.plan(model, ratio=2, form="narrow", example_inputs=batches[0], exclude=r".*attention.*")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"narrow rows \['encoder.layer.0.intermediate.dense', 'encoder.layer.1."
                                         r"intermediate.dense'\] choose their channels on calibration"):
        lrd.decompose(model, plan)
    row = plan.narrowed[1]
    for width in (0, 65):
        with pytest.raises(ValueError, match=rf"narrow width must be in \[1, 64\].*got {width}"):
            lrd.decompose(model, plan.replace(row.with_rank(width, row.reason)), calibration=batches)
    broken = batches[:2] + [{"input_ids": torch.full((2, 4), 999)}]  # out of the vocabulary
    with pytest.raises(ValueError, match="calibration batch 2"):
        lrd.decompose(model, plan, calibration=broken)
    with pytest.raises(ValueError, match="selection must be one of"):
        lrd.decompose(model, plan, calibration=batches, selection="random")
    assert unchanged(model, snap) and model.config.intermediate_size == 64


def test_conv_chain_at_full_width_is_exact_and_narrowed_keeps_working(tmp_path):
    from test_planning_narrow import BasicBlock, conv_chain
    torch.manual_seed(0)
    model = conv_chain()
    batches = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    x = torch.randn(2, 3, 8, 8)
    reference = copy.deepcopy(model)
    lrd.recalibrate_batchnorm(reference, batches)  # decompose re-estimates every BatchNorm after narrowing
    full = copy.deepcopy(model)
    lrd.decompose(full, lrd.plan(model, ranks="full", form="narrow", example_inputs=x), calibration=batches)
    torch.testing.assert_close(full(x), reference(x), rtol=0, atol=1e-5)
    narrowed = copy.deepcopy(model)
    plan = lrd.plan(model, ratio=2, min_rank=1, form="narrow", example_inputs=x)
    lrd.decompose(narrowed, plan, calibration=batches)
    assert (narrowed[0].out_channels, narrowed[1].num_features, narrowed[3].in_channels) == (8, 8, 8)
    assert not narrowed.training and not narrowed[1].training
    lrd.save(narrowed, tmp_path / "cnn")
    loaded = lrd.load(tmp_path / "cnn", copy.deepcopy(model))
    assert torch.equal(loaded(x), narrowed(x))
    block = BasicBlock().eval()
    block_plan = lrd.plan(block, ratio=2, min_rank=1, form="narrow", example_inputs=torch.randn(1, 16, 8, 8))
    lrd.decompose(block, block_plan, calibration=[torch.randn(4, 16, 8, 8) for _ in range(3)])
    assert (block.conv1.out_channels, block.bn1.num_features, block.conv2.in_channels) == (8, 8, 8)


def test_dropping_duplicated_conv_channels_loses_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                          nn.Conv2d(12, 5, 3, padding=1)).eval()
    with torch.no_grad():  # channels 6..11 copy channels 0..5, their BatchNorm too
        model[0].weight[6:], model[0].bias[6:] = model[0].weight[:6], model[0].bias[:6]
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(model[1], name)[6:] = getattr(model[1], name)[:6]
    batches = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    reference = copy.deepcopy(model)
    lrd.recalibrate_batchnorm(reference, batches)
    x = torch.randn(4, 3, 8, 8)
    lrd.decompose(model, lrd.plan(model, ratio=2, min_rank=1, form="narrow", example_inputs=x), calibration=batches)
    assert model[3].in_channels == 6
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-4)


def mbconv():
    """expand 1x1 -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> project 1x1 (an MBConv without SE)."""
    return nn.Sequential(nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),
                         nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),
                         nn.Conv2d(32, 8, 1, bias=False), nn.BatchNorm2d(8)).eval()


def test_mbconv_expanded_channels_narrow_through_the_depthwise_conv(tmp_path):
    torch.manual_seed(0)
    model = mbconv()
    batches = [torch.randn(8, 8, 6, 6) for _ in range(4)]
    x = torch.randn(2, 8, 6, 6)
    plan = lrd.plan(model, ratio=2, min_rank=1, form="narrow", example_inputs=x)
    row = plan["0"]
    assert (row.kind, row.rank, row.narrow.consumer, row.narrow.resized) == ("narrow", 16, "6", ("1", "3", "4"))
    assert row.params_before == 32 * (8 + 8 + 9) and row.params_after == 16 * (8 + 8 + 9)
    assert [r.name for r in plan] == ["0"]  # the depthwise conv's and the projection's rows are absorbed
    reference = copy.deepcopy(model)
    lrd.recalibrate_batchnorm(reference, batches)
    full = copy.deepcopy(model)
    lrd.decompose(full, lrd.plan(model, ranks="full", form="narrow", example_inputs=x), calibration=batches)
    torch.testing.assert_close(full(x), reference(x), rtol=0, atol=1e-5)
    narrowed = copy.deepcopy(model)
    lrd.decompose(narrowed, plan, calibration=batches)
    assert (narrowed[3].groups, narrowed[3].in_channels, narrowed[4].num_features, narrowed[6].in_channels) == \
        (16, 16, 16, 16)
    lrd.save(narrowed, tmp_path / "mb")
    assert torch.equal(lrd.load(tmp_path / "mb", copy.deepcopy(model))(x), narrowed(x))


def test_each_width_is_refitted_on_the_partly_narrowed_model():
    from lrdaccel.calibration.statistics import collect_input_stats
    from lrdaccel.decomposition.build import swap_modules
    from lrdaccel.decomposition.narrow_build import fill_narrowed
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.GELU(), nn.Linear(24, 6), nn.Linear(6, 24), nn.ReLU(),
                          nn.Linear(24, 6)).eval()
    batches = [torch.randn(16, 6) for _ in range(3)]
    plan = lrd.plan(model, ratio=3, min_rank=1, form="narrow", example_inputs=batches[0])
    first, second = plan.narrowed
    narrowed = copy.deepcopy(model)
    lrd.decompose(narrowed, plan, calibration=batches)
    expected = copy.deepcopy(model)
    built, _ = fill_narrowed(expected, first, collect_input_stats(expected, ["2"], batches)["2"], "qr")
    swap_modules(expected, built)
    partly = collect_input_stats(expected, ["5"], batches)["5"]  # the second FFN's inputs after the first narrows
    assert not torch.allclose(partly.covariance(), collect_input_stats(model, ["5"], batches)["5"].covariance())
    built, _ = fill_narrowed(expected, second, partly, "qr")
    torch.testing.assert_close(narrowed[5].weight, built["5"].weight)
    torch.testing.assert_close(narrowed[5].bias, built["5"].bias)


def test_a_failure_midway_puts_every_layer_and_head_size_back(monkeypatch):
    import lrdaccel.decomposition.narrow_apply as narrow_apply
    model = tiny_bert()
    batches = token_batches()
    plan = lrd.plan(model, ratio=2, min_rank=1, form="narrow", example_inputs=batches[0])
    assert plan.narrowed[0].narrow.heads  # the attention row runs first, then the FFN row fails
    snap = snapshot(model)

    def fail(*args, **kwargs):
        raise RuntimeError("refit failed")

    monkeypatch.setattr(narrow_apply, "fill_narrowed", fail)
    with pytest.raises(RuntimeError, match="refit failed"):
        lrd.decompose(model, plan, calibration=batches)
    assert unchanged(model, snap) and model.encoder.layer[0].attention.self.attention_head_size == 16
    assert model.encoder.layer[0].attention.self.all_head_size == 32
