"""benchmarks/peers_pareto.py and benchmarks/starting_models.py: the Pareto fronts, pruning matched
to LRD's parameters, the report drawn from results.json alone, and the trained starting model
(cached, and fed the same standardised inputs as the race's fashion-mnist task)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lrdaccel as lrd
from lrdaccel import data as datasets
from lrdaccel import zoo
from lrdaccel.racing.variants import parse_variants
from lrdaccel.tasks.registry import load_task

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
needs_fmnist = pytest.mark.skipif(not datasets.available("fashion-mnist"), reason="no Fashion-MNIST")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


pareto = _script("peers_pareto")
starting = _script("starting_models")


def test_pareto_front_keeps_the_points_nothing_beats():
    points = [(1.0, 90.0), (1.5, 89.0), (1.2, 88.0), (2.0, 85.0), (2.0, 84.0), (0.9, 90.0)]
    # (1.2, 88) loses to (1.5, 89); (2.0, 84) to (2.0, 85); (0.9, 90) to (1.0, 90): equal accuracy, slower
    assert pareto.pareto_front(points) == [3, 1, 0]


def test_equal_points_do_not_dominate_each_other():
    assert not pareto.dominates((1.0, 90.0), (1.0, 90.0))
    assert pareto.pareto_front([(1.0, 90.0), (1.0, 90.0)]) == [0, 1]


def _point(name, kind, speed, after_build, after_finetune, **options):
    return {"name": name, "kind": kind, "options": options, "params": 0.5, "infer_speedup": speed,
            "infer_speedup_spread": {"min": speed, "median": speed, "max": speed},
            "after_build": after_build, "after_finetune": after_finetune, "setup_seconds": 0.0}


def test_compare_names_the_lrd_points_pruning_beats_at_each_stage():
    points = [_point("original", "original", 1.0, 90, 90),
              _point("lrd(ratio=2)", "lrd", 1.5, 88, 89, ratio=2.0),
              _point("lrd(ratio=3)", "lrd", 1.8, 80, 86, ratio=3.0),
              _point("prune(params=0.3)", "prune", 1.9, 40, 87, importance="magnitude")]
    before, after = (pareto.compare(points, stage) for stage in ("after_build", "after_finetune"))
    assert before["lrd_dominated_by_prune"] == {} and before["lrd_front_on_or_beyond_prune"]
    assert before["prune_dominated_by_lrd"] == {}  # faster, though far less accurate
    assert after["lrd_dominated_by_prune"] == {"lrd(ratio=3)": ["prune(params=0.3)"]}
    assert after["default_lrd_dominated"] is None
    assert not after["lrd_front_on_or_beyond_prune"]
    assert after["front"] == ["prune(params=0.3)", "lrd(ratio=2)", "original"]
    assert pareto.verdict(after, points, "after_finetune") == (
        "lrd(ratio=3) (1.80x, 86.00%) is dominated by prune(params=0.3) (1.90x, 87.00%)")


def test_the_variants_parse_and_match_pruning_to_each_lrd_fraction():
    settings = pareto.TASKS["fmnist-cnn"]
    text = pareto.variants_for(settings, {1.5: 0.66, 2.0: 0.5, 3.0: 0.34})
    specs = {spec.name: spec for spec in parse_variants(text)}
    assert list(specs)[0] == "original"
    assert {s.options["params"] for s in specs.values() if s.kind == "prune"} == {0.66, 0.5, 0.34}
    assert specs["prune(params=0.500,importance=taylor)"].options["importance"] == "taylor"
    assert specs["lrd(ratio=3,optimize=infer)"].options["optimize"] == "infer"
    assert "taylor" not in pareto.variants_for(settings, {1.5: 0.66, 2.0: 0.5, 3.0: 0.34}, taylor=False)


def _blobs(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=generator)
    centres = torch.randn(4, 32, generator=torch.Generator().manual_seed(99)) * 3
    return TensorDataset(centres[labels] + torch.randn(n, 32, generator=generator), labels)


def test_a_race_gives_the_fraction_planned_and_its_report_comes_from_results_json(tmp_path):
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    fractions = pareto.lrd_fractions(model, ["4"], (2.0,))
    variants = f"original,lrd(ratio=2),prune(params={fractions[2.0]:.3f})"
    results = lrd.race(model, _blobs(96, 0), _blobs(40, 1), variants, keep=["4"], out=tmp_path, progress=False,
                       batch_size=16, lr=1e-2, evaluations=2, calibration_batches=2, infer_repeats=2,
                       infer_batch_size=8)
    rows = {row["name"]: row for row in results["variants"]}
    assert rows["lrd(ratio=2)"]["params"] == pytest.approx(fractions[2.0])  # the race plans LRD as we do
    assert rows[f"prune(params={fractions[2.0]:.3f})"]["params"] == pytest.approx(fractions[2.0], abs=0.03)

    report = pareto.write_report(tmp_path, fresh_head=False)
    assert json.loads((tmp_path / "pareto.json").read_text()) == report
    assert (tmp_path / "pareto.png").stat().st_size > 0
    assert "| lrd(ratio=2) | " in (tmp_path / "pareto.md").read_text()
    point = next(p for p in report["points"] if p["name"] == "lrd(ratio=2)")
    assert point["after_build"] == rows["lrd(ratio=2)"]["curve"][0][2]
    assert point["after_finetune"] == rows["lrd(ratio=2)"]["final_accuracy"]
    spread = point["infer_speedup_spread"]
    assert spread["min"] <= point["infer_speedup"] <= spread["max"]
    assert set(report["stages"]) == {"after_build", "after_finetune"}


@needs_fmnist
def test_the_race_task_feeds_the_trained_cnn_the_inputs_it_was_trained_on():
    """standardized_splits and the race's fashion-mnist task standardise by the same statistics."""
    train, test = datasets.standardized_splits("fashion-mnist", train_limit=500, test_limit=50)
    task = load_task("fashion-mnist", zoo.get("fmnist-cnn"), train_limit=500, eval_limit=50)
    for split, dataset in (("train", train), ("eval", test)):
        inputs, labels = task.batch(split, list(range(len(dataset))))
        assert torch.equal(inputs, dataset.tensors[0]) and torch.equal(labels, dataset.tensors[1])


@needs_fmnist
def test_the_starting_cnn_is_trained_once_then_read_back(tmp_path, monkeypatch):
    first = starting.trained_fmnist_cnn(epochs=1, train_limit=256, cache_dir=tmp_path, progress=False)
    path = starting.cache_path(epochs=1, train_limit=256, cache_dir=tmp_path)
    assert path.is_file() and not first.training
    assert 0 <= starting.cached_accuracy(path) <= 100

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of reading the cache")

    monkeypatch.setattr(starting.lrd, "finetune", no_training)
    again = starting.trained_fmnist_cnn(epochs=1, train_limit=256, cache_dir=tmp_path, progress=False)
    for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert starting.cache_path(epochs=2, train_limit=256, cache_dir=tmp_path) != path


def test_a_model_for_other_inputs_is_refused(tmp_path):
    with pytest.raises(ValueError, match="1x28x28"):
        starting.trained_fmnist_cnn("resnet-mini", cache_dir=tmp_path)


def test_the_front_is_drawn_as_the_edge_of_what_it_dominates():
    xs, ys = pareto.front_outline([(2.0, 85.0), (1.0, 90.0)], corner=(0.5, 80.0))
    assert list(zip(xs, ys)) == [(0.5, 90.0), (1.0, 90.0), (1.0, 85.0), (2.0, 85.0), (2.0, 80.0)]
    assert pareto.front_outline([], (0.5, 80.0)) == ([], [])


def test_served_in_int8_the_points_are_the_int8_copies(tmp_path):
    """Issue 29 item 3: --serve int8 races with serve="int8"; each point's accuracy after
    fine-tuning is its int8 copy's, its speed-up against the original in int8."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    results = lrd.race(model, _blobs(96, 0), _blobs(40, 1), "original,lrd(ratio=2)", keep=["4"], out=tmp_path,
                       progress=False, batch_size=16, lr=1e-2, evaluations=2, calibration_batches=2, infer_repeats=2,
                       infer_batch_size=8, serve="int8")
    report = pareto.write_report(tmp_path, fresh_head=False)
    assert report["serve"] == "int8" and report["serve_baseline"] == results["serve_baseline"]
    for point, row in zip(report["points"], results["variants"]):
        assert point["after_finetune"] == row["final_accuracy_served"]
        assert point["after_finetune_float"] == row["final_accuracy"]
        assert point["infer_speedup"] == row["infer_speedup"]
    text = (tmp_path / "pareto.md").read_text()
    assert f"served model over {results['serve_baseline']}," in text
    assert "| accuracy after fine-tuning (int8; float) |" in text
    lrd_point = report["points"][1]
    assert f"| {lrd_point['after_finetune']:.2f}% ({lrd_point['after_finetune_float']:.2f}%) |" in text


def test_serve_int8_reaches_the_race_and_its_own_folder(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(pareto, "run", lambda name, out, **kwargs: seen.update(out=out, **kwargs))
    monkeypatch.setattr(pareto, "write_report", lambda out, fresh_head: None)
    monkeypatch.setattr(pareto.torch, "set_num_threads", lambda threads: None)  # this process's threads stay
    pareto.main(["--task", "minilm", "--quick", "--serve", "int8"])
    assert seen["serve"] == "int8" and seen["out"] == pareto.ROOT / "scratch/pareto_minilm_int8_quick"
    pareto.main(["--task", "minilm"])
    assert seen["serve"] == "eager" and seen["out"] == pareto.ROOT / "results/pareto_minilm"
