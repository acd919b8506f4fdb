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
def test_a_short_race_on_a_user_jsonl_task_saved_and_loaded_back(tmp_path, capsys):
    import torch

    from lrdaccel import zoo
    from lrdaccel.tasks.saved import load_classifier

    task = write_task(tmp_path / "sentiment.jsonl", sentiment())
    out = tmp_path / "race"
    code = main(["race", "--model", "minilm", "--task", task, "--variants", "original,lrd(method=svd)",
                 "--max-steps", "3", "--batch-size", "8", "--evaluations", "1", "--infer-repeats", "1",
                 "--calibration-batches", "2", "--out", str(out), "--no-progress", "--threads", "1", "--save"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["format"] == "lrdaccel.race" and results["task"] == task
    assert results["classes"] == ["negative", "positive"] and results["eval_items"] == 8
    assert results["data"] == {"train_limit": None, "eval_limit": None, "max_length": 128, "image_size": 64,
                               "weights": None, "weights_sha256": None}
    assert [row["name"] for row in results["variants"]] == ["original", "lrd(method=svd)"]
    assert results["variants"][1]["params"] < 1
    assert (out / "report.md").is_file() and (out / "race.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert all(row["verdict"] in printed for row in results["variants"])
    # every evaluation text is "negative" (even lines): chance is 100%, so there is nothing to reach
    assert results["chance_accuracy"] == 100.0 and results["target_accuracy"] is None
    assert "no target: the best original's final accuracy" in printed
    spec = zoo.get("minilm")
    rows = [{"text": r["text"], "label": r["label"]} for r in sentiment() if r["split"] == "eval"]
    tokens = spec.tokenizer()([r["text"] for r in rows], padding=True, truncation=True, max_length=128,
                              return_tensors="pt")
    labels = torch.tensor([["negative", "positive"].index(r["label"]) for r in rows])
    for row in results["variants"]:
        # the format `finetune --task` writes: rebuilt from the zoo model alone (as `export --from` does)
        model, info = load_classifier(out / results["saved"][row["name"]], spec.build(), spec.example_inputs(2))
        assert (info["classes"], info["head"], info["model"], info["max_length"]) == (
            ["negative", "positive"], ["head"], "minilm", 128)
        with torch.no_grad():
            logits = model.eval()(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        assert 100.0 * (logits.argmax(-1) == labels).float().mean().item() == pytest.approx(row["final_accuracy"])


@pytest.mark.parametrize("arguments, message", [
    (["--task", "imdb"], "unknown task 'imdb'"),
    (["--variants", "original,lora9"], "unknown variant 'lora9'"),
    (["--variants", "lrd"], "include `original`"),
    (["--budget-epochs", "0"], "budget_epochs must be a finite number > 0, got 0"),
    (["--model", "resnet7"], "unknown model 'resnet7'"),
    (["--model", "fmnist-cnn"], "needs a token model"),
    (["--budget-epochs", "1e308"], "budget_epochs 1e+308 is over 10,000,000 steps however small the data"),
    (["--variants", "original,lrd(ratio=2,ratio=3)"], "option 'ratio' is given twice"),
    (["--variants", "original,prune(params=1)"], "params must be a fraction of the original's parameters in (0, 1)"),
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
    lrd.race(model, blobs(48, 0), blobs(24, 1), "original,lrd(method=svd,ratio=1.5)", seed=1,
             out=tmp_path / "more_eval", **settings)
    for folders, message in (([tmp_path / "s0", tmp_path / "other"], "differ from .* in \\['lr'\\]"),
                             ([tmp_path / "s0", tmp_path / "s0"], "occur twice"),
                             ([tmp_path / "s0", tmp_path / "more_eval"], "other data than .*: eval_items 24 vs 16")):
        code = main(["race", "--combine", *map(str, folders), "--out", str(tmp_path / "bad")])
        error = capsys.readouterr().err
        assert code == 2 and __import__("re").search(message, error), error
    before = (tmp_path / "s0" / "results.json").read_bytes()
    code = main(["race", "--combine", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "s0")])
    assert code == 2 and "is one of the folders to pool" in capsys.readouterr().err
    assert (tmp_path / "s0" / "results.json").read_bytes() == before


def test_races_whose_data_settings_differ_are_not_pooled(tmp_path):
    """Issue 30 item 1: --eval-limit 4 and 24 on the same task were pooled into one median."""
    import lrdaccel as lrd
    from lrdaccel.racing.pooling import pool_runs

    runs = _two_seed_runs(tmp_path, lrd)
    runs[0]["data"] = {"train_limit": None, "eval_limit": 4, "max_length": 128, "weights_sha256": None}
    runs[1]["data"] = {"train_limit": None, "eval_limit": 24, "max_length": 128, "weights_sha256": None}
    with pytest.raises(ValueError, match="b.json: it ran on other data than a.json: eval_limit 24 vs 4"):
        pool_runs(runs, ["a.json", "b.json"])
    runs[1]["data"] = dict(runs[0]["data"])
    assert [seed["seed"] for seed in pool_runs(runs, ["a.json", "b.json"])["seeds"]] == [0, 1]


def _two_seed_runs(tmp_path, lrd):
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from lrdaccel.racing.results import load_race

    data = TensorDataset(torch.randn(32, 8, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 2)
    model = nn.Sequential(nn.Linear(8, 2))
    for seed in (0, 1):
        lrd.race(model, data, data, "original", seed=seed, out=tmp_path / f"s{seed}", max_steps=1, batch_size=8,
                 evaluations=1, infer_repeats=1, calibration_batches=1, freeze_embeddings=False, progress=False)
    return [load_race(tmp_path / f"s{seed}" / "results.json") for seed in (0, 1)]


def test_an_interrupted_race_keeps_the_finished_seeds(tmp_path, monkeypatch):
    """Issue 30 item 7: Ctrl-C in seed 1 of 3 threw seed 0 away; now seed 0 is in results.json."""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from lrdaccel.racing import api

    real, calls = api.run_seed, []

    def interrupted_in_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "run_seed", interrupted_in_the_second)
    data = TensorDataset(torch.randn(32, 8, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 2)
    with pytest.raises(api.RaceInterrupted) as stop:
        api.race(nn.Sequential(nn.Linear(8, 2)), data, data, "original", seeds=3, out=tmp_path / "r", max_steps=1,
                 batch_size=8, evaluations=1, infer_repeats=1, calibration_batches=1, progress=False)
    assert (stop.value.finished, stop.value.pending, stop.value.out) == ([0], [1, 2], tmp_path / "r")
    kept = json.loads((tmp_path / "r" / "results.json").read_text())
    assert [seed["seed"] for seed in kept["seeds"]] == [0] and kept["seeds_planned"] == 3
    assert "1 seed(s) of 3 planned (interrupted)" in (tmp_path / "r" / "report.md").read_text()


def test_the_cli_says_where_an_interrupted_race_is_and_exits_130(tmp_path, capsys, monkeypatch):
    from lrdaccel.cli import race as cli_race
    from lrdaccel.racing.api import RaceInterrupted

    def interrupted(*_args, **_kwargs):
        raise RaceInterrupted([0], [1], tmp_path / "r")

    monkeypatch.setattr(cli_race, "race_on_task", interrupted)
    task = write_task(tmp_path / "task.jsonl", sentiment())
    code = main(["race", "--task", task, "--seeds", "2", "--out", str(tmp_path / "r"), "--no-progress"])
    error = capsys.readouterr().err
    assert code == 130 and error.count("\n") == 1
    assert f"seed(s) [0] finished and are in {tmp_path / 'r'}/results.json; race seed(s) [1] with --seed" in error


@pytest.mark.slow
def test_a_pruning_budget_minilm_cannot_reach_is_refused_before_any_variant_is_built(tmp_path, capsys, monkeypatch):
    """Issue 30 item 10: MiniLM's embeddings alone are over half its parameters; prune(params=0.5)
    failed only after every variant before it was built."""
    pytest.importorskip("torch_pruning")
    from lrdaccel.racing import runner

    def unbuilt(spec, *_):
        raise AssertionError(f"{spec.name} was built before the budget was checked")

    monkeypatch.setattr(runner, "build_variant", unbuilt)
    task = write_task(tmp_path / "sentiment.jsonl", sentiment())
    code = main(["race", "--task", task, "--variants", "original,lrd,prune(params=0.5)", "--max-steps", "1",
                 "--batch-size", "8", "--out", str(tmp_path / "race"), "--no-progress", "--threads", "1"])
    error = capsys.readouterr().err.splitlines()[-1]  # above it: transformers' own weight-loading bar
    assert code == 2 and error.startswith("lrdaccel race: error: variant 'prune(params=0.5)': params=0.5 asks for")
    assert "give params >= 0.576" in error
    assert not (tmp_path / "race").exists()
