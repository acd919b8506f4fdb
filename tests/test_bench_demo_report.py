"""The demo's report on fixed results (tests/data/demo_results.json, a demo from before the race
kept learning-rate multipliers and stage CPU times, and the same with them): no speed-up to the
target where it means nothing, one inference batch stated, every stage's cost."""

import copy
import json
import math
from pathlib import Path

import pytest

from lrdaccel.bench.report import render_markdown

DATA = Path(__file__).parent / "data"


@pytest.fixture
def demo():
    return json.loads((DATA / "demo_results.json").read_text())


def _current(demo):
    """The fixture with the fields a demo records today."""
    results = copy.deepcopy(demo)
    results["race"]["lr"] = 1e-3
    for row, multiplier in zip(results["race"]["variants"], (1.0, 2.0)):
        row["lr_multiplier"] = multiplier
    results["stages"] = {"1. load fashion-mnist": 2.5, "2. train the original (2 epochs)": 95.0,
                         "3. race: both models fine-tune 2 epoch(s) (rotate freezing)": 200.0}
    results["stage_cpu_seconds"] = {"1. load fashion-mnist": 1.25, "2. train the original (2 epochs)": 90.0,
                                    "3. race: both models fine-tune 2 epoch(s) (rotate freezing)": 150.0}
    results["stage_parts"] = {"3. race: both models fine-tune 2 epoch(s) (rotate freezing)": [
        ["training, as the race times it", 138.5], ["the rest: evaluations", 61.5]]}
    results["total_seconds"] = {"wall": 300.25, "cpu": 244.0}
    return results


def test_original_at_the_target_from_the_start_gets_words_not_a_speedup(demo):
    text = render_markdown(demo)
    assert "0.00x" not in text
    assert "| model | lr | test accuracy | training seconds | time to target |\n" in text  # no speed-up column
    assert "| original | - | 91.00% | 80 (setup 0) | at the start |" in text
    assert "| lrd(plan=plan.json) | - | 90.75% | 58 (setup 2) | 58 s |" in text
    assert ("The original is at the target before any fine-tuning (it was trained for this task), so there is no "
            "time of the original's to compare with and no speed-up to the target: what the race shows is how soon "
            "the decomposed model recovers the accuracy (58 s of training, setup included)") in text


def test_speedup_column_where_the_original_needed_training(demo):
    results = _current(demo)
    results["original"]["history"][0]["accuracy"] = 0.80  # below the target (90.50%) before training
    original = results["race"]["variants"][0]
    original["time_to_target_s"], original["speedup_to_target"] = 40.0, 1.0
    decomposed = results["race"]["variants"][1]
    results["decomposed"]["history"][0]["accuracy"] = 0.91  # already there right after decomposition
    decomposed["time_to_target_s"], decomposed["speedup_to_target"] = 1.5, math.inf
    text = render_markdown(results)
    assert "| model | lr | test accuracy | training seconds | time to target | speed-up to target |" in text
    assert "| original | 0.001 (x1) | 91.00% | 80 (setup 0) | 40 s | 1.00x |" in text
    assert ("| lrd(plan=plan.json) | 0.002 (x2) | 90.75% | 58 (setup 2) | at the start "
            "| at the target from the start |") in text
    assert "| inf |" not in text and "The original is at the target before" not in text


def test_one_inference_batch_is_stated(demo):
    text = render_markdown(demo)
    assert ("Every inference figure of the demo, in these rows and the race's inference speed-up "
            "([race/report.md](race/report.md), eager), is timed on batches of 128 images.") in text
    assert "| inference throughput (batch 128) |" in text


def test_stage_table_has_wall_cpu_parts_and_the_whole_run(demo):
    text = render_markdown(_current(demo))
    table = text.split("## Time per stage")[1]
    assert "| stage | wall s | CPU s |" in table
    assert "| 1. load fashion-mnist | 2.5 | 1.2 |" in table
    assert "| 3. race: both models fine-tune 2 epoch(s) (rotate freezing) | 200.0 | 150.0 |" in table
    assert "| &nbsp;&nbsp;of which training, as the race times it | 138.5 |  |" in table
    assert "| &nbsp;&nbsp;of which the rest: evaluations | 61.5 |  |" in table
    assert "| **the whole run** (with saving and counting; until the report) | **300.2** | **244.0** |" in table
    assert "(this process, 2 torch thread(s))" in table
    old = render_markdown(demo).split("## Time per stage")[1]  # a file without CPU times: "-"
    assert "| train the original | 95.0 | - |" in old and "the whole run" not in old


def test_a_race_without_a_target(demo):
    results = _current(demo)
    results["race"]["target_accuracy"] = None  # the original ended at or below chance (lrd.race)
    for row in results["race"]["variants"]:
        row["time_to_target_s"] = row["speedup_to_target"] = None
    text = render_markdown(results)
    assert "No target: the original ends at or below chance." in text
    assert "| model | lr | test accuracy | training seconds | time to target |\n" in text
    assert "| original | 0.001 (x1) | 91.00% | 80 (setup 0) | never |" in text
    assert "The original is at the target before" not in text
