"""compare_end_to_end on a plan with narrowed attention heads: the timed copy has the head size
decompose gives it, the user's model keeps its own."""

import torch

import lrdaccel as lrd
from lrdaccel.rankopt import whole_model
from test_decomposition_narrow import token_batches
from test_planning_narrow import tiny_bert


def test_a_narrowed_attention_plan_is_timed_at_its_head_size(monkeypatch):
    torch.manual_seed(0)
    model = tiny_bert()
    batch = token_batches(1)[0]
    plan = lrd.plan(model, ratio=2.0, form="narrow", example_inputs=batch)
    timed = []
    prepared = whole_model._prepared
    monkeypatch.setattr(whole_model, "_prepared",
                        lambda variant, *args: timed.append(variant) or prepared(variant, *args))
    report = whole_model.compare_end_to_end(model, {"narrow": plan}, batch, rounds=1, min_run_time=0.001)
    assert set(report.times_ms) == {"original", "narrow"}
    attention = timed[1].encoder.layer[0].attention.self
    assert (attention.attention_head_size, attention.query.out_features) == (8, 16)  # 2 heads of 8, not 1 of 16
    assert model.encoder.layer[0].attention.self.attention_head_size == 16
