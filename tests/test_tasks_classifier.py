"""tasks/classifier.py: a plan made for the pretrained model names its layers as the classifier holds
them (under `encoder.`), merged and narrow rows with every neighbour they change."""

import torch

import lrdaccel as lrd
from lrdaccel.tasks.classifier import classifier_plan, make_classifier


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64)).eval()


def test_a_narrow_plan_for_the_encoder_narrows_the_classifier():
    inputs = {"input_ids": torch.randint(1, 64, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    encoder = tiny_bert()
    plan = lrd.plan(encoder, ratio=2.0, form="narrow", example_inputs=inputs)
    narrow = [row for row in plan if row.kind == "narrow"]
    assert narrow and any(row.narrow.co_producers for row in narrow)  # FFNs and attention heads
    classifier, _ = make_classifier(encoder, inputs, 3)
    rooted = classifier_plan(plan, classifier)
    for before, after in zip(plan, rooted):
        assert after.name == f"encoder.{before.name}"
        if before.narrow is not None:
            assert after.narrow.consumer == f"encoder.{before.narrow.consumer}"
            assert after.narrow.co_producers == tuple(f"encoder.{name}" for name in before.narrow.co_producers)
            assert after.narrow.attention == (before.narrow.attention and f"encoder.{before.narrow.attention}")
    lrd.decompose(classifier, rooted, calibration=[inputs])
    intermediate = classifier.encoder.encoder.layer[0].intermediate.dense
    assert intermediate.out_features == 32 and classifier.encoder.encoder.layer[0].output.dense.in_features == 32
    assert classifier(**inputs).shape == (4, 3)
