"""race/text_tasks.py, race/tasks.py, race/data.py: real labelled tasks offline, a user's JSONL
file, and batches ready for a model."""

import json

import pytest
import torch

from lrdaccel import data as datasets
from lrdaccel import zoo
from lrdaccel.calibration.corpora import WORDNET_DIR
from lrdaccel.tasks.data import TokenData
from lrdaccel.tasks.registry import ImageNetInput, check_task, load_task
from lrdaccel.tasks.text import NOUN_LEXFILES, jsonl_task, wordnet_supersense

needs_wordnet = pytest.mark.skipif(not (WORDNET_DIR / "data.noun").is_file(),
                                   reason="Debian's wordnet-base is not installed")
needs_fmnist = pytest.mark.skipif(not datasets.available("fashion-mnist"), reason="no Fashion-MNIST")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@needs_wordnet
def test_wordnet_supersense_is_26_noun_lexfiles_with_2000_held_out():
    task = wordnet_supersense()
    assert task.classes == list(NOUN_LEXFILES) and len(task.classes) == 26
    assert len(task.eval_texts) == 2000
    assert len(task.train_texts) > 70_000
    assert not set(task.train_texts) & set(task.eval_texts)
    assert len(set(task.train_texts)) == len(task.train_texts)  # each text once
    assert set(task.train_labels) == set(range(26))
    # a real gloss and its real label: "a member of the genus Canis ..." is an animal
    index = {text: label for text, label in zip(task.train_texts + task.eval_texts,
                                                task.train_labels + task.eval_labels)}
    dog = next(t for t in index if t.startswith("a member of the genus Canis"))
    assert task.classes[index[dog]] == "noun.animal"
    assert wordnet_supersense().eval_texts == task.eval_texts  # stable


def test_jsonl_with_string_labels_and_splits(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"text": "good film", "label": "pos", "split": "train"},
        {"text": "bad film", "label": "neg", "split": "train"},
        {"text": "fine film", "label": "pos", "split": "eval"},
        "",
        {"text": "awful", "label": "neg", "split": "eval"},
    ])
    task = jsonl_task(path)
    assert task.classes == ["neg", "pos"]
    assert sorted(zip(task.train_texts, task.train_labels)) == [("bad film", 0), ("good film", 1)]
    assert sorted(zip(task.eval_texts, task.eval_labels)) == [("awful", 0), ("fine film", 1)]


def test_jsonl_without_split_holds_out_one_in_ten_by_hash(tmp_path):
    rows = [{"text": f"sentence number {i}", "label": i % 3} for i in range(600)]
    task = jsonl_task(write_jsonl(tmp_path / "t.jsonl", rows))
    assert task.classes == ["0", "1", "2"]  # numbers are labels by their text
    assert 30 <= len(task.eval_texts) <= 90 and len(task.train_texts) + len(task.eval_texts) == 600
    shuffled = jsonl_task(write_jsonl(tmp_path / "u.jsonl", rows[::-1]))
    assert sorted(shuffled.eval_texts) == sorted(task.eval_texts)  # by the text, not the line order


@pytest.mark.parametrize("rows, message", [
    ([{"label": "a"}, {"text": "x", "label": "b"}], r"line 1: no \"text\""),
    ([{"text": "x", "label": "a"}, {"text": "y"}], r"line 2: no \"label\""),
    ([{"text": "x", "label": "a"}, {"text": "  ", "label": "b"}], r"line 2: \"text\" must be a non-empty string, "
                                                                  r"got \"  \""),
    (["[1, 2]"], "line 1: expected an object"),
    (["{not json"], "line 1: not valid JSON"),
    ([{"text": "x", "label": "a", "split": "test"}], r"line 1: \"split\" must be one of"),
    ([{"text": f"t{i}", "label": "only"} for i in range(20)], "at least two labels, found 1 \\(only\\)"),
    ([{"text": "x", "label": "a", "split": "train"}, {"text": "y", "label": "b", "split": "train"}], "no eval texts"),
])
def test_jsonl_errors_name_the_file_and_line(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=message) as info:
        jsonl_task(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unknown_task_and_missing_file():
    with pytest.raises(ValueError, match="unknown task 'imdb'; known: wordnet-supersense, fashion-mnist"):
        check_task("imdb")
    with pytest.raises(FileNotFoundError, match="task file nowhere/x.jsonl not found"):
        check_task("nowhere/x.jsonl")


def test_a_text_task_needs_a_token_model_with_a_tokenizer(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"t {i}", "label": i % 2} for i in range(30)])
    with pytest.raises(ValueError, match="needs a token model with a tokenizer"):
        load_task(str(path), zoo.get("fmnist-cnn"))
    with pytest.raises(ValueError, match="needs a token model with a tokenizer"):
        load_task(str(path), zoo.get("gpt2"))  # tokens, but no tokenizer shipped offline


@pytest.mark.slow
def test_text_batches_are_padded_to_their_longest_text(tmp_path):
    rows = [{"text": "a short one", "label": "x"}, {"text": "a much longer sentence with many more words", "label": "y"}]
    path = write_jsonl(tmp_path / "t.jsonl", [dict(r, split="train") for r in rows] + [dict(r, split="eval") for r in rows])
    with pytest.warns(UserWarning, match="2 of 2 eval texts"):  # the same texts in both splits
        data = load_task(str(path), zoo.get("minilm"))
    assert isinstance(data, TokenData) and data.classes == ["x", "y"]
    inputs, labels = data.batch("train", [0, 1])
    lengths = inputs["attention_mask"].sum(1)
    assert inputs["input_ids"].shape[1] == int(lengths.max()) and int(lengths.min()) < int(lengths.max())
    assert (inputs["input_ids"][inputs["attention_mask"] == 0] == data.pad_id).all()
    assert sorted(labels.tolist()) == [0, 1]


@needs_fmnist
def test_fashion_mnist_for_a_grey_cnn_and_for_an_imagenet_cnn():
    grey = load_task("fashion-mnist", zoo.get("fmnist-cnn"), train_limit=256, eval_limit=64)
    x, y = grey.batch("train", list(range(256)))
    assert x.shape == (256, 1, 28, 28) and abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1) < 0.1
    assert grey.size("eval") == 64 and len(grey.classes) == 10
    rgb = load_task("fashion-mnist", zoo.get("efficientnet-lite0"), image_size=48, train_limit=8, eval_limit=8)
    x, _ = rgb.batch("eval", [0, 1])
    assert x.shape == (2, 3, 48, 48)
    torch.testing.assert_close(x[:, 0] * 0.229 + 0.485, x[:, 1] * 0.224 + 0.456)  # one grey image in RGB


def test_imagenet_input_resizes_repeats_and_normalises():
    images = torch.full((2, 1, 28, 28), 0.5)
    out = ImageNetInput(32)(images)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out[0, :, 0, 0], (0.5 - torch.tensor([0.485, 0.456, 0.406])) /
                               torch.tensor([0.229, 0.224, 0.225]))
