"""benchmarks/gpu_check.sh, the one prepared GPU run: its smoke run on the CPU writes every file
the GPU run would, and its tables parse; the summary judges issue 21's targets from the numbers."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrdaccel.bench.schema import load_results

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
MICRO = ("hf-resnet-micro", "hf-vit-micro")
PHASES = ("eager-big", "eager-small", "compile-big")
sys.path.insert(0, str(ROOT / "benchmarks"))


def _env() -> dict:
    return {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "src")}


@pytest.mark.slow
def test_the_smoke_run_writes_every_output_and_its_tables_parse(tmp_path):
    out = tmp_path / "gpu_out"
    done = subprocess.run(["bash", str(SCRIPT), "--smoke", "--out", str(out)], env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("machine.md", "machine.json", "steps.tsv", "summary.md", "summary.json", "tests.xml", "log.txt",
                 "timing_cache.json"):
        assert (out / name).is_file(), name
    with open(out / "steps.tsv", newline="") as handle:
        steps = {row["step"]: row for row in csv.DictReader(handle, delimiter="\t")}
    expected = ["facts", "tests", "race"] + [f"{phase}/{model}" for phase in PHASES for model in MICRO]
    assert sorted(steps) == sorted(expected)
    assert all(steps[name]["status"] == "ok" for name in expected if name != "race")
    assert steps["race"]["status"] in ("ok", "skipped")  # skipped, saying why, where `lrdaccel race` is missing
    if steps["race"]["status"] == "ok":
        assert (out / "race" / "results.json").is_file() and "## Race" in (out / "summary.md").read_text()
    else:
        assert "lrdaccel race --help fails" in steps["race"]["note"]
    assert json.loads((out / "summary.json").read_text())["ok"] is True

    summary = (out / "summary.md").read_text()
    for phase in PHASES:
        for model in MICRO:
            (entry,) = load_results(out / "bench" / f"{phase}-{model}" / "results.json")["models"]
            assert entry["name"] == model and f"`bench/{phase}-{model}`" in summary
            rows = [row["variant"] for row in entry["rows"]]
            assert ("lrd_merge" in rows) == (model == "hf-resnet-micro")  # the ViT has no bottleneck to merge
            if phase == "compile-big":
                assert entry["runtime"] == "compile" and entry["compile_mode"] == "reduce-overhead"
                assert entry["ranks_searched_in"] == "eager" and "train_ratio" not in entry["rows"][0]
            else:
                assert entry["runtime"] == "eager" and len(rows) == (7 if model == "hf-resnet-micro" else 6)
    results = load_results(out / "bench" / "eager-big-hf-resnet-micro" / "results.json")
    assert results["config"]["autocast_bf16"] and results["config"]["channels_last"]
    assert results["config"]["batch_size"] == 4
    assert "no GPU figures" in summary and "targets" not in summary


def test_the_summary_judges_the_targets_from_the_gpu_numbers(tmp_path):
    from gpu_summary import summary

    results = json.loads((ROOT / "tests" / "data" / "bench_results.json").read_text())
    results["config"]["batch_size"] = 256
    model = results["models"][0]
    model.update(runtime="eager", batch_size=256)
    rows = {row["variant"]: row for row in model["rows"]}
    merged = copy.deepcopy(rows["lrd"])
    merged.update(variant="lrd_merge", label="LRD + merging")
    model["rows"].append(merged)
    for row, train, infer in ((rows["lrd_both"], 1.7, 1.2), (merged, 1.5, 1.45)):
        for key, value in (("train_ratio", train), ("infer_ratio", infer)):
            row[key] = {"min": value - 0.01, "median": value, "max": value + 0.01, "values": [value - 0.01, value,
                                                                                               value + 0.01]}
    (tmp_path / "bench" / "eager-big-resnet50").mkdir(parents=True)
    (tmp_path / "bench" / "eager-big-resnet50" / "results.json").write_text(json.dumps(results))
    text, ok = summary(tmp_path, smoke=False)
    assert ok
    assert "| resnet50 eager b256 lrd_both train >= 1.60x | 1.70x (1.69-1.71) | met |" in text
    assert "| resnet50 eager b256 lrd_both infer >= 1.37x | 1.20x (1.19-1.21) | MISSED |" in text
    assert "| resnet50 eager b256 lrd_merge infer >= 1.41x | 1.45x (1.44-1.46) | met |" in text
    assert "| vit-b16 eager b256 lrd_both train >= 1.30x | - | not measured |" in text


def test_the_summary_of_a_race_without_a_target_says_so(tmp_path):
    from gpu_summary import race_lines

    race = {"model": "minilm", "task": "wordnet-supersense", "target_accuracy": None,
            "no_target": "the best original (3.50%) is at or below chance (4.10%)",
            "variants": [{"name": "original", "final_accuracy": 3.5, "time_to_target_s": None,
                          "speedup_to_target": None, "params": 1.0, "infer_speedup": 1.0}]}
    (tmp_path / "race").mkdir()
    (tmp_path / "race" / "results.json").write_text(json.dumps(race))
    text = "\n".join(race_lines(tmp_path))
    assert "no target (the best original (3.50%) is at or below chance (4.10%))" in text
    assert "| original | 3.50% | never | - | 1.000x | 1.00x |" in text


def test_without_a_gpu_the_gpu_run_refuses_and_points_to_the_smoke_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path / "out")], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA GPU here" in done.stderr and "--smoke" in done.stderr
    bad = subprocess.run(["bash", str(SCRIPT), "--fast"], env=_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown option --fast" in bad.stderr


@pytest.fixture(scope="module")
def python_without_torch(tmp_path_factory) -> Path:
    """A real python with no torch: a venv without pip or site packages."""
    venv = tmp_path_factory.mktemp("no_torch") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    return venv / "bin" / "python"


def _without_python_setting() -> dict:
    env = _env()
    del env["PYTHON"]
    return env


def test_a_python_without_torch_is_named_in_one_line_not_blamed_on_cuda(tmp_path, python_without_torch):
    for args in ([], ["--smoke"]):
        done = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path / "out"), *args],
                              env={**_env(), "PYTHON": str(python_without_torch)}, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr == (f"gpu_check.sh: {python_without_torch} has no torch (ModuleNotFoundError: No module "
                               f"named 'torch'); pass --python PATH or set PYTHON to the project's environment "
                               f"(e.g. .venv/bin/python)\n")
    missing = subprocess.run(["bash", str(SCRIPT), "--python", str(tmp_path / "nowhere")], env=_env(),
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.startswith(f"gpu_check.sh: python {tmp_path / 'nowhere'} "
                                                                 f"not found;")
    assert not (tmp_path / "out").exists()


def test_by_default_the_checkout_s_venv_runs_not_python3(tmp_path, python_without_torch):
    checkout = tmp_path / "checkout"
    (checkout / "benchmarks").mkdir(parents=True)
    (checkout / "benchmarks" / "gpu_check.sh").write_text(SCRIPT.read_text())
    (checkout / ".venv").symlink_to(python_without_torch.parents[1])
    done = subprocess.run(["bash", str(checkout / "benchmarks" / "gpu_check.sh")], env=_without_python_setting(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith(f"gpu_check.sh: {checkout}/.venv/bin/python has no torch")
