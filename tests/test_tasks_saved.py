"""tasks/saved.py: a classifier saved with its classes comes back with its head and its weights;
a plain lrd.save directory loads as it is; a classifier.json that is not ours is refused."""

import json

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.tasks.classifier import make_classifier
from lrdaccel.tasks.saved import load_classifier, load_saved, read_classifier_info, save_classifier


class Encoder(nn.Module):
    """Token states [batch, tokens, 16] from float inputs: make_classifier gives it a pooled head."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)

    def forward(self, input_ids, attention_mask=None):
        return self.proj(input_ids)


def encoder():
    torch.manual_seed(0)
    return Encoder()


EXAMPLE = {"input_ids": torch.randn(2, 5, 8), "attention_mask": torch.ones(2, 5, dtype=torch.long)}


def test_a_decomposed_classifier_reloads_bitwise(tmp_path):
    classifier, head = make_classifier(encoder(), EXAMPLE, 3, seed=7)
    lrd.decompose(classifier, ratio=2.0, min_rank=1, exclude=lambda _m, name: name in head)
    save_classifier(classifier, tmp_path, classes=["a", "b", "c"], head=head, model="toy")
    loaded, info = load_classifier(tmp_path, encoder(), EXAMPLE)
    assert info["classes"] == ["a", "b", "c"] and info["head"] == ["head"] and info["model"] == "toy"
    assert isinstance(loaded.encoder.proj, lrd.LowRankModule)
    assert torch.equal(loaded(**EXAMPLE), classifier(**EXAMPLE))
    assert torch.equal(load_saved(tmp_path, encoder(), EXAMPLE)(**EXAMPLE), classifier(**EXAMPLE))


def test_a_plain_saved_model_loads_as_lrd_load_does(tmp_path):
    model = encoder()
    lrd.decompose(model, ratio=2.0, min_rank=1)
    lrd.save(model, tmp_path)
    assert read_classifier_info(tmp_path) is None
    assert torch.equal(load_saved(tmp_path, encoder(), EXAMPLE)(**EXAMPLE), model(**EXAMPLE))
    with pytest.raises(ValueError, match="no classifier.json: not a classifier saved by `lrdaccel finetune --task`"):
        load_classifier(tmp_path, encoder(), EXAMPLE)


def test_a_plain_model_saved_over_a_classifier_is_not_taken_for_one(tmp_path):
    """Before, the classifier.json left behind made load_saved (and `lrdaccel export --from`) build
    a classifier for a plain model, refused as "model_class is 'Encoder' but the model given is a
    'EncoderClassifier'"."""
    classifier, head = make_classifier(encoder(), EXAMPLE, 3, seed=7)
    save_classifier(classifier, tmp_path, classes=["a", "b", "c"], head=head)
    model = encoder()
    lrd.decompose(model, ratio=2.0, min_rank=1)
    lrd.save(model, tmp_path)
    with pytest.warns(UserWarning, match="classifier.json describes an earlier save to .*: ignored, the directory "
                                         "holds a plain lrd.save model"):
        loaded = load_saved(tmp_path, encoder(), EXAMPLE)
    assert torch.equal(loaded(**EXAMPLE), model(**EXAMPLE))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no classifier.json"):
        load_classifier(tmp_path, encoder(), EXAMPLE)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a classifier description"),
    (json.dumps({"format": "other"}), "not an lrdaccel classifier description \\(missing format='lrdaccel.classifier'"),
    (json.dumps({"format": "lrdaccel.classifier", "version": 9, "classes": ["a", "b"]}),
     "version 9 is newer than this lrdaccel reads \\(1\\); upgrade lrdaccel"),
    (json.dumps({"format": "lrdaccel.classifier", "version": 1, "classes": ["a"]}), "at least two class names"),
    # list("head") would have kept modules "h", "e", "a", "d" whole, and decomposed the head
    (json.dumps({"format": "lrdaccel.classifier", "version": 1, "classes": ["a", "b"], "head": "head"}),
     "\"head\" must list module names, got 'head'"),
])
def test_a_classifier_json_that_is_not_ours_is_refused(tmp_path, content, message):
    (tmp_path / "classifier.json").write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        read_classifier_info(tmp_path)
    assert "classifier.json" in str(info.value)
