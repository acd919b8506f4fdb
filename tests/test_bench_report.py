"""The report generator on fixed results files (tests/data/*.json), and the results checker."""

import copy
import json
from pathlib import Path

import pytest

from lrdaccel.bench.report import render_markdown, write_report
from lrdaccel.bench.schema import check_results, load_results
from lrdaccel.cli import main

DATA = Path(__file__).parent / "data"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def bench():
    return json.loads((DATA / "bench_results.json").read_text())


@pytest.fixture
def demo():
    return json.loads((DATA / "demo_results.json").read_text())


def test_bench_markdown_table(bench):
    text = render_markdown(bench)
    assert "| variant | parameters | MACs | inference throughput | training throughput |" in text
    assert "| original | 1.000x | 1.000x | 1.00x (1.00-1.00) | 1.00x (1.00-1.00) |" in text
    assert "| LRD (ratio ranks) | 0.503x | 0.568x | 1.05x (1.01-1.08) | 1.04x (1.02-1.06) |" in text
    assert "| LRD + both | 0.524x | 0.530x | 1.14x (1.10-1.16) * | 1.30x (1.28-1.33) [6 phases] |" in text
    assert "| LRD + static freezing | 0.503x | 0.568x | 1.05x (1.01-1.08) * | 1.25x (1.22-1.27) |" in text
    assert "Original: 25,557,032 parameters, 4.1G MACs per item, 40.0 items/s inference, 12.0 items/s training." in text
    assert "49 of 54 candidate layers decomposed (53 at ratio ranks), 17 changed, 4 kept" in text
    assert "cpu:Example CPU x2 threads" in text and "2025-01-02T03:04:05+00:00" in text
    assert "| `aten::convolution_backward` | - | - | 700.0 | 420.5 |" in text
    assert "| `aten::mkldnn_convolution` | 300.0 | 240.0 | 310.0 | 250.0 |" in text
    assert "| total of the listed | 340.0 | 281.0 | 1010.0 | 670.5 |" in text


def test_demo_markdown_table(demo):
    text = render_markdown(demo)
    assert "| parameters | 309,162 | 160,000 | 0.518x |" in text
    assert ("| test accuracy after the same fine-tuning | 91.00% | 90.75% (right after decomposition: 75.00%) "
            "| -0.25 points |") in text
    assert "original trained 2 epochs (90.50%)" in text
    assert "| inference throughput (batch 128) | 5,000 img/s | 6,500 img/s | 1.30x (1.25-1.35) |" in text
    assert ("| training throughput (batch 128) | 1,500 img/s | 2,250 img/s (mean over 6 freezing phases) "
            "| 1.50x (1.45-1.55) |") in text
    assert "| original | - | 91.00% | 80 (setup 0) | at the start |" in text  # at the target before any step
    assert "| lrd(plan=plan.json) | - | 90.75% | 58 (setup 2) | 58 s |" in text  # see test_bench_demo_report
    assert "| 235 | 90.80% (40) | 90.00% (30) |" in text
    assert "| blocks.2.conv2 | 77x77 | 64x64 | snapped to the step |" in text
    assert "| classifier | 4 | original | kept: not faster |" in text


@pytest.mark.parametrize("name", ["bench_results.json", "demo_results.json"])
def test_write_report_writes_markdown_and_png(tmp_path, name):
    results = load_results(DATA / name)
    paths = write_report(results, tmp_path / "out")
    assert paths["markdown"].read_text() == render_markdown(results)
    png = paths["plot"].read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


def test_cli_redraws_a_report(tmp_path, capsys):
    assert main(["bench", "--report", str(DATA / "bench_results.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text() in capsys.readouterr().out
    assert (tmp_path / "report.png").read_bytes().startswith(PNG_SIGNATURE)


def test_cli_rejects_a_file_that_is_not_results(tmp_path, capsys):
    bad = tmp_path / "plan.json"
    bad.write_text('{"format": "lrdaccel.plan"}')
    assert main(["bench", "--report", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "not an lrdaccel results file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _broken(results, path, value):
    broken = copy.deepcopy(results)
    target = broken
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return broken


@pytest.mark.parametrize("path, value, message", [
    (("models", 0, "rows", 1, "params"), 0, r"models\[0\].rows\[1\].params: expected a positive integer"),
    (("models", 0, "rows", 2, "infer_ratio", "min"), 1.5, r"rows\[2\].infer_ratio: min <= median <= max"),
    (("models", 0, "rows", 0, "train_ratio", "values"), [1.0, 1.1], r"rows\[0\].train_ratio"),
    (("models", 0, "rows", 3, "label"), KeyError, r"rows\[3\]: missing \['label'\]"),
    (("models",), [], r"models: expected a non-empty list"),
    (("version",), 99, "newer than this lrdaccel reads"),
    (("format",), "lrdaccel.plan", "not an lrdaccel results file"),
])
def test_check_results_names_the_bad_key(bench, path, value, message):
    with pytest.raises(ValueError, match=message):
        check_results(_broken(bench, path, value))


@pytest.mark.parametrize("path, value, message", [
    (("original", "accuracy"), 91.0, r"original.accuracy: expected a fraction"),
    (("ratios", "infer", "values"), [], r"ratios.infer.values"),
    (("decomposed", "layers"), KeyError, r"decomposed: missing \['layers'\]"),
])
def test_check_demo_results(demo, path, value, message):
    with pytest.raises(ValueError, match=message):
        check_results(_broken(demo, path, value))


def test_load_results_errors(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="results.json: not valid JSON"):
        load_results(path)
    with pytest.raises(FileNotFoundError):
        load_results(tmp_path / "missing.json")


def test_bench_with_runtimes_has_a_table_per_runtime_and_the_best_line():
    """A version 2 file: one entry per runtime (onnxruntime without training), our best vs the original's."""
    results = load_results(DATA / "bench_runtimes_results.json")
    text = render_markdown(results)
    for runtime in ("eager", "compile", "onnxruntime"):
        assert f"## fmnist-cnn, {runtime}" in text
    assert "| variant | parameters | MACs | inference throughput |\n" in text  # --no-train: no training column
    best = results["best"][0]["infer"]
    assert (f"| fmnist-cnn | inference | `{best['original']}` ({best['original_items_per_s']['median']:.1f}/s) | "
            f"`{best['ours']}` ({best['ours_items_per_s']['median']:.1f}/s) | ") in text
    assert "| `Conv` |" in text  # ONNX Runtime's own profile, per ONNX operator
    with pytest.raises(ValueError, match=r"best\[0\].infer.ratio"):
        check_results(_broken(results, ("best", 0, "infer", "ratio", "values"), []))
    with pytest.raises(ValueError, match=r"models\[2\].rows\[1\]: missing \['infer_ratio'\]"):
        check_results(_broken(results, ("models", 2, "rows", 1, "infer_ratio"), KeyError))


def test_a_compile_table_names_its_mode_and_where_ranks_were_searched(bench, tmp_path):
    model = bench["models"][0]
    model.update(runtime="compile", compile_mode="reduce-overhead", ranks_searched_in="eager")
    model["plans"]["merged"] = {"candidates": 9, "decomposed": 3, "merged": 6}
    text = render_markdown(bench)
    assert f"## {model['name']}, compile (reduce-overhead)" in text
    assert "ranks searched in `eager`" in text
    assert "Merging: 6 bottlenecks merged into three narrower convs, 3 other layers at ratio ranks." in text
    assert write_report(bench, tmp_path)["plot"].read_bytes().startswith(PNG_SIGNATURE)


def _with_pruning_row(bench):
    """The fixture's first table with a channel pruning row (bench --peers prune), as the bench writes it."""
    results = copy.deepcopy(bench)
    rows = results["models"][0]["rows"]
    row = copy.deepcopy(rows[1])
    row.update(variant="prune", label="channel pruning (torch-pruning) at LRD's parameters", plan="ratio",
               schedule=None, infer_measured_as="prune", params=row["params"] + 1000,
               peer={"kind": "prune", "importance": "magnitude (L2)", "matched_to": "LRD (ratio ranks)",
                     "target_params": row["params"], "params": row["params"] + 1000, "pruning_ratio": 0.3125,
                     "trials": 4, "seconds": 4.3, "kept": {"classifier.1": "its output leaves the model"}})
    rows.append(row)
    return results


def test_a_pruning_row_is_checked_drawn_and_explained(bench, tmp_path):
    results = check_results(_with_pruning_row(bench))
    text = render_markdown(results)
    assert "| channel pruning (torch-pruning) at LRD's parameters | 0.503x |" in text
    assert ("channel pruning (torch-pruning) at LRD's parameters: torch-pruning, magnitude (L2) importance, 31.2% of "
            "every prunable group's channels removed (kept whole: `classifier.1`); 12,851,000 parameters for LRD "
            "(ratio ranks)'s 12,850,000 (+0.0%), found in 4 trials, 4 s.") in text
    assert write_report(results, tmp_path)["plot"].read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match=r"models\[0\].rows\[6\].peer: missing \['target_params'\]"):
        check_results(_broken(results, ("models", 0, "rows", 6, "peer", "target_params"), KeyError))
    with pytest.raises(ValueError, match=r"rows\[6\].peer.pruning_ratio: expected a fraction in \[0, 1\)"):
        check_results(_broken(results, ("models", 0, "rows", 6, "peer", "pruning_ratio"), 1.5))
