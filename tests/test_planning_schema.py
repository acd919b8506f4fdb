"""Hand-edited plan files are validated against one schema: every error names the file, the row
and the field, and nothing is parsed from text (issue #13, item 6); other bad planning inputs
give clear errors (item 8)."""

import json

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from test_planning import Net


@pytest.fixture
def plan_file(tmp_path):
    path = tmp_path / "plan.json"
    lrd.plan(Net(), ratio=2.0).save(path)
    return path


def _edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _row(data, name):
    return next(row for row in data["layers"] if row["name"] == name)


@pytest.mark.parametrize("change, message", [
    (lambda d: _row(d, "fc").update(rank="35"), r"layer 5 \('fc'\): field 'rank' for kind 'svd' must be an int"),
    (lambda d: _row(d, "fc").update(rank="10"), r"\('fc'\): field 'rank'"),
    (lambda d: _row(d, "fc").update(rank=0), r"\('fc'\): field 'rank' .*got 0"),
    (lambda d: _row(d, "fc").update(rank=True), r"\('fc'\): field 'rank'"),
    (lambda d: _row(d, "conv").update(rank=[5]), r"layer 1 \('conv'\): field 'rank' for kind 'tucker2' must be a list "
                                                 r"of two ints"),
    (lambda d: _row(d, "conv").update(rank=12), r"\('conv'\): field 'rank' for kind 'tucker2'"),
    (lambda d: _row(d, "depthwise").update(rank=3), r"\('depthwise'\): field 'rank' for kind 'keep' must be null"),
    (lambda d: _row(d, "fc").update(shape={"out": 100}), r"\('fc'\): field 'shape' must be"),
    (lambda d: _row(d, "fc").update(stride="1,1"), r"\('fc'\): field 'stride'"),
    (lambda d: _row(d, "fc").update(time_ms="fast"), r"\('fc'\): field 'time_ms'"),
    (lambda d: _row(d, "fc").pop("kind"), r"\('fc'\): missing field 'kind'"),
    (lambda d: d.update(layers=None), r"field 'layers' must be a list"),
    (lambda d: d.update(meta=[1]), r"field 'meta' must be an object"),
    (lambda d: d.update(ratio="2"), r"field 'ratio'"),
    (lambda d: d.update(version=0), r"plan version 0 is not valid"),
    (lambda d: d.update(version=-5), r"plan version -5 is not valid"),
    (lambda d: d.update(version="1"), r"plan version '1' is not valid"),
    (lambda d: d["layers"].append(7), r"layer 7: expected an object"),
])
def test_a_hand_edited_plan_names_the_file_row_and_field(plan_file, change, message):
    _edit(plan_file, change)
    with pytest.raises(ValueError, match=message) as error:
        lrd.Plan.load(plan_file)
    assert str(plan_file) in str(error.value)


def test_a_valid_hand_edit_is_taken(plan_file):
    _edit(plan_file, lambda d: _row(d, "fc").update(rank=20))
    plan = lrd.Plan.load(plan_file)
    assert plan["fc"].rank == 20 and plan["fc"].params_after == 20 * (256 + 100)
    _edit(plan_file, lambda d: _row(d, "conv").update(rank=[12, 20]))
    assert lrd.Plan.load(plan_file)["conv"].rank == (12, 20)


def test_decompose_takes_a_plan_path_and_rejects_other_types(plan_file):
    model = Net()
    report = lrd.decompose(model, str(plan_file))
    assert {row.name for row in report.layers} == {row.name for row in lrd.Plan.load(plan_file).decomposed}
    with pytest.raises(ValueError, match="plan must be an lrdaccel Plan.*got int"):
        lrd.decompose(Net(), 5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(include=5), "include must be a regex string, a list of layer names"),
    (dict(exclude=[1, 2]), "exclude must be a regex string"),
    (dict(ratio="2"), "ratio must be a finite number > 1"),
    (dict(minimum_rank=4), r"unknown plan settings \['minimum_rank'\]"),
])
def test_bad_plan_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lrd.plan(Net(), **kwargs)


def test_plan_works_on_the_meta_device_and_decompose_says_it_needs_weights():
    with torch.device("meta"):
        model = Net()
    plan = lrd.plan(model, ratio=2.0)
    assert [(row.kind, row.rank) for row in plan] == [(row.kind, row.rank) for row in lrd.plan(Net(), ratio=2.0)]
    with pytest.raises(ValueError, match="meta device; decompose needs real weights"):
        lrd.decompose(model, plan)


def test_a_shared_bias_is_kept_like_a_shared_weight():
    a, b = nn.Linear(64, 64), nn.Linear(64, 64)
    b.bias = a.bias
    plan = lrd.plan(nn.Sequential(a, b), ratio=2.0)
    assert plan["0"].kind == "keep" and plan["0"].reason == "bias shared with 1"
    assert plan["1"].reason == "bias shared with 0"
