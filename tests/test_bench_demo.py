"""`lrdaccel demo` on a small slice: well-formed results, and the saved model is the one reported."""

import json

import pytest

import lrdaccel as lrd
from lrdaccel import zoo
from lrdaccel.bench.demo_pipeline import DemoConfig, keep_input_layer
from lrdaccel.bench.schema import load_results
from lrdaccel.data import standardized_splits
from lrdaccel.training.evaluate import accuracy
from lrdaccel.cli import main


@pytest.mark.slow
def test_demo_on_a_small_slice(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--dataset", "mnist5k", "--limit", "128", "--batch-size", "32",
            "--timing-cache", str(tmp_path / "cache.json"), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    results = load_results(out / "results.json")  # the schema check
    assert results["dataset"] == {"name": "mnist5k", "train_size": 128, "test_size": 128}
    assert results["config"]["quick"] and results["config"]["finetune_epochs"] == 2
    decomposed, original = results["decomposed"], results["original"]
    # the race: both fine-tuned the same steps, evaluated before and twice along the way (quick)
    steps = [point["step"] for point in decomposed["history"]]
    assert steps == [point["step"] for point in original["history"]] == [0, 4, 8]
    assert decomposed["accuracy"] == decomposed["history"][-1]["accuracy"]
    assert original["accuracy"] == original["history"][-1]["accuracy"]
    assert decomposed["accuracy_before_finetune"] == decomposed["history"][0]["accuracy"]
    # the pretraining is not evaluated: the race's first evaluation, of that very model, gives its accuracy
    assert original["history"][0]["accuracy"] == results["pretrained"]["accuracy"]
    assert [set(epoch) for epoch in results["pretrained"]["history"]] == [{"epoch", "loss", "seconds"}]
    race = json.loads((out / "race" / "results.json").read_text())
    assert [row["name"] for row in race["variants"]] == ["original", "lrd(plan=plan.json)"]
    # one inference batch across the demo: the throughput rows and the race's inference speed-up
    assert race["config"]["infer_batch_size"] == results["throughput"]["batch_size"] == 32
    assert race["config"]["eval_batch_size"] == 32  # evaluated in training-size batches, not 512
    assert race["config"]["evaluations"] == results["config"]["evaluations"] == 2
    assert [row["lr_multiplier"] for row in results["race"]["variants"]] == [
        row["lr_multiplier"] for row in race["variants"]] == [1.0, 1.0]  # lrd at the race's rate (lrd.race's default)
    assert results["race"]["lr"] == race["config"]["lr"]
    seed = race["seeds"][0]["variants"]
    assert seed[0]["data_order_digest"] == seed[1]["data_order_digest"]
    target = results["race"]["target_accuracy"]  # none where the original ends at or below chance (lrd.race)
    assert target is None if race["no_target"] else target == pytest.approx(original["accuracy"] - 0.005)
    assert results["ratios"]["params"] == decomposed["params"] / results["original"]["params"]
    assert {row["name"] for row in decomposed["layers"]} >= {"stem.0", "classifier"}
    assert next(r for r in decomposed["layers"] if r["name"] == "stem.0")["reason"] == "rejected by filter_fn"

    # The saved model is the fine-tuned one: loaded into a fresh CNN it scores the reported accuracy.
    _, test = standardized_splits("mnist5k", 128, 128)
    model = lrd.load(out / "model", zoo.get("fmnist-cnn").build())
    assert accuracy(model, test, progress=False) == pytest.approx(decomposed["accuracy"], abs=1e-12)
    plan = lrd.Plan.load(out / "plan.json")
    assert [row.name for row in plan.decomposed] == [r["name"] for r in decomposed["layers"] if r["kind"] != "keep"]
    if plan.decomposed:  # rank optimization may keep every layer on a noisy machine; then no freezing
        assert race["variants"][1]["options"]["freeze"] == "rotate"
        assert decomposed["params"] < results["original"]["params"]

    # every stage's wall and CPU seconds, in running order; the race's and the throughput's split in parts
    names = [name.split(". ", 1)[1] for name in results["stages"]]
    assert [name.split(" ")[0] for name in names] == ["load", "train", "optimize", "race:", "throughput"]
    assert results["stages"].keys() == results["stage_cpu_seconds"].keys()
    for stage, parts in results["stage_parts"].items():
        assert stage.split(". ", 1)[1].split(" ")[0] in ("race:", "throughput")
        assert sum(seconds for _, seconds in parts) == pytest.approx(results["stages"][stage], abs=0.02)
    race_parts = next(parts for stage, parts in results["stage_parts"].items() if "race" in stage)
    assert race_parts[0][1] == pytest.approx(sum(row["train_seconds"] for row in race["variants"]), abs=0.01)
    assert "3 evaluations of each model on the 128 test images" in race_parts[1][0]
    assert results["total_seconds"]["wall"] >= sum(results["stages"].values())

    printed = capsys.readouterr().out
    assert (out / "report.md").read_text() in printed
    assert (out / "report.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((tmp_path / "cache.json").read_text())


@pytest.mark.slow
def test_demo_without_rank_optimization_freezes_every_decomposed_layer(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--dataset", "mnist5k", "--limit", "64", "--batch-size", "32", "--no-optimize",
            "--schedule", "static", "--model", "fmnist-vit", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    results = load_results(out / "results.json")
    layers = results["decomposed"]["layers"]
    # ratio ranks in every encoder layer; the patch projection that reads the 1-channel image is kept
    kept = {r["name"]: r["reason"] for r in layers if r["kind"] == "keep"}
    assert kept["model.vit.embeddings.patch_embeddings.projection"] == "rejected by filter_fn"
    encoder = [r for r in layers if ".layers." in r["name"]]
    assert len(encoder) == 24 and all(r["rank"] == r["ratio_rank"] for r in encoder)
    assert results["throughput"]["decomposed"]["train_phases"] == 1  # static: one phase
    race = json.loads((out / "race" / "results.json").read_text())
    frozen = race["variants"][1]
    assert frozen["options"]["freeze"] == "static"
    assert frozen["trainable_params"] < race["variants"][0]["trainable_params"]


@pytest.mark.parametrize("kwargs, message", [
    ({"dataset": "cifar"}, "dataset"),
    ({"model": "resnet50"}, "model"),
    ({"schedule": "sometimes"}, "schedule"),
    ({"epochs": 0}, "epochs"),
    ({"evaluations": 0}, "evaluations"),
    ({"train_limit": 0}, "train_limit"),
    ({"ratio": 0.5}, "ratio"),
    ({"finetune_lr": 0}, "finetune_lr"),
])
def test_demo_config_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DemoConfig(**kwargs)


def test_default_dataset_falls_back_to_mnist5k(monkeypatch):
    from lrdaccel import data

    monkeypatch.setattr(data, "available", lambda name: False)
    assert DemoConfig().dataset == "mnist5k"
    monkeypatch.setattr(data, "available", lambda name: True)
    assert DemoConfig().dataset == "fashion-mnist"


def test_keep_input_layer_rejects_only_the_layer_reading_the_image():
    model = zoo.get("fmnist-cnn").build()
    plan = lrd.plan(model, ratio=2.0, filter_fn=keep_input_layer(1))
    assert [row.name for row in plan if row.reason == "rejected by filter_fn"] == ["stem.0"]
    assert all(row.decomposed for row in plan if row.name.startswith("blocks."))


def test_int8_throughput_is_inference_only_against_the_int8_original():
    """int8 is a serving runtime (issue 29): its row times both models quantized, inference only;
    before, the demo's training step refused it late."""
    import torch

    from lrdaccel.bench.demo_pipeline import _throughput

    original = zoo.get("fmnist-cnn").build().eval()
    decomposed = zoo.get("fmnist-cnn").build().eval()
    lrd.decompose(decomposed, ratio=2.0)
    config = DemoConfig(runtime="eager", runtimes=["eager", "int8"], repeats=1, min_run_time=0.01, batch_size=8)
    by_runtime, _ = _throughput(original, decomposed, torch.randn(8, 1, 28, 28), config, "rotate", False)
    assert set(by_runtime) == {"eager", "int8"}
    assert "train_ratio" in by_runtime["eager"]
    int8 = by_runtime["int8"]
    assert "train_ratio" not in int8 and "train_items_per_s" not in int8["original"]
    assert int8["infer_ratio"]["median"] > 0
