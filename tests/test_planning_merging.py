"""Merge detection from the recorded data flow, and merged / branched rows in plans and plan files."""

import json

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.layers.merged import BottleneckChain, MergedConv2d
from lrdaccel.planning import Plan
from lrdaccel.planning.dataflow import trace_ops
from lrdaccel.planning.merging import find_merge_candidates


def bottleneck(act: bool = True, bn: bool = True, groups: int = 1, inner: int = 32, width: int = 16,
               bias: bool = False):
    """conv1x1 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv1x1 -> BN (acts / first BN optional)."""
    def relu():
        return [nn.ReLU(inplace=True)] if act else []

    return nn.Sequential(
        nn.Conv2d(width, inner, 1, bias=bias), *([nn.BatchNorm2d(inner)] if bn else []), *relu(),
        nn.Conv2d(inner, inner, 3, padding=1, groups=groups, bias=bias), nn.BatchNorm2d(inner), *relu(),
        nn.Conv2d(inner, width, 1, bias=bias), nn.BatchNorm2d(width))


class ResidualRead(nn.Module):
    """A bottleneck whose inner activation is also added to the output (functionally: no hook sees it)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.c2, self.b2 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.c3 = nn.Conv2d(32, 16, 1)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        g = torch.relu(self.b2(self.c2(h)))
        return self.c3(g) + h[:, :16]


X = torch.randn(1, 16, 8, 8)


def test_the_trace_links_ops_by_data_flow_and_names_modules_by_their_weights():
    model = ResidualRead()
    ops = trace_ops(model, X)
    convs = [op for op in ops if op.kind == "conv"]
    assert [op.module for op in convs] == ["c1", "c2", "c3"]
    assert [op.module for op in ops if op.kind == "bn"] == ["b1", "b2"]
    relu_h = ops[convs[1].inputs[0]]
    assert relu_h.kind == "act" and relu_h.name == "relu"
    readers = {ops[i].name for i in relu_h.readers}
    assert readers == {"conv2d", "__getitem__"}  # the slice that feeds the residual add


def test_a_sequential_bottleneck_is_one_candidate_without_reason():
    (candidate,) = find_merge_candidates(bottleneck(), X)
    assert (candidate.first, candidate.bn1, candidate.middle, candidate.bn2, candidate.last, candidate.bn3) == \
        ("0", "1", "3", "4", "6", "7")
    assert (candidate.act1, candidate.act2, candidate.reason) == ("relu", "relu", None)


def test_linear_sides_are_candidates_too_and_recorded_as_such():
    (candidate,) = find_merge_candidates(bottleneck(act=False), X)
    assert candidate.reason is None and candidate.act1 is None and candidate.act2 is None


def padded_inner(mode: str) -> nn.Module:
    model = bottleneck()
    model[3].padding_mode = mode  # the inner conv pads by calling F.pad, which breaks a naive chain
    return model


class TwoReaders(nn.Module):
    """The inner activation feeds two convs: each path is a near miss that says why."""

    def __init__(self):
        super().__init__()
        self.block = bottleneck()
        self.side = nn.Conv2d(32, 16, 3, padding=1)

    def forward(self, x):
        h = self.block[2](self.block[1](self.block[0](x)))
        y = self.block[7](self.block[6](self.block[5](self.block[4](self.block[3](h)))))
        return y + self.side(h)


def pooled_inside() -> nn.Module:
    """A max-pool between the first BatchNorm's activation and the inner conv."""
    model = bottleneck()
    model[2] = nn.Sequential(nn.ReLU(), nn.MaxPool2d(3, 1, 1))
    return model


@pytest.mark.parametrize("model, reason", [
    (ResidualRead(), "residual read: the output of relu after b1 is also read by __getitem__"),
    (bottleneck(groups=4), "grouped inner conv 3 (groups=4): Tucker-2 needs groups=1"),
    (bottleneck(bn=False), "missing BatchNorm: no BatchNorm between 0 and 2"),
    (padded_inner("reflect"), "inner conv 3 uses padding=(1, 1), padding_mode='reflect'; the merge's patch "
                              "statistics need numeric zero padding"),
    (padded_inner("replicate"), "padding_mode='replicate'"),
    (padded_inner("circular"), "padding_mode='circular'"),
    (pooled_inside(), "between 0 and 3 is 1 -> relu -> max_pool2d, not BatchNorm -> activation"),
    (TwoReaders(), "residual read: the output of relu after block.1 is also read by side"),
])
def test_blocks_that_cannot_merge_say_why(model, reason):
    (candidate,) = find_merge_candidates(model, X)
    assert reason in candidate.reason
    assert not [line for line in candidate.reason.split("; ") if "pad (op" in line]  # a conv's own padding is its own


@pytest.mark.parametrize("model, reason", [
    (ResidualRead(), "residual read"),
    (bottleneck(groups=4), "grouped inner conv"),
    (bottleneck(bn=False), "missing BatchNorm"),
    (padded_inner("reflect"), "padding_mode='reflect'"),
])
def test_the_plan_keeps_such_blocks_unmerged_with_the_reason(model, reason):
    plan = lrd.plan(model, ratio=2.0, merge=True, example_inputs=X, min_rank=1)
    assert not plan.merged
    middle = next(row for row in plan if row.shape["kernel"] == [3, 3])
    assert reason in middle.merge_skipped
    assert f"not merged: {middle.merge_skipped}" in str(plan)


def test_a_merged_row_replaces_the_three_conv_rows_with_exact_counts():
    model = bottleneck(inner=64, width=256)
    plan = lrd.plan(model, ratio=2.0, merge=True, example_inputs=torch.randn(1, 256, 8, 8))
    (row,) = plan.merged
    assert [r.name for r in plan] == ["3"]
    assert row.kind == "merged" and row.rank == (38, 38)  # the 3x3's ratio-2 Tucker ranks (paper: 64 -> 38)
    assert (row.merge.first, row.merge.bn1, row.merge.bn2, row.merge.last, row.merge.bn3) == ("0", "1", "4", "6", "7")
    assert row.params_before == 256 * 64 + 9 * 64 * 64 + 64 * 256
    assert row.params_after == 256 * 38 + 9 * 38 * 38 + 38 * 256
    assert row.macs_after == row.params_after  # stride 1: one position per output position
    assert plan.totals()["params_after"] == row.params_after
    with pytest.raises(KeyError, match="merged into the row '3'"):
        plan["0"]


def test_merge_counts_the_first_conv_at_the_inner_convs_input_resolution():
    model = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 64, 1, bias=False))
    (row,) = lrd.plan(model, ratio=2.0, merge=True, example_inputs=X).merged
    r1, r2 = row.rank
    assert row.stride == (2, 2) and row.merge.bn3 is None
    assert row.macs_after == 16 * r1 * 4 + 9 * r1 * r2 + r2 * 64


def test_hf_resnet50_merges_every_bottleneck():
    from transformers import ResNetConfig, ResNetForImageClassification

    model = ResNetForImageClassification(ResNetConfig(depths=[3, 4, 6, 3]))
    plan = lrd.plan(model, ratio=2.0, merge=True, example_inputs={"pixel_values": torch.randn(1, 3, 32, 32)})
    assert len(plan.merged) == 16 and not [row for row in plan if row.merge_skipped]
    first = plan.merged[0]
    prefix = "resnet.encoder.stages.0.layers.0.layer."
    assert first.name == prefix + "1.convolution" and first.rank == (38, 38)
    assert (first.merge.first, first.merge.bn1, first.merge.last, first.merge.bn3) == (
        prefix + "0.convolution", prefix + "0.normalization", prefix + "2.convolution", prefix + "2.normalization")
    # Every conv is either merged or planned as before (shortcuts, stem); the fc stays a row.
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    covered = {row.name for row in plan} | set(plan.absorbed())
    assert convs <= covered and len(plan) == len(convs) - 32 + 1


@pytest.mark.slow
@pytest.mark.parametrize("depths, blocks", [([3, 4, 23, 3], 33), ([3, 8, 36, 3], 50)])
def test_hf_resnet101_and_152_merge_every_bottleneck(depths, blocks):
    from transformers import ResNetConfig, ResNetForImageClassification

    model = ResNetForImageClassification(ResNetConfig(depths=depths))
    plan = lrd.plan(model, ratio=2.0, merge=True, example_inputs={"pixel_values": torch.randn(1, 3, 32, 32)})
    assert len(plan.merged) == blocks and not [row for row in plan if row.merge_skipped]
    assert {row.rank for row in plan.merged} == {(38, 38), (77, 77), (154, 154), (309, 309)}


def test_overlapping_candidates_merge_once_and_the_other_says_why():
    # 1x1 -> 3x3 -> 1x1 -> 3x3 -> 1x1: the middle 1x1 ends the first block and starts the second.
    layers = []
    for conv in (nn.Conv2d(16, 32, 1), nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 32, 1),
                 nn.Conv2d(32, 32, 3, padding=1)):
        layers += [conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Conv2d(32, 16, 1))
    plan = lrd.plan(model, ratio=2.0, merge=True, example_inputs=X)
    assert [row.name for row in plan.merged] == ["3"]
    assert plan["9"].merge_skipped == "6 is already merged into the block of 3"


def test_user_exclusion_of_a_neighbour_stops_the_merge():
    plan = lrd.plan(bottleneck(), ratio=2.0, merge=True, example_inputs=X, exclude=["6"], min_rank=1)
    assert not plan.merged and plan["3"].merge_skipped == "last conv 6 is kept: excluded by user"


def test_merge_needs_example_inputs():
    with pytest.raises(ValueError, match="merge=True needs example_inputs"):
        lrd.plan(bottleneck(), ratio=2.0, merge=True)
    with pytest.raises(ValueError, match="merge must be True or False"):
        lrd.plan(bottleneck(), ratio=2.0, merge="yes", example_inputs=X)


def test_merged_plans_round_trip_through_json(tmp_path):
    plan = lrd.plan(bottleneck(), ratio=2.0, merge=True, example_inputs=X, min_rank=1)
    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert again.to_json() == plan.to_json() and again.merged[0].merge == plan.merged[0].merge


def _merged_file(tmp_path, change):
    path = tmp_path / "plan.json"
    lrd.plan(bottleneck(), ratio=2.0, merge=True, example_inputs=X, min_rank=1).save(path)
    data = json.loads(path.read_text())
    change(data["layers"][0])
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda row: row["merge"].update(first=""), r"layer 0 \('3'\): field 'merge': field 'first' must be a non-empty"),
    (lambda row: row["merge"].pop("bn2"), r"layer 0 \('3'\): field 'merge': missing field 'bn2'"),
    (lambda row: row["merge"].update(act1="softmax"), r"field 'merge': field 'act1' must be null or one of"),
    (lambda row: row["merge"].update(first_shape={"out": 3}), r"field 'merge': field 'first_shape' must be"),
    (lambda row: row["merge"].update(first_stride=[0, 1]), r"field 'merge': field 'first_stride'"),
    (lambda row: row.update(merge=[1]), r"layer 0 \('3'\): field 'merge' must be null or an object"),
    (lambda row: row.update(merge=None), r"layer 0 \('3'\): layer '3': a 'merged' row needs its merge block"),
    (lambda row: row.update(rank=19), r"field 'rank' for kind 'merged' must be a list of two ints"),
    (lambda row: row.update(kind="tucker2"), r"a 'merged' row needs its merge block and no other kind has one"),
    (lambda row: row.update(branches=2), r"branches must be >= 2 for kind 'tucker2_branched' and 1 otherwise"),
    (lambda row: row.update(merge_skipped=3), r"field 'merge_skipped' must be null or a string"),
])
def test_a_hand_edited_merged_row_names_the_file_row_and_field(tmp_path, change, message):
    path = _merged_file(tmp_path, change)
    with pytest.raises(ValueError, match=message) as error:
        Plan.load(path)
    assert str(path) in str(error.value)


def test_branched_rows_have_exact_counts_and_round_trip(tmp_path):
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 32, 1))
    plan = lrd.plan(model, ratio=2.0, branches=2)
    row = plan["0"]
    assert (row.kind, row.branches, row.rank) == ("tucker2_branched", 2, (50, 50))
    assert row.params_after == 64 * 50 + 9 * 50 * 50 // 2 + 50 * 64 <= 64 * 64 * 9 / 2
    assert plan["1"].kind == "svd" and plan["1"].branches == 1  # only k x k convs branch
    assert str(plan).splitlines()[1].split()[4] == "50x50/2"
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path).to_json() == plan.to_json()
    data = json.loads(path.read_text())
    data["layers"][0]["rank"] = [51, 50]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"layer 0 \('0'\): .*multiples of 2 branches"):
        Plan.load(path)


class ChainTimer:
    """Fake times: merged blocks by `merged_ms(rank)` (their original 100 ms), other layers 50 ms
    decomposed; records each job."""

    def __init__(self, merged_ms):
        self.merged_ms, self.jobs = merged_ms, []

    def __call__(self, job) -> float:
        self.jobs.append(job)
        if job.kind == "merged":
            assert isinstance(job.dense, BottleneckChain)
            return 100.0 if job.rank is None else self.merged_ms(job.rank)
        return 100.0 if job.rank is None else 50.0


def optimize_merged(timer, **settings):
    model = nn.Sequential(bottleneck(), nn.Conv2d(16, 16, 3, padding=1))
    plan = lrd.plan(model, ratio=2.0, merge=True, example_inputs=X, min_rank=1, branches=2)
    assert [row.kind for row in plan.changed] == ["merged", "tucker2_branched"] and not plan.decomposed
    return model, plan, lrd.optimize_ranks(model, plan, X, cache=False, budget_s=None, timer=timer, **settings)


def test_optimize_ranks_times_a_merged_block_as_one_unit_and_snaps_its_widths():
    model, plan, optimized = optimize_merged(ChainTimer(lambda rank: 10.0 if max(rank) <= 16 else 20.0))
    row, planned = optimized["0.3"], plan["0.3"]
    assert max(planned.rank) > 16 and row.kind == "merged" and max(row.rank) <= 16, (planned.rank, row.rank)
    assert (row.time_original_ms, row.time_ms) == (100.0, 10.0) and row.merge == planned.merge
    assert optimized["1"] == plan["1"]  # a branched row keeps the form the plan gave it
    lrd.decompose(model, optimized, calibration=[torch.randn(4, 16, 8, 8)])
    assert model[0][3].out_channels == row.rank[1] and isinstance(model[0][3], MergedConv2d)


def test_a_merged_block_slower_than_the_original_keeps_its_three_convs():
    model, plan, optimized = optimize_merged(ChainTimer(lambda rank: 200.0))
    assert [(r.name, r.kind) for r in optimized if r.name.startswith("0.")] == [
        ("0.0", "keep"), ("0.3", "keep"), ("0.6", "keep")]
    assert all("kept with its block (0.3)" in optimized[n].reason for n in ("0.0", "0.6"))
    assert "not faster than the original" in optimized["0.3"].reason
    lrd.Plan.from_dict(optimized.to_dict())  # a valid plan
    lrd.decompose(model, optimized)  # nothing to calibrate: the block stays as it was
    assert type(model[0][3]) is nn.Conv2d and isinstance(model[1], lrd.BranchedTuckerConv2d)


@pytest.mark.parametrize("objective", ["infer", "train"])
def test_merged_blocks_are_really_timed_in_both_objectives(objective):
    _, _, optimized = optimize_merged(None, objective=objective, min_run_time=0.001)
    assert optimized["0.3"].time_original_ms > 0 and optimized["0.3"].kind in ("merged", "keep")
