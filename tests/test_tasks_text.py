"""tasks/text.py and what load_task keeps of it: a JSONL file's labels in one canonical form,
texts with two labels dropped, train/eval overlap counted and warned, and files that cannot be
read named with their line."""

import json
import warnings

import pytest
import torch

from lrdaccel.tasks.registry import check_task, load_task
from lrdaccel.tasks.text import Overlap, canonical_label, jsonl_task
from lrdaccel.zoo import ModelSpec


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


class WordTokenizer:
    """A tokenizer as load_task calls one: a token id per word, case folded as MiniLM's uncased
    tokenizer folds it; offline and instant."""

    pad_token_id = 0

    def __call__(self, texts, truncation, max_length):
        return {"input_ids": [[1 + int.from_bytes(word.lower().encode(), "big") % 1_000_003 for word in text.split()]
                              [:max_length] for text in texts]}


TOY = ModelSpec("toy", "a token model for tests", build=lambda: torch.nn.Identity(), input_shape=(8,),
                kind="tokens", vocab_size=50, tokenizer=WordTokenizer)


def test_a_number_and_its_string_are_one_label(tmp_path):
    """0.3.0 made classes ['0', '0.0', '1', '1.0'] of these six lines: a 4-class head on a 2-class task."""
    rows = [{"text": "one a", "label": 1, "split": "train"}, {"text": "one b", "label": 1.0, "split": "train"},
            {"text": "one c", "label": "1", "split": "eval"}, {"text": "zero a", "label": 0, "split": "train"},
            {"text": "zero b", "label": 0.0, "split": "eval"}, {"text": "zero c", "label": " 0.0 ", "split": "train"}]
    task = jsonl_task(write_jsonl(tmp_path / "t.jsonl", rows))
    assert task.classes == ["0", "1"]
    labels = dict(zip(task.train_texts + task.eval_texts, task.train_labels + task.eval_labels))
    assert labels == {"one a": 1, "one b": 1, "one c": 1, "zero a": 0, "zero b": 0, "zero c": 0}


def test_labels_are_stripped_strings(tmp_path):
    """0.3.0 made "pos" and "pos " two classes."""
    rows = [{"text": f"good {i}", "label": "pos" if i % 2 else "pos ", "split": "train"} for i in range(4)]
    rows += [{"text": "bad", "label": " neg", "split": "train"}, {"text": "fine", "label": "pos", "split": "eval"}]
    task = jsonl_task(write_jsonl(tmp_path / "t.jsonl", rows))
    assert task.classes == ["neg", "pos"]
    assert sorted(task.train_labels) == [0, 1, 1, 1, 1]


@pytest.mark.parametrize("label, name", [
    (1, "1"), (1.0, "1"), ("1", "1"), (" 1.0 ", "1"), ("1e2", "100"), (-0.0, "0"), (0.5, "0.5"), ("0.50", "0.5"),
    (12345678901234567890, "12345678901234567890"), ("01", "01"), ("+1", "+1"), ("Pos", "Pos"), (" pos ", "pos"),
    ("", None), ("  ", None), (True, "true"), (False, "false"), ("true", "true"), ("1e0", "1"), ("-0", "0"),
    ("9" * 5000, "9" * 5000), (None, None), ([1], None), ({"a": 1}, None), (float("nan"), None), (float("inf"), None),
])
def test_canonical_label(label, name):
    assert canonical_label(label) == name


@pytest.mark.parametrize("value", ["NaN", '{"a": 1}', "[1, 2]", "null", '"  "'])
def test_a_label_that_is_no_label_is_refused_naming_the_line_and_the_value(tmp_path, value):
    """0.3.0's message said there was "no label" where there was one, of the wrong kind."""
    path = write_jsonl(tmp_path / "t.jsonl", ['{"text": "a", "label": 1}', f'{{"text": "b", "label": {value}}}'])
    with pytest.raises(ValueError) as info:
        jsonl_task(path)
    assert str(info.value) == (f"{path}, line 2: \"label\" must be a non-empty string, a finite number or a bool, "
                               f"got {json.dumps(json.loads(value)) if value != 'NaN' else 'NaN'}")


def test_json_bools_are_the_labels_true_and_false(tmp_path):
    """0.3.0 refused a JSON true / false ("no label"): a binary task labelled with bools is common."""
    rows = [{"text": f"spam {i}", "label": True, "split": "train"} for i in range(2)]
    rows += [{"text": "ham", "label": False, "split": "train"}, {"text": "more spam", "label": "true", "split": "eval"}]
    task = jsonl_task(write_jsonl(tmp_path / "t.jsonl", rows))
    assert task.classes == ["false", "true"] and sorted(task.train_labels) == [0, 1, 1] and task.eval_labels == [1]


def test_an_integer_too_long_for_python_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ['{"text": "a", "label": 1}', '{"text": "b", "label": ' + "9" * 5000 + "}"])
    with pytest.raises(ValueError, match=r"t.jsonl, line 2: not valid JSON \(Exceeds the limit \(4300 digits\)"):
        jsonl_task(path)


def test_a_text_with_two_labels_is_dropped_and_counted(tmp_path):
    """0.3.0 kept both lines: the same text taught as two classes."""
    rows = [{"text": "it  was fine", "label": "pos", "split": "train"},
            {"text": "it was fine", "label": "neg", "split": "eval"},   # the same text once normalised
            {"text": "it was fine", "label": "neg", "split": "train"},
            {"text": "great", "label": "pos", "split": "train"}, {"text": "awful", "label": "neg", "split": "train"},
            {"text": "lovely", "label": "pos", "split": "eval"}, {"text": "dire", "label": "neg", "split": "eval"}]
    with pytest.warns(UserWarning) as caught:
        task = jsonl_task(write_jsonl(tmp_path / "t.jsonl", rows))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "t.jsonl: 1 text(s) occur with two or more labels (e.g. 'it was fine': neg, pos); dropped their 3 lines" \
        in message
    assert task.conflicts == 1
    assert sorted(task.train_texts) == ["awful", "great"] and sorted(task.eval_texts) == ["dire", "lovely"]


def test_a_split_emptied_by_the_conflicts_says_so(tmp_path):
    """Every eval text also occurs in train with another label: "no eval texts (give some lines
    "split": "eval" ...)" alone blamed a file that has them."""
    rows = [{"text": f"text {i}", "label": i % 2, "split": "train"} for i in range(6)]
    rows += [{"text": f"text {i}", "label": 1 - i % 2, "split": "eval"} for i in range(2)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.warns(UserWarning, match="2 text"), pytest.raises(ValueError) as info:
        jsonl_task(path)
    assert str(info.value).startswith(f"{path}: no eval texts once 2 text(s) with two labels are dropped (give")


def test_overlap_counts_eval_texts_also_in_train(tmp_path):
    rows = [{"text": f"text {i}", "label": i % 2, "split": "train"} for i in range(10)]
    rows += [{"text": f"text  {i}", "label": i % 2, "split": "eval"} for i in range(3)]  # leaked (normalised)
    rows += [{"text": f"new {i}", "label": i % 2, "split": "eval"} for i in range(5)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    task = jsonl_task(path)
    assert task.overlap == Overlap(3, 8) and task.overlap.share == 3 / 8
    with pytest.warns(UserWarning, match=r"3 of 8 eval texts \(37.5%\) also occur among the training texts"):
        data = load_task(str(path), TOY)
    assert data.overlap == Overlap(3, 8) and data.conflicts == 0


def test_overlap_is_that_of_the_items_a_limited_run_uses(tmp_path):
    """Every eval text is a training text (0.3.0 raced this to 100% without a word)."""
    rows = [{"text": f"text {i}", "label": i % 2, "split": split} for i in range(10) for split in ("train", "eval")]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.warns(UserWarning, match=r"10 of 10 eval texts \(100.0%\)"):
        assert load_task(str(path), TOY).overlap == Overlap(10, 10)
    with pytest.warns(UserWarning, match=r"4 of 4 eval texts \(100.0%\)"):
        assert load_task(str(path), TOY, eval_limit=4).overlap == Overlap(4, 4)


def test_overlap_is_counted_as_the_model_reads_the_texts(tmp_path):
    """An uncased tokenizer reads "Great" as "great", and max_length cuts what follows: those eval
    texts are training inputs to the model, though their texts differ (before, not counted)."""
    rows = [{"text": f"Great film number {i} of the year", "label": i % 2, "split": "train"} for i in range(6)]
    rows += [{"text": f"great FILM number {i} of the year", "label": i % 2, "split": "eval"} for i in range(2)]
    rows += [{"text": f"Great film number {i} of another year", "label": i % 2, "split": "eval"} for i in (2, 3)]
    rows += [{"text": f"new {i}", "label": i % 2, "split": "eval"} for i in range(4)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    assert jsonl_task(path).overlap == Overlap(0, 8)  # as texts, none is a training text
    with pytest.warns(UserWarning) as caught:
        assert load_task(str(path), TOY).overlap == Overlap(2, 8)  # case folded
    assert [str(w.message) for w in caught] == [
        f"task {path}: 2 of 8 eval texts (25.0%) also occur among the training texts as the model reads them "
        f"(tokenized, at most 128 tokens): accuracy on them measures memory, not generalisation"]
    with pytest.warns(UserWarning, match=r"4 of 8 eval texts \(50.0%\) .* at most 5 tokens"):
        assert load_task(str(path), TOY, max_length=5).overlap == Overlap(4, 8)  # and cut at 5 words


def test_inputs_the_model_reads_alike_with_two_labels_are_dropped(tmp_path):
    """"Good" labelled pos and "good" labelled neg are one input to an uncased tokenizer (before,
    both were kept: the model taught one input as two classes)."""
    rows = [{"text": "Good film", "label": "pos", "split": "train"}, {"text": "good FILM", "label": "neg", "split": "eval"},
            {"text": "good film", "label": "pos", "split": "train"}]
    rows += [{"text": f"fine {i}", "label": "pos", "split": "train"} for i in range(3)]
    rows += [{"text": f"dull {i}", "label": "neg", "split": split} for i in range(2) for split in ("train",)]
    rows += [{"text": "lovely", "label": "pos", "split": "eval"}, {"text": "dire", "label": "neg", "split": "eval"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    assert jsonl_task(path).conflicts == 0  # as texts, no text has two labels
    with pytest.warns(UserWarning) as caught:
        data = load_task(str(path), TOY)
    assert [str(w.message) for w in caught] == [
        f"task {path}: 1 input(s) occur with two or more labels as the model reads them (tokenized, at most 128 "
        f"tokens: e.g. texts that differ only in case); dropped their 3 items"]
    assert (data.size("train"), data.size("eval"), data.conflicts) == (5, 2, 1)
    assert data.overlap == Overlap(0, 2)
    assert sorted(data.labels("train").tolist()) == [0, 0, 1, 1, 1]


def test_no_overlap_no_warning(tmp_path):
    rows = [{"text": f"text {i}", "label": i % 2, "split": "train"} for i in range(6)]
    rows += [{"text": f"new {i}", "label": i % 2, "split": "eval"} for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_task(str(write_jsonl(tmp_path / "t.jsonl", rows)), TOY)
    assert data.overlap == Overlap(0, 4) and data.overlap.share == 0.0


def test_a_file_that_is_not_utf8_names_its_line(tmp_path):
    """0.3.0 raised "'utf-8' codec can't decode byte 0xe9 ..." naming neither the file nor the line."""
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"text": "ok", "label": "a"}\n{"text": "caf\u00e9", "label": "b"}\n'.encode("latin-1"))
    with pytest.raises(ValueError) as info:
        jsonl_task(path)
    assert str(info.value) == f"{path}, line 2: not UTF-8 (byte 0xe9 at byte 14 of the line); save the file as UTF-8"


def test_a_utf8_file_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "bom.jsonl"
    rows = [{"text": "caf\u00e9", "label": "a", "split": "train"}, {"text": "tea", "label": "b", "split": "eval"}]
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8-sig"))
    assert jsonl_task(path).train_texts == ["caf\u00e9"]


def test_a_directory_is_said_to_be_a_directory(tmp_path):
    """0.3.0 said "not found" of a directory given as --task."""
    folder = tmp_path / "tasks.jsonl"
    folder.mkdir()
    for call in (lambda: check_task(str(folder)), lambda: check_task(str(tmp_path)), lambda: jsonl_task(folder)):
        with pytest.raises(IsADirectoryError, match="is a directory: give a JSONL file"):
            call()


def test_a_file_in_the_current_folder_is_a_task_file_whatever_its_name(tmp_path, monkeypatch):
    """Before, `--task data.json` was an "unknown task" unless it ended in .jsonl or had a folder."""
    monkeypatch.chdir(tmp_path)
    rows = [{"text": "good", "label": "pos", "split": "train"}, {"text": "bad", "label": "neg", "split": "eval"}]
    write_jsonl(tmp_path / "data.json", rows)
    check_task("data.json")
    assert jsonl_task("data.json").classes == ["neg", "pos"]
    with pytest.raises(ValueError, match="unknown task 'nothing.json'; known: wordnet-supersense"):
        check_task("nothing.json")
