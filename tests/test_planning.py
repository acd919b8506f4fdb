"""Plan: candidates, reasons to keep, targeting, explicit ranks, JSON round trip."""

import copy
import json

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.planning import Plan


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.conv = nn.Conv2d(64, 64, 3, padding=1)
        self.depthwise = nn.Conv2d(64, 64, 3, groups=64, padding=1)
        self.grouped = nn.Conv2d(64, 64, 3, groups=4, padding=1)
        self.pointwise = nn.Conv2d(64, 256, 1)
        self.fc = nn.Linear(256, 100)
        self.tiny = nn.Linear(4, 4)

    def forward(self, x):
        x = self.pointwise(self.grouped(self.depthwise(self.conv(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


def rows(p):
    return {row.name: row for row in p}


def test_plan_reads_only_and_covers_every_candidate():
    model = Net()
    before = copy.deepcopy(model.state_dict())
    p = lrd.plan(model, ratio=2)
    assert [r.name for r in p] == ["stem", "conv", "depthwise", "grouped", "pointwise", "fc", "tiny"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules() if m is not model)


def test_ranks_reasons_and_counts():
    r = rows(lrd.plan(Net(), ratio=2))
    assert (r["conv"].kind, r["conv"].rank) == ("tucker2", (38, 38))
    assert (r["pointwise"].kind, r["pointwise"].rank) == ("svd", 25)
    assert (r["fc"].kind, r["fc"].rank) == ("svd", 35)  # floor(256*100 / (2*356))
    assert r["fc"].params_before == 25600 and r["fc"].params_after == 35 * 356
    assert r["conv"].params_after == 64 * 38 * 2 + 9 * 38 * 38
    assert r["depthwise"].kind == "keep" and "depthwise" in r["depthwise"].reason
    assert r["grouped"].kind == "keep" and "groups=4" in r["grouped"].reason
    # A 4x4 Linear at ratio 2 gets rank 1, below min_rank 8 (capped at its 4 channels): kept.
    assert r["tiny"].kind == "keep" and "rank 1, below min_rank 8" in r["tiny"].reason
    assert rows(lrd.plan(Net(), ratio=2, min_rank=1))["tiny"].rank == 1
    # Stem: r_in clamps to C_in = 3; the input 1x1 runs at 4x the output positions (stride 2).
    stem = r["stem"]
    assert stem.rank[0] == 3 and stem.stride == (2, 2)
    assert stem.macs_after == 3 * 3 * 4 + 49 * stem.rank[0] * stem.rank[1] + stem.rank[1] * 64


def test_no_mac_reduction_is_kept_with_reason():
    # Tucker-2 ranks (7, 7) fit the parameter budget, but the input 1x1 runs at 4x the output
    # positions (stride 2): 8*7*4 + 9*7*7 + 7*8 = 721 MACs per position against 576.
    model = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2))
    p = lrd.plan(model, ratio=1.01, min_rank=1)
    assert p["0"].kind == "keep" and "does not reduce MACs (721 >= 576" in p["0"].reason


def test_one_channel_stem_below_min_rank_is_kept():
    stem = nn.Sequential(nn.Conv2d(1, 32, 3))  # ratio 2 gives Tucker ranks (1, 2)
    p = lrd.plan(stem, ratio=2)
    assert p["0"].kind == "keep" and "(1, 2), below min_rank 8" in p["0"].reason
    rgb = lrd.plan(nn.Sequential(nn.Conv2d(3, 64, 7, stride=2)), ratio=2)  # (3, 9): r_in spans C_in
    assert rgb["0"].kind == "tucker2"


def test_multihead_attention_out_proj_kept():
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    r = rows(lrd.plan(model, ratio=2))
    assert r["layers.0.self_attn.out_proj"].kind == "keep"
    assert "MultiheadAttention" in r["layers.0.self_attn.out_proj"].reason
    assert r["layers.1.linear1"].kind == "svd"


def test_tied_weights_kept():
    emb = nn.Embedding(50, 64)
    head = nn.Linear(64, 50, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head, "proj": nn.Linear(64, 64)})
    r = rows(lrd.plan(model, ratio=2))
    assert r["head"].kind == "keep" and "shared with emb" in r["head"].reason
    assert r["proj"].kind == "svd"


def test_same_module_registered_twice_is_kept():
    shared = nn.Linear(16, 16)
    model = nn.ModuleDict({"a": shared, "b": shared})
    assert "shared with" in rows(lrd.plan(model, ratio=2))["a"].reason


def test_include_exclude_filter_and_per_layer_settings():
    model = Net()
    r = rows(lrd.plan(model, ratio=2, include=["conv", "fc"]))
    assert r["conv"].kind == "tucker2" and r["fc"].kind == "svd"
    assert r["pointwise"].reason == "not in include"
    r = rows(lrd.plan(model, ratio=2, include=r"(conv|fc)", exclude=["fc"]))
    assert r["fc"].reason == "excluded by user" and r["conv"].decomposed
    r = rows(lrd.plan(model, ratio=2, filter_fn=lambda m, n: isinstance(m, nn.Linear)))
    assert r["conv"].reason == "rejected by filter_fn" and r["fc"].decomposed
    r = rows(lrd.plan(model, ratio=2, ratios={"fc": 4}, ranks={"conv": (10, 20), "pointwise": 7}))
    assert r["fc"].rank == 17 and r["conv"].rank == (10, 20) and r["pointwise"].rank == 7
    assert r["conv"].reason == "rank set by user"


def test_full_rank_plan():
    r = rows(lrd.plan(Net(), ranks="full"))  # explicit ranks are exempt from min_rank
    assert r["conv"].rank == (64, 64) and r["fc"].rank == 100 and r["stem"].rank == (3, 64)


@pytest.mark.parametrize("kwargs,match", [
    (dict(ratio=1), "ratio"),
    (dict(ratio=0.5), "ratio"),
    (dict(ratio=float("nan")), "ratio"),
    (dict(ratios={"fc": 1.0}), r"ratios\['fc'\]"),
    (dict(ranks={"fc": 0}), r"layer 'fc'.*0"),
    (dict(ranks={"fc": 101}), r"layer 'fc'.*101"),
    (dict(ranks={"conv": (65, 3)}), r"layer 'conv'"),
    (dict(include=["nope"]), "include: no candidate layer named \\['nope'\\]"),
    (dict(exclude=["conv", "missing.layer"]), "missing.layer"),
    (dict(include=r"enc\..*"), "matches none"),
    (dict(include="(unclosed"), "not a valid regex"),
    (dict(ranks={"ghost": 3}), "ghost"),
    (dict(min_rank=0), "min_rank"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    model = Net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        lrd.plan(model, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_json_round_trip_and_table(tmp_path):
    p = lrd.plan(Net(), ratio=2, ranks={"pointwise": 9})
    text = p.to_json()
    data = json.loads(text)
    assert data["format"] == "lrdaccel.plan" and data["lrdaccel_version"] == lrd.__version__
    again = Plan.from_json(text)
    assert again == p
    p.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == p
    table = str(p)
    assert "conv" in table and "38x38" in table and "depthwise conv" in table
    assert "4/7 layers decomposed" in table


def test_json_rejects_foreign_and_future_files():
    with pytest.raises(ValueError, match="not an lrdaccel plan"):
        Plan.from_dict({"layers": []})
    with pytest.raises(ValueError, match="upgrade lrdaccel"):
        Plan.from_dict({"format": "lrdaccel.plan", "version": 99, "layers": []})
    with pytest.raises(ValueError, match="not valid JSON"):
        Plan.from_json("{nope")
    data = lrd.plan(Net(), ratio=2).to_dict()
    data["layers"][0]["kind"] = "os.system"
    with pytest.raises(ValueError, match="field 'kind' must be one of"):
        Plan.from_dict(data)
    data = lrd.plan(Net(), ratio=2).to_dict()
    data["layers"][0]["future_field"] = 1
    with pytest.warns(UserWarning, match="upgrade lrdaccel"):
        Plan.from_dict(data)


def test_already_decomposed_layers_are_not_candidates_again():
    model = Net()
    lrd.decompose(model, ratio=2)
    p = lrd.plan(model, ratio=2)
    names = [r.name for r in p]
    assert "conv" in names and "conv.first" not in names and "conv.core" not in names
    assert p["conv"].kind == "keep" and p["conv"].reason == "already decomposed"
