"""`lrdaccel race`: a real run on a user's JSONL task, and one-line errors before any work."""

import json

import pytest

from lrdaccel.cli import main

GOOD = "a fine, well made and moving film that I enjoyed"
BAD = "a dull, badly made film that bored everyone in the room"


def write_task(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def sentiment(n: int = 48):
    rows = []
    for i in range(n):
        label = "positive" if i % 2 else "negative"
        rows.append({"text": f"{GOOD if i % 2 else BAD} number {i}", "label": label,
                     "split": "eval" if i % 6 == 0 else "train"})
    return rows


@pytest.mark.slow
def test_a_short_race_on_a_user_jsonl_task(tmp_path, capsys):
    task = write_task(tmp_path / "sentiment.jsonl", sentiment())
    out = tmp_path / "race"
    code = main(["race", "--model", "minilm", "--task", task, "--variants", "original,lrd(method=svd)",
                 "--max-steps", "3", "--batch-size", "8", "--evaluations", "1", "--infer-repeats", "1",
                 "--calibration-batches", "2", "--out", str(out), "--no-progress", "--threads", "1"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["format"] == "lrdaccel.race" and results["task"] == task
    assert results["classes"] == ["negative", "positive"] and results["eval_items"] == 8
    assert [row["name"] for row in results["variants"]] == ["original", "lrd(method=svd)"]
    assert results["variants"][1]["params"] < 1
    assert (out / "report.md").is_file() and (out / "race.png").stat().st_size > 1000
    assert "original: final" in capsys.readouterr().out


@pytest.mark.parametrize("arguments, message", [
    (["--task", "imdb"], "unknown task 'imdb'"),
    (["--variants", "original,lora9"], "unknown variant 'lora9'"),
    (["--variants", "lrd"], "include `original`"),
    (["--budget-epochs", "0"], "budget_epochs must be a finite number > 0, got 0"),
    (["--model", "resnet7"], "unknown model 'resnet7'"),
    (["--model", "fmnist-cnn"], "needs a token model"),
])
def test_bad_races_exit_2_with_one_line_before_any_work(tmp_path, capsys, arguments, message):
    out = tmp_path / "race"
    code = main(["race", "--out", str(out), "--no-progress", *arguments])
    error = capsys.readouterr().err
    assert code == 2 and message in error and error.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("rows, message", [
    ([{"label": "x"}] + sentiment(), "line 1: no \"text\""),
    (sentiment() + [{"text": "no label here"}], "line 49: no \"label\""),
    ([{"text": f"t {i}", "label": "same"} for i in range(30)], "at least two labels, found 1"),
])
def test_a_bad_jsonl_task_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, rows, message):
    import dataclasses

    from lrdaccel import zoo

    def unloadable(*_):
        raise AssertionError("the model was loaded before the task was checked")

    real = zoo.get
    monkeypatch.setattr(zoo, "get", lambda name: dataclasses.replace(real(name), build=unloadable))
    task = write_task(tmp_path / "task.jsonl", rows)
    code = main(["race", "--task", task, "--out", str(tmp_path / "race"), "--no-progress"])
    error = capsys.readouterr().err
    assert code == 2 and message in error and task in error
    assert not (tmp_path / "race").exists()


def test_seeds_raced_apart_are_pooled(tmp_path, capsys):
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    import lrdaccel as lrd

    def blobs(n, seed):
        generator = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 3, (n,), generator=generator)
        return TensorDataset(torch.randn(3, 16, generator=torch.Generator().manual_seed(9))[labels] * 3
                             + torch.randn(n, 16, generator=generator), labels)

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    settings = dict(max_steps=3, batch_size=8, lr=1e-2, evaluations=1, infer_repeats=1, calibration_batches=1,
                    freeze_embeddings=False, progress=False)
    for seed in (0, 1):
        lrd.race(model, blobs(48, 0), blobs(16, 1), "original,lrd(method=svd,ratio=1.5)", seed=seed,
                 out=tmp_path / f"s{seed}", **settings)
    lrd.race(model, blobs(48, 0), blobs(16, 1), "original,lrd(method=svd,ratio=1.5)", seed=1,
             out=tmp_path / "other", **{**settings, "lr": 0.5})
    code = main(["race", "--combine", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "both")])
    assert code == 0
    pooled = json.loads((tmp_path / "both" / "results.json").read_text())
    assert [seed["seed"] for seed in pooled["seeds"]] == [0, 1] and pooled["config"]["seeds"] == 2
    finals = [seed["variants"][1]["final_accuracy"] for seed in pooled["seeds"]]
    assert pooled["variants"][1]["final_accuracy"] == pytest.approx(sum(finals) / 2)
    assert (tmp_path / "both" / "report.md").is_file()
    capsys.readouterr()
    for folders, message in (([tmp_path / "s0", tmp_path / "other"], "differ from .* in \\['lr'\\]"),
                             ([tmp_path / "s0", tmp_path / "s0"], "occur twice")):
        code = main(["race", "--combine", *map(str, folders), "--out", str(tmp_path / "bad")])
        error = capsys.readouterr().err
        assert code == 2 and __import__("re").search(message, error)
