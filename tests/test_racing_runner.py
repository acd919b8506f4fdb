"""race/runner.py and lrd.race: variants in lockstep on the same batches, evaluation outside the
training time, the results' fields, several seeds, and the errors raised before any work."""

import hashlib
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lrdaccel as lrd
from lrdaccel.racing import RaceConfig, race
from lrdaccel.racing import runner
from lrdaccel.tasks.data import TensorData
from lrdaccel.racing.variants import parse_variants

FIELDS = ("name", "params", "final_accuracy", "train_seconds", "curve", "time_to_target_s", "speedup_to_target",
          "infer_speedup")


def blobs(n: int, seed: int, spread: float = 3.0) -> TensorDataset:
    """Four Gaussian blobs in 32 dimensions, their centres `spread` apart: learnable in a few steps
    (at spread 1, not quite: races that need room to improve use it)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=generator)
    centres = torch.randn(4, 32, generator=torch.Generator().manual_seed(99)) * spread
    return TensorDataset(centres[labels] + torch.randn(n, 32, generator=generator), labels)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def data() -> TensorData:
    return TensorData(blobs(96, 0), blobs(40, 1), ["a", "b", "c", "d"])


QUICK = dict(batch_size=16, eval_batch_size=64, lr=1e-2, evaluations=3, calibration_batches=2, infer_repeats=1,
             infer_batch_size=8, freeze_embeddings=False)


class FakeClock:
    """Advances one second per reading; evaluation (patched) advances a thousand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_every_variant_sees_the_same_batches_in_the_same_order():
    specs = parse_variants("original,lrd(method=svd),lrd(method=svd,ratio=3,freeze=rotate,every_steps=2)")
    config = RaceConfig(budget_epochs=2, **QUICK)
    result = runner.run_seed(mlp(), data(), specs, config, seed=3, keep=[], progress=False)
    digests = {row["name"]: row["data_order_digest"] for row in result["variants"]}
    expected = hashlib.sha256()
    for indices in runner._batches(96, 16, result["steps"], 3):
        expected.update(torch.as_tensor(indices, dtype=torch.int64).numpy().tobytes())
    assert set(digests.values()) == {expected.hexdigest()}
    assert result["steps"] == 12
    batches = runner._batches(96, 16, 12, 3)
    assert sorted(i for b in batches[:6] for i in b) == list(range(96))  # each epoch a permutation
    assert batches[:6] != batches[6:] and runner._batches(96, 16, 12, 4) != batches  # fresh per epoch, per seed


def test_evaluation_is_not_training_time(monkeypatch):
    """With a clock that advances one second per reading, each training step costs exactly 1 s,
    the setup 1 s, and the 1000 s every evaluation burns never show up in training time."""
    clock = FakeClock()
    real = runner.evaluate

    def slow_evaluate(*args, **kwargs):
        clock.now += 1000.0
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate", slow_evaluate)
    config = RaceConfig(max_steps=5, **QUICK)
    result = runner.run_seed(mlp(), data(), parse_variants("original,lrd(method=svd)"), config, seed=0, keep=[],
                             progress=False, clock=clock)
    for row in result["variants"]:
        assert row["setup_seconds"] == 1.0
        assert row["train_seconds"] == 1.0 + 5
        assert [point[0] for point in row["curve"]] == [1.0, 3.0, 4.0, 6.0]  # steps 0, 2, 3, 5
        assert [point[1] for point in row["curve"]] == [0, 2, 3, 5]


def test_results_hold_every_field_and_the_lrd_variant_is_smaller(tmp_path):
    results = race(mlp(), blobs(96, 0), blobs(40, 1), "lrd(method=svd,ratio=2),original", out=tmp_path / "r",
                   progress=False, **QUICK, max_steps=6)
    assert [row["name"] for row in results["variants"]] == ["original", "lrd(method=svd,ratio=2)"]  # original first
    original, decomposed = results["variants"]
    for row in results["variants"]:
        assert all(key in row for key in FIELDS)
        assert all(len(point) == 3 for point in row["curve"]) and row["curve"][0][1] == 0
        assert 0 <= row["final_accuracy"] <= 100
    assert original["params"] == 1.0 and original["speedup_to_target"] == 1.0
    assert decomposed["params"] < 1.0
    assert decomposed["param_count"] == sum(p.numel() for p in _decomposed_like(ratio=2).parameters())
    assert results["target_accuracy"] == pytest.approx(original["final_accuracy"] - 0.5)
    assert original["time_to_target_s"] <= original["train_seconds"]
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"results.json", "report.md", "race.png"}
    report = (tmp_path / "r" / "report.md").read_text()
    assert "| lrd(method=svd,ratio=2) | 1 |" in report and f"{results['target_accuracy']:.2f}%" in report
    assert results["reference"] == "original" and [r["lr_multiplier"] for r in results["variants"]] == [1.0, 1.0]
    assert report.splitlines()[2:4] == [f"- {row['verdict']}" for row in results["variants"]]
    assert "embeddings" not in report  # no nn.Embedding in this model: nothing said of them


def _decomposed_like(ratio: float) -> nn.Module:
    model = mlp()
    lrd.decompose(model, ratio=ratio)
    return model


def test_the_starting_model_is_not_changed():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    race(model, blobs(96, 0), blobs(40, 1), "original,lrd(method=svd,freeze=static)", progress=False, **QUICK,
         max_steps=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m) in (nn.Linear, nn.ReLU, nn.Sequential) for m in model.modules())


def test_several_seeds_give_medians_and_per_seed_runs():
    results = race(mlp(), blobs(96, 0), blobs(40, 1), "original,lrd(method=svd)", progress=False, **QUICK,
                   max_steps=4, seeds=3, seed=5)
    assert [seed["seed"] for seed in results["seeds"]] == [5, 6, 7]
    row = results["variants"][1]
    finals = [seed["variants"][1]["final_accuracy"] for seed in results["seeds"]]
    assert row["final_accuracy"] == sorted(finals)[1]
    assert row["spread"]["final_accuracy"]["values"] == finals
    assert len(row["curve"]) == len(results["seeds"][0]["variants"][1]["curve"])


def test_a_diverging_variant_stops_and_is_reported():
    results = race(mlp(), blobs(96, 0), blobs(40, 1), "original,original(lr=1e30)", progress=False,
                   **{**QUICK, "lr": 1.0}, max_steps=6, lr_schedule="constant", warmup=0)
    diverged = results["seeds"][0]["variants"][1]
    assert diverged["diverged_at_step"] is not None
    assert results["seeds"][0]["variants"][0]["diverged_at_step"] is None


def test_kd_distils_from_the_starting_model():
    results = race(mlp(), blobs(96, 0), blobs(40, 1), "original,lrd(method=svd,kd=0.5)", progress=False, **QUICK,
                   max_steps=3)
    assert results["variants"][1]["final_accuracy"] >= 0


@pytest.mark.parametrize("variants, settings, message", [
    ("lrd", {}, "include `original`"),
    ("original,original", {}, "given twice"),
    ("original,lrd(ratio=1)", {}, "ratio"),
    ("original,pruning", {}, "unknown variant 'pruning'"),
    ("original", {"budget_epochs": 0}, "budget_epochs must be a finite number > 0, got 0"),
    ("original", {"seeds": 0}, "seeds"),
    ("original", {"budget_epochs": 1e308}, "budget_epochs 1e\\+308 is over 10,000,000 steps"),
    ("original", {"budget_epochs": 2e6, "batch_size": 1}, "is 1.92e\\+08 steps of batch 1 on 96 items"),
])
def test_bad_races_fail_before_any_work(variants, settings, message):
    model = mlp()
    with pytest.raises(ValueError, match=message):
        race(model, blobs(96, 0), blobs(40, 1), variants, progress=False, **settings)


def test_empty_data_and_a_single_class_are_refused():
    one_class = TensorDataset(torch.randn(8, 32), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="at least two classes"):
        race(mlp(), one_class, one_class, "original", progress=False)
    empty = TensorDataset(torch.randn(0, 32), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="train data is empty"):
        race(mlp(), empty, blobs(8, 1), "original", progress=False)


def test_learning_rate_schedules():
    linear = runner.lr_factor("linear", 100, 0.1)
    assert linear(0) == pytest.approx(0.1) and linear(9) == pytest.approx(1.0) and linear(10) == pytest.approx(1.0)
    assert linear(55) == pytest.approx(0.5) and linear(100) == 0.0
    cosine = runner.lr_factor("cosine", 100, 0.0)
    assert cosine(0) == 1.0 and cosine(50) == pytest.approx(0.5) and math.isclose(cosine(100), 0.0, abs_tol=1e-12)
    assert runner.lr_factor("constant", 100, 0.0)(99) == 1.0


def test_peers_race_beside_lrd_at_its_parameters():
    results = race(mlp(), blobs(96, 0), blobs(40, 1), "original,lrd(method=svd),prune,lora(rank=2)",
                   progress=False, **QUICK, max_steps=3)
    original, decomposed, pruned, adapted = results["variants"]
    assert abs(pruned["param_count"] - decomposed["param_count"]) <= 0.02 * decomposed["param_count"]
    assert adapted["params"] == 1.0  # served merged: the original's architecture
    assert adapted["trainable_params"] < original["trainable_params"] / 4
    assert all(key in row for row in results["variants"] for key in FIELDS)


def test_a_plan_made_beforehand_and_the_trained_models_handed_back(tmp_path):
    model = mlp()
    plan = lrd.plan(model, ranks={"0": 8, "2": 16})
    plan.save(tmp_path / "plan.json")
    trained = {}
    results = race(model, blobs(96, 0), blobs(40, 1), parse_variants(f"original,lrd(plan='{tmp_path / 'plan.json'}'"
                   f",method=svd)"), progress=False, trained=trained, **QUICK, max_steps=2)
    name = results["variants"][1]["name"]
    assert results["variants"][1]["notes"]["ranks"] == {"0": 8, "2": 16}
    assert set(trained) == {"original", name} and trained[name][0].rank == 8 and not trained[name].training
    with pytest.raises(ValueError, match="plan= gives the ranks; \\['ratio'\\] would plan them again"):
        parse_variants(f"original,lrd(plan='{tmp_path / 'plan.json'}',ratio=3)")
    with pytest.raises(FileNotFoundError):
        parse_variants("original,lrd(plan='nowhere.json')")


def test_the_narrow_form_races_as_an_lrd_variant():
    """lrd(form=narrow): the MLP's two hidden widths shrink (ordinary, narrower Linears), refitted on
    the race's calibration batches, and train like any other variant."""
    trained = {}
    results = race(mlp(), blobs(96, 0), blobs(40, 1), "original,lrd(form=narrow)", progress=False, trained=trained,
                   **QUICK, max_steps=2)
    narrow = trained["lrd(form=narrow)"]
    assert [type(layer).__name__ for layer in narrow] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert narrow[0].out_features == 32 and narrow[2].in_features == 32  # ratio 2 of the 64-wide pair
    assert results["variants"][1]["notes"]["decomposed_layers"] >= 1
    assert results["variants"][1]["params"] < 1.0


def test_without_matplotlib_the_report_says_the_plot_was_not_drawn(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    race(mlp(), blobs(96, 0), blobs(40, 1), "original", out=tmp_path / "r", progress=False, **QUICK, max_steps=1)
    assert not (tmp_path / "r" / "race.png").exists()
    assert "race.png was not drawn: it needs matplotlib" in (tmp_path / "r" / "report.md").read_text()


def test_a_race_from_a_trained_original_gives_no_speedup_and_says_at_start(tmp_path):
    """Decompose-and-recover races start from a model already at the target: no speed-up is given
    (each would read 0.00x), the reference's row says "at start" and the report says why; a race
    from an untrained head says nothing of it."""
    trained = mlp()
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-2)
    inputs, labels = blobs(96, 0).tensors
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.cross_entropy(trained(inputs), labels).backward()
        optimizer.step()
    results = race(trained, blobs(96, 0), blobs(40, 1), "original,lrd(method=svd,ratio=3)", out=tmp_path / "r",
                   progress=False, **{**QUICK, "lr": 1e-4}, max_steps=2)
    original = results["variants"][0]
    assert original["curve"][0][2] >= results["target_accuracy"] and results["reference_at_start"]
    assert [row["speedup_to_target"] for row in results["variants"]] == [None, None]
    report = (tmp_path / "r" / "report.md").read_text()
    assert "| original | 1 | 1.000x |" in report and "| at start | - |" in report and "0.00x" not in report
    assert "original is at the target at its first evaluation, before any step" in report
    assert "Budget 2 steps of batch 16 (0.333 epoch(s) of 96 items; max_steps 2 cut the 1-epoch budget)" in report
    untrained = race(mlp(), blobs(96, 0), blobs(40, 1), "original", out=tmp_path / "u", progress=False, **QUICK,
                     max_steps=2)
    assert untrained["variants"][0]["curve"][0][2] < untrained["target_accuracy"]
    assert not untrained["reference_at_start"] and untrained["variants"][0]["speedup_to_target"] == 1.0
    assert "at its first evaluation" not in (tmp_path / "u" / "report.md").read_text()


class Bag(nn.Module):
    """Token ids -> mean of their embeddings -> logits: a model with an nn.Embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


def test_the_report_speaks_of_embeddings_only_where_the_model_has_them(tmp_path):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (48, 5), generator=generator)
    tokens = TensorDataset(ids, (ids[:, 0] < 10).long())
    torch.manual_seed(0)
    race(Bag(), tokens, tokens, "original", out=tmp_path / "r", **{**QUICK, "freeze_embeddings": True}, max_steps=1,
         progress=False)
    assert "embeddings frozen in every variant" in (tmp_path / "r" / "report.md").read_text()


def test_progress_shows_every_variant_by_its_full_name(capsys):
    name = "lrd(method=svd,ratio=1.5,freeze=static,every_steps=1)"
    race(mlp(), blobs(96, 0), blobs(40, 1), f"original,{name}", progress=True, **QUICK, max_steps=3)
    assert f"{name}=" in capsys.readouterr().err


def test_an_unreachable_pruning_budget_is_refused_before_any_variant_is_built(monkeypatch):
    """Issue 30 item 10: pruning this MLP as far as it goes leaves about 0.05x of its parameters;
    params=0.01 was tried only after the variants before it were built."""
    pytest.importorskip("torch_pruning")
    built = []
    real = runner.build_variant
    monkeypatch.setattr(runner, "build_variant", lambda spec, *a: built.append(spec.name) or real(spec, *a))
    with pytest.raises(ValueError, match=r"variant 'prune\(params=0.01\)': params=0.01 asks for 65 of 6,532 "
                                         r"parameters, .* give params >= 0.0"):
        race(mlp(), blobs(96, 0), blobs(40, 1), "original,lrd(method=svd),prune(params=0.01)", progress=False,
             **QUICK, max_steps=1)
    assert built == []
    results = race(mlp(), blobs(96, 0), blobs(40, 1), "original,prune(params=0.3)", progress=False, **QUICK,
                   max_steps=1)
    assert results["variants"][1]["params"] == pytest.approx(0.3, abs=0.01)


def test_a_race_whose_best_original_is_at_chance_has_no_target(tmp_path):
    """Issue 30 item 6: every evaluation input is the same, so any model answers one label for all
    of them and scores at most chance; no target, no speed-up, and the report says so."""
    labels = torch.arange(40) % 4
    same = TensorDataset(torch.zeros(40, 32), labels)
    results = race(mlp(), blobs(96, 0), same, "original,lrd(method=svd)", out=tmp_path / "r", progress=False,
                   **QUICK, max_steps=2)
    assert results["target_accuracy"] is None and results["chance_accuracy"] == 25.0
    assert "at or below chance (25.00%" in results["no_target"] and results["reference"] is None
    assert all(row["speedup_to_target"] is None and row["time_to_target_s"] is None for row in results["variants"])
    report = (tmp_path / "r" / "report.md").read_text()
    assert "No target: the best original's final accuracy" in report and "already trained" not in report
    assert "| no target | - |" in report and "the best original (no reference: no target)" in report


def test_a_variant_at_a_rate_no_original_trains_at_is_flagged(tmp_path):
    """Issue 27 item 2: lr x2 without `original(lr=2)` beside it mixes the learning rate into the
    comparison; the results and the report say so, and an original at that rate clears it."""
    results = race(mlp(), blobs(96, 0), blobs(40, 1), "original,lrd(method=svd,lr=2)", out=tmp_path / "r",
                   progress=False, **QUICK, max_steps=2)
    assert results["uncontrolled_lr"] == {"lrd(method=svd,lr=2)": 2}
    assert "race `original(lr=2)` beside it" in (tmp_path / "r" / "report.md").read_text()
    controlled = race(mlp(), blobs(96, 0), blobs(40, 1), "original,original(lr=2),lrd(method=svd,lr=2)",
                      progress=False, **QUICK, max_steps=2)
    assert controlled["uncontrolled_lr"] == {}
    assert [row["lr_multiplier"] for row in controlled["variants"]] == [1.0, 2, 2]


def test_train_eval_overlap_and_dropped_texts_are_in_the_results_and_the_report(tmp_path):
    """Issue 30 item 3 (the race's half): a task's overlap (tasks.text.Overlap) and its dropped
    two-label texts are said in results.json and report.md."""
    from lrdaccel.tasks import Overlap

    leaky = data()
    leaky.overlap, leaky.conflicts = Overlap(10, 40), 2
    results = race(mlp(), leaky, None, "original", out=tmp_path / "r", progress=False, **QUICK, max_steps=1)
    assert results["overlap"] == {"count": 10, "eval_items": 40, "share": 0.25} and results["conflicts_dropped"] == 2
    report = (tmp_path / "r" / "report.md").read_text()
    assert "Overlap: 10 of 40 evaluation texts (25.0%) also occur among the training texts" in report
    assert "2 text(s) given two or more labels were dropped" in report
    clean = race(mlp(), data(), None, "original", out=tmp_path / "c", progress=False, **QUICK, max_steps=1)
    assert clean["overlap"] is None and "Overlap" not in (tmp_path / "c" / "report.md").read_text()
