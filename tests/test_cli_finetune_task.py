"""`lrdaccel finetune --task`: a race task (a JSONL file, or wordnet-supersense by name) fine-tunes
a zoo model with a new head, compressed first as the race's `lrd` variant compresses it, saved so
that `load_classifier` (lrd.load plus the head) gives back the very model it trained; errors in
one line before any work. The quick tests stand a tiny BERT and a word tokenizer in for MiniLM."""

import dataclasses
import json

import pytest
import torch

import lrdaccel as lrd
from lrdaccel import zoo
from lrdaccel.calibration.corpora import WORDNET_DIR
from lrdaccel.cli import main
from lrdaccel.tasks.registry import load_task
from lrdaccel.tasks.saved import load_classifier

GOOD = "a fine, well made and moving film that I enjoyed"
BAD = "a dull, badly made film that bored everyone in the room"


def sentiment(n: int = 36):
    return [{"text": f"{GOOD if i % 2 else BAD} number {i}", "label": "positive" if i % 2 else "negative",
             "split": "eval" if i % 5 == 0 else "train"} for i in range(n)]


def write_task(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


class WordTokenizer:
    """Ids from each word's letters, a number digit by digit (so that "number 12" and "number 21"
    are not one input, which the task would count as train/eval overlap): offline, instant, and
    the same every run."""

    pad_token_id = 0

    def __call__(self, texts, truncation, max_length):
        def ids(word):
            return [2 + int(digit) for digit in word] if word.isdigit() else [12 + sum(map(ord, word)) % 50]

        return {"input_ids": [[i for word in text.split() for i in ids(word)][:max_length] for text in texts]}


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))


@pytest.fixture
def tiny_minilm(monkeypatch):
    """zoo "minilm" is a tiny BERT with a word tokenizer for the test."""
    real = zoo.get
    tiny = dataclasses.replace(real("minilm"), build=tiny_bert, input_shape=(16,), vocab_size=64,
                               tokenizer=WordTokenizer)
    monkeypatch.setattr(zoo, "get", lambda name: tiny if name == "minilm" else real(name))
    return tiny


def evaluate(model, data):
    """(accuracy, mean cross-entropy) on the eval split, as the run scores it."""
    model.eval()
    inputs, labels = data.batch("eval", list(range(data.size("eval"))))
    with torch.no_grad():
        logits = model(**inputs)
    return (logits.argmax(-1) == labels).float().mean().item(), torch.nn.functional.cross_entropy(logits, labels).item()


def test_finetune_a_jsonl_task_compressed_saves_a_classifier_that_reloads(tmp_path, tiny_minilm, capsys):
    task = write_task(tmp_path / "sentiment.jsonl", sentiment())
    out = tmp_path / "out"
    assert main(["finetune", "--model", "minilm", "--task", task, "--ratio", "2", "--epochs", "2", "--every-steps", "2",
                 "--train-batch-size", "8", "--lr", "1e-3", "--no-progress", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "decomposed 13 layers at ratio 2.0 (whiten, calibrated on 16 training batches)" in printed
    history = json.loads((out / "history.json").read_text())
    assert len(history["epochs"]) == 2 and history["completed"]
    assert history["epochs"][0]["trainable_share"] < 1  # sequential freezing (finetune's default) ran
    info = json.loads((out / "classifier.json").read_text())
    assert info["classes"] == ["negative", "positive"] and info["head"] == ["head"] and info["model"] == "minilm"
    data = load_task(task, tiny_minilm)
    example, _ = data.batch("train", [0, 1])
    model, _ = load_classifier(out, tiny_bert(), example)
    # decomposed: 2 layers x (query, key, value, output, up, down) + the pooler, the head kept whole
    low_rank = {name for name, module in model.named_modules() if isinstance(module, lrd.LowRankModule)}
    assert len(low_rank) == 13 and "head" not in low_rank and isinstance(model.head, torch.nn.Linear)
    accuracy, loss = evaluate(model, data)
    last = history["epochs"][-1]
    assert accuracy == pytest.approx(last["test_accuracy"], abs=1e-9)
    assert loss == pytest.approx(last["test_loss"], rel=1e-5)  # the very weights it trained


def test_finetune_from_a_saved_classifier_continues_it(tmp_path, tiny_minilm, capsys):
    task = write_task(tmp_path / "sentiment.jsonl", sentiment())
    common = ["finetune", "--model", "minilm", "--task", task, "--train-batch-size", "8", "--no-progress"]
    assert main([*common, "--ratio", "2", "--max-steps", "1", "-o", str(tmp_path / "a")]) == 0
    assert main([*common, "--from", str(tmp_path / "a"), "--epochs", "1", "-o", str(tmp_path / "b")]) == 0
    config = json.loads((tmp_path / "b" / "lrdaccel_config.json").read_text())
    assert len(config["plan"]["layers"]) == 13  # the decomposition came along
    other = write_task(tmp_path / "other.jsonl", [dict(row, label=row["label"][:3]) for row in sentiment()])
    capsys.readouterr()
    assert main([*common[:3], "--task", other, "--from", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "a classifier for classes ['negative', 'positive'], but task" in capsys.readouterr().err


def test_a_plan_made_for_the_zoo_model_decomposes_the_classifier(tmp_path, tiny_minilm, capsys):
    """`lrdaccel plan --model minilm -o plan.json` names the encoder's layers; the classifier holds
    them under `encoder.`: before, the run failed after loading ("the model has no such module")."""
    task = write_task(tmp_path / "sentiment.jsonl", sentiment())
    plan = lrd.plan(tiny_bert(), ratio=2.0)
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "out"
    assert main(["finetune", "--model", "minilm", "--task", task, "--plan", str(tmp_path / "plan.json"),
                 "--max-steps", "1", "--train-batch-size", "8", "--no-progress", "-o", str(out)]) == 0
    planned = {row.name: row.rank for row in plan.changed}
    assert f"decomposed {len(planned)} layers by {tmp_path / 'plan.json'}" in capsys.readouterr().out
    saved = json.loads((out / "lrdaccel_config.json").read_text())["plan"]["layers"]
    assert {row["name"]: row["rank"] for row in saved} == {f"encoder.{name}": rank for name, rank in planned.items()}


def test_from_a_full_classifier_with_a_ratio_decomposes_it_and_distils_from_it(tmp_path, tiny_minilm, capsys):
    """The path --distill names: train the classifier whole, then decompose it and distil from it.
    Before, `--from` with `--ratio` was refused, so --distill with --task distilled a model into
    itself; and `--from` a whole classifier failed after loading (nothing to freeze in turn)."""
    task = write_task(tmp_path / "sentiment.jsonl", sentiment())
    common = ["finetune", "--model", "minilm", "--task", task, "--train-batch-size", "8", "--max-steps", "2",
              "--no-progress"]
    assert main([*common, "-o", str(tmp_path / "full")]) == 0
    assert json.loads((tmp_path / "full" / "lrdaccel_config.json").read_text())["plan"]["layers"] == []
    assert main([*common[:-3], "--epochs", "1", "--no-progress", "--from", str(tmp_path / "full"), "-o",
                 str(tmp_path / "more")]) == 0
    history = json.loads((tmp_path / "more" / "history.json").read_text())
    assert [e["trainable_share"] for e in history["epochs"]] == [1.0]  # nothing decomposed: nothing frozen
    assert main([*common, "--from", str(tmp_path / "full"), "--ratio", "2", "--distill", "-o",
                 str(tmp_path / "small")]) == 0
    assert "decomposed 13 layers at ratio 2.0" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "small" / "lrdaccel_config.json").read_text())["plan"]["layers"]) == 13
    assert main([*common, "--from", str(tmp_path / "small"), "--ratio", "2", "-o", str(tmp_path / "again")]) == 2
    assert capsys.readouterr().err == (f"lrdaccel finetune: error: --from {tmp_path / 'small'} is decomposed already "
                                       f"(13 layers): fine-tune it without --ratio / --plan, or give the classifier "
                                       f"before decomposition\n")
    assert not (tmp_path / "again").exists()


@pytest.mark.skipif(not (WORDNET_DIR / "data.noun").is_file(), reason="Debian's wordnet-base is not installed")
def test_finetune_a_registry_task_by_name(tmp_path, tiny_minilm):
    out = tmp_path / "out"
    assert main(["finetune", "--model", "minilm", "--task", "wordnet-supersense", "--train-limit", "32",
                 "--test-limit", "16", "--train-batch-size", "16", "--epochs", "1", "--no-progress",
                 "-o", str(out)]) == 0
    info = json.loads((out / "classifier.json").read_text())
    assert len(info["classes"]) == 26 and info["task"] == "wordnet-supersense"
    assert json.loads((out / "lrdaccel_config.json").read_text())["plan"]["layers"] == []  # not compressed


@pytest.mark.parametrize("arguments, message", [
    (["--task", "T", "--dataset", "digits"], "give --task or --dataset, not both"),
    (["--task", "T", "--model", "test_cli_finetune:tiny_classifier"], "--task needs a zoo model"),
    (["--task", "T", "--model", "fmnist-cnn"], "needs a token model with a tokenizer"),
    (["--task", "DIR"], "is a directory: give a JSONL file"),
    (["--task", "T", "--ratio", "2", "--plan", "P"], "gives the ranks: leave out --ratio"),
    (["--task", "T", "--ratio", "2", "--min-rank", "4"], "--min-rank applies to --dataset runs"),
    (["--task", "T", "--ratio", "2", "--distill"], "--distill with --task distils from the classifier before"),
    (["--task", "T", "--from", "PLAIN", "--distill"], "give --from DIR (a classifier trained by `finetune --task`) "
                                                    "and --ratio or --plan"),
    (["--task", "T", "--from", "PLAIN"], "--from <PLAIN>: no classifier.json: with --task, give a classifier saved"),
    (["--task", "T", "--from", "DIR"], "<DIR>/lrdaccel_config.json: no lrdaccel config here"),
    (["--task", "fashion-mnist", "--model", "fmnist-cnn", "--max-length", "8"],
     "--max-length 8 applies to a text --task, not to fashion-mnist"),
    (["--task", "T", "--plan", "P"], "P"),  # not a plan file
    (["--task", "T", "--ratio", "1"], "ratio must be a finite number > 1, got 1"),
    (["--task", "T", "--ratio", "0"], "ratio must be a finite number > 1, got 0"),
])
def test_bad_task_runs_exit_2_in_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, arguments, message):
    def unloadable(*_):
        raise AssertionError("the model was loaded before the arguments were checked")

    real = zoo.get
    monkeypatch.setattr(zoo, "get", lambda name: dataclasses.replace(real(name), build=unloadable))
    (tmp_path / "dir").mkdir()
    (tmp_path / "plan.json").write_text("{}")
    lrd.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "plain")  # lrd.save, no classifier.json
    paths = {"T": write_task(tmp_path / "t.jsonl", sentiment()), "DIR": str(tmp_path / "dir"),
             "P": str(tmp_path / "plan.json"), "PLAIN": str(tmp_path / "plain")}
    arguments = [paths.get(a, a) for a in arguments]
    message = paths.get(message, message)
    for name in ("DIR", "PLAIN"):
        message = message.replace(f"<{name}>", paths[name])
    model = [] if "--model" in arguments else ["--model", "minilm"]
    code = main(["finetune", *model, *arguments, "--no-progress", "-o", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2 and message in error and error.count("\n") == 1, error
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_export_makes_onnx_of_the_saved_classifier(tmp_path, tiny_minilm, capsys):
    pytest.importorskip("onnxruntime")
    task = write_task(tmp_path / "sentiment.jsonl", sentiment())
    out = tmp_path / "out"
    assert main(["finetune", "--model", "minilm", "--task", task, "--ratio", "2", "--max-steps", "1",
                 "--train-batch-size", "8", "--no-progress", "-o", str(out)]) == 0
    capsys.readouterr()
    onnx_file = tmp_path / "model.onnx"
    assert main(["export", "--model", "minilm", "--from", str(out), "--batch-size", "2", "-o", str(onnx_file)]) == 0
    printed = capsys.readouterr().out
    assert "inputs ['input_ids', 'attention_mask']" in printed and "max abs difference" in printed
    assert onnx_file.stat().st_size > 10_000


@pytest.mark.slow
def test_finetune_real_minilm_on_a_jsonl_task(tmp_path):
    """The issue's command on the real MiniLM: compressed, trained one epoch, saved, reloaded."""
    task = write_task(tmp_path / "sentiment.jsonl", sentiment())
    out = tmp_path / "out"
    assert main(["finetune", "--model", "minilm", "--task", task, "--ratio", "2", "--train-batch-size", "8",
                 "--max-length", "16", "--no-progress", "-o", str(out)]) == 0
    spec = zoo.get("minilm")
    data = load_task(task, spec, max_length=16)
    example, _ = data.batch("train", [0, 1])
    model, info = load_classifier(out, spec.build(), example)
    assert info["classes"] == ["negative", "positive"]
    assert sum(isinstance(m, lrd.LowRankModule) for m in model.modules()) == 37  # 6 x 6 Linears + the pooler
    last = json.loads((out / "history.json").read_text())["epochs"][-1]
    accuracy, loss = evaluate(model, data)
    assert accuracy == pytest.approx(last["test_accuracy"], abs=1e-9)
    assert loss == pytest.approx(last["test_loss"], rel=1e-4)
