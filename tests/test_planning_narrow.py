"""Finding narrowable widths by tracing, and narrow rows in plans and plan files."""

import json

import pytest
import torch
import transformers
from torch import nn

import lrdaccel as lrd
from lrdaccel.planning import Plan
from lrdaccel.planning.narrow import find_narrow_candidates


def tiny_bert(layers=2):
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=50)
    return transformers.BertModel(config).eval()


def tiny_gpt2():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(config).eval()


TOKENS = {"input_ids": torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(0))}


class Residual(nn.Module):
    """fc1 -> relu -> fc2, with the activation also added to the output (a residual read)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h) + h


class TwoHeads(nn.Module):
    """One activation read by two layers."""

    def __init__(self):
        super().__init__()
        self.fc, self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.nn.functional.silu(self.fc(x))
        return self.a(h) + self.b(h)


def test_bert_ffns_are_found_by_tracing_and_planned_at_half_their_parameters():
    model = tiny_bert()
    plan = lrd.plan(model, ratio=2, form="narrow", example_inputs=TOKENS, exclude=r".*attention.*")
    narrow = plan.narrowed
    assert [(row.name, row.narrow.consumer, row.rank) for row in narrow] == [
        ("encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense", 32),
        ("encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense", 32)]
    assert all(row.params_before == 2 * 64 * 32 and row.params_after == 2 * 32 * 32 for row in narrow)
    assert "gelu" in narrow[0].reason and "ratio 2" in narrow[0].reason
    names = {row.name for row in plan}
    assert "encoder.layer.0.output.dense" not in names  # the consumer is absorbed in the producer's row
    with pytest.raises(KeyError, match="narrowed with the row 'encoder.layer.0.intermediate.dense'"):
        plan["encoder.layer.0.output.dense"]
    others = [row for row in plan if row.kind != "narrow" and row.layer_type == "Linear"]
    assert others and all(row.kind == "keep" for row in others)
    assert plan["encoder.layer.0.attention.self.value"].reason == (
        "not narrowed: encoder.layer.0.attention.self.value is kept: excluded by user")
    assert plan["pooler.dense"].reason == "not narrowed: no layer reads the activation after pooler.dense"
    printed = str(plan)
    assert "2 widths narrowed (producer and consumer each)" in printed and " narrow " in printed


def test_attention_heads_narrow_query_key_and_value_output_together():
    plan = lrd.plan(tiny_bert(), ratio=2, min_rank=1, form="narrow", example_inputs=TOKENS)
    row = plan["encoder.layer.0.attention.self.value"]
    pair = row.narrow
    assert (row.kind, row.rank, pair.consumer, pair.co_producers, pair.heads, pair.attention) == (
        "narrow", 16, "encoder.layer.0.attention.output.dense",
        ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key"), 2,
        "encoder.layer.0.attention.self")
    assert row.params_before == 4 * 32 * 32 and row.params_after == 4 * 32 * 16
    assert "2 heads of 16 -> 8 dimensions" in row.reason
    assert len(plan.narrowed) == 4 and "encoder.layer.0.attention.self.query" not in {r.name for r in plan}
    assert Plan.from_json(plan.to_json()).to_json() == plan.to_json()
    with pytest.raises(ValueError, match=r"must be a multiple of its 2 heads in \[1, 32\], got 15"):
        lrd.plan(tiny_bert(), ranks={"encoder.layer.0.attention.self.value": 15}, form="narrow",
                 example_inputs=TOKENS)
    (gpt2_attention,) = [c for c in find_narrow_candidates(tiny_gpt2(), TOKENS) if c.heads][:1] or [None]
    assert gpt2_attention is None  # GPT-2 packs query, key and value in one Conv1D: not found as three layers


def test_gpt2_conv1d_ffn_through_a_composed_gelu_is_found():
    (first, second) = [c for c in find_narrow_candidates(tiny_gpt2(), TOKENS)]
    assert (first.producer, first.consumer, first.width, first.reason) == ("h.0.mlp.c_fc", "h.0.mlp.c_proj", 128, None)
    assert "tanh" in first.activation and "pow" in first.activation and second.producer == "h.1.mlp.c_fc"
    plan = lrd.plan(tiny_gpt2(), ratio=4, form="narrow", example_inputs=TOKENS)
    assert [(row.layer_type, row.rank) for row in plan.narrowed] == [("Conv1D", 32), ("Conv1D", 32)]


def test_a_width_that_cannot_narrow_is_kept_with_its_reason():
    plan = lrd.plan(Residual(), ratio=2, min_rank=1, form="narrow", example_inputs=torch.randn(1, 8))
    assert plan["fc1"].kind == "keep"
    assert plan["fc1"].reason == "not narrowed: the activation after fc1 is combined with fc2 by add (op 4)"
    plan = lrd.plan(TwoHeads(), ratio=2, min_rank=1, form="narrow", example_inputs=torch.randn(1, 8))
    assert plan["fc"].reason == "not narrowed: the activation after fc is read by several layers (a, b)"


def test_explicit_widths_and_full_width():
    model = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 4))
    x = torch.randn(1, 8)
    assert lrd.plan(model, ranks={"0": 5}, form="narrow", example_inputs=x)["0"].rank == 5
    assert lrd.plan(model, ranks="full", form="narrow", example_inputs=x)["0"].rank == 24
    for width in (0, 25):
        with pytest.raises(ValueError, match=rf"narrow width of '0' must be an int in \[1, 24\], got {width}"):
            lrd.plan(model, ranks={"0": width}, form="narrow", example_inputs=x)


def test_form_narrow_needs_example_inputs_and_a_known_form():
    with pytest.raises(ValueError, match="form='narrow' needs example_inputs"):
        lrd.plan(tiny_bert(), ratio=2, form="narrow")
    with pytest.raises(ValueError, match="form"):
        lrd.plan(tiny_bert(), ratio=2, form="thin")
    with pytest.raises(ValueError, match="form='narrow' does not combine with merge=True"):
        lrd.plan(tiny_bert(), ratio=2, form="narrow", merge=True, example_inputs=TOKENS)


def test_narrow_rows_round_trip_through_json_and_bad_rows_are_refused():
    plan = lrd.plan(tiny_bert(), ratio=2, form="narrow", example_inputs=TOKENS)
    again = Plan.from_json(plan.to_json())
    assert again.to_json() == plan.to_json()
    assert again.narrowed[0].narrow == plan.narrowed[0].narrow
    data = json.loads(plan.to_json())
    row = next(r for r in data["layers"] if r["kind"] == "narrow")
    row["rank"] = 0
    with pytest.raises(ValueError, match=r"field 'rank' for kind 'narrow' must be an int >= 1, got 0"):
        Plan.from_dict(data)
    row["rank"], row["narrow"] = 32, None
    with pytest.raises(ValueError, match="a 'narrow' row needs its consumer"):
        Plan.from_dict(data)
    row["narrow"] = {"consumer": "x", "consumer_type": "Linear"}
    with pytest.raises(ValueError, match="field 'narrow': missing field 'consumer_shape'"):
        Plan.from_dict(data)


def test_validation_refuses_a_width_above_the_original_or_a_wrong_consumer():
    from lrdaccel.planning.validation import validate_plan
    model = tiny_bert()
    plan = lrd.plan(model, ratio=2, form="narrow", example_inputs=TOKENS, exclude=r".*attention.*")
    row = plan.narrowed[0]
    wide = plan.replace(row.with_rank(65, row.reason))
    with pytest.raises(ValueError, match=r"narrow width must be in \[1, 64\] \(the layer's 64 outputs\), got 65"):
        validate_plan(model, wide)
    other = tiny_bert(layers=1)
    with pytest.raises(ValueError, match="no such module"):
        validate_plan(other, plan)


def conv_chain(groups=1):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> max pool -> conv (grouped if asked)."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(24, 8, 3, padding=1, groups=groups)).eval()


class BasicBlock(nn.Module):
    """A ResNet basic block: the inner width narrows, the output width carries the residual add."""

    def __init__(self, width=16):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


def test_conv_chains_narrow_with_their_batchnorm_and_near_misses_say_why():
    plan = lrd.plan(conv_chain(groups=2), ratio=2, min_rank=1, form="narrow", example_inputs=torch.randn(1, 3, 8, 8))
    row = plan["0"]
    assert (row.kind, row.rank, row.narrow.consumer, row.narrow.resized) == ("narrow", 8, "3", ("1",))
    assert row.params_before == 16 * 27 + 24 * 16 * 9 and row.params_after == 8 * 27 + 24 * 8 * 9
    assert plan["7"].reason == "form 'narrow' changes only the width between a layer and its consumer" or \
        plan["7"].kind == "keep"
    block = lrd.plan(BasicBlock(), ratio=2, min_rank=1, form="narrow", example_inputs=torch.randn(1, 16, 8, 8))
    assert (block["conv1"].kind, block["conv1"].narrow.resized) == ("narrow", ("bn1",))
    grouped = [c for c in find_narrow_candidates(conv_chain(groups=2), torch.randn(1, 3, 8, 8)) if c.producer == "3"]
    assert grouped[0].reason == "its consumer 7 is a grouped conv (groups=2)"


def test_a_residual_add_on_the_width_keeps_the_chain_with_its_reason():
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.b = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            h = torch.relu(self.bn(self.a(x)) + x)
            return self.b(h)

    plan = lrd.plan(Chain().eval(), ratio=2, min_rank=1, form="narrow", example_inputs=torch.randn(1, 8, 4, 4))
    assert plan["a"].kind == "keep" and plan["a"].reason.startswith("not narrowed: the activation after a is "
                                                                     "combined with ")
