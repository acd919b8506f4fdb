"""`lrdaccel optimize` on a tiny model: the plan it writes, what it prints, its errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.cli import build_parser, main


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 1), nn.Flatten(),
                         nn.Linear(32 * 6 * 6, 10))


MODEL = [f"--model={__name__}:tiny_model", "--input-shape=3,6,6", "--batch-size=2", "--min-rank=1"]
FAST = ["--budget-s=0.2", "--min-run-time=0.005", "--check-time=0.005", "--check-rounds=1"]


def test_optimize_writes_a_plan_that_compress_uses(tmp_path, capsys):
    plan_path, png = tmp_path / "plan.json", tmp_path / "stairs.png"
    code = main(["optimize", *MODEL, *FAST, f"--cache={tmp_path / 't.json'}", "-o", str(plan_path),
                 "--staircase", str(png), "--staircase-layer=0", "--staircase-ranks=1:3"])
    out = capsys.readouterr().out
    assert code == 0
    plan = lrd.Plan.load(plan_path)
    assert [row.name for row in plan] == ["0", "2", "4"]
    assert plan.meta["rank_optimization"]["objective"] == "infer"
    assert all(row.time_original_ms is not None for row in plan if row.ratio_rank is not None)
    for text in ("original ms", "whole model, infer", "ratio ranks", "optimized", "staircase of 0"):
        assert text in out
    assert png.read_bytes()[:4] == b"\x89PNG"

    model = tiny_model()
    lrd.decompose(model, plan)
    assert model(torch.randn(2, 3, 6, 6)).shape == (2, 10)

    main(["optimize", *MODEL, *FAST, f"--cache={tmp_path / 't.json'}", "--check-rounds=0"])
    assert "0 timings measured" in capsys.readouterr().out  # the second run reads everything from the cache


def test_optimize_train_paper_rule_without_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = tmp_path / "plan.json"
    code = main(["optimize", *MODEL, *FAST, "--objective=train", "--rule=paper", "--no-cache",
                 "--check-rounds=0", "-o", str(path)])
    assert code == 0
    info = lrd.Plan.load(path).meta["rank_optimization"]
    assert (info["objective"], info["rule"], info["cache_hits"]) == ("train", "paper", 0)
    assert not (tmp_path / "lrdaccel").exists()


@pytest.mark.parametrize("args, message", [
    (["--tradeoff=-1"], "tradeoff must be a finite number >= 0, got -1.0"),
    (["--lowest=2"], "lowest"),
    (["--staircase=x.png", "--staircase-layer=nope"], "nope"),
])
def test_optimize_bad_options_are_clear_errors(args, message, capsys):
    assert main(["optimize", *MODEL, *FAST, "--no-cache", "--check-rounds=0", *args]) == 2
    assert message in capsys.readouterr().err


def test_help_explains_every_option():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["optimize"]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 10, action.dest
    text = sub.format_help()
    for option in ("--objective", "--device", "--dtype", "--cache", "--rule", "--tradeoff", "--max-growth",
                   "--budget-s", "--output", "--staircase"):
        assert option in text


def test_plan_file_is_json(tmp_path):
    path = tmp_path / "plan.json"
    main(["optimize", *MODEL, *FAST, "--no-cache", "--check-rounds=0", "-o", str(path)])
    assert json.loads(path.read_text())["format"] == "lrdaccel.plan"


def test_compile_mode_reaches_the_search_and_the_whole_model_check(tmp_path, monkeypatch, capsys):
    """--compile-mode is SearchSettings.compile_mode: recorded in the plan, and the whole-model
    comparison compiles in the same mode as the search."""
    import lrdaccel.cli.optimize as optimize_cli

    seen = {}
    real = optimize_cli.compare_end_to_end
    monkeypatch.setattr(optimize_cli, "compare_end_to_end",
                        lambda *args, **kwargs: seen.update(kwargs) or real(*args, **kwargs))
    path = tmp_path / "plan.json"
    assert main(["optimize", *MODEL, *FAST, "--no-cache", "--compile-mode=reduce-overhead", "-o", str(path)]) == 0
    assert lrd.Plan.load(path).meta["rank_optimization"]["compile_mode"] == "reduce-overhead"
    assert seen["compile_mode"] == "reduce-overhead"
    assert main(["optimize", *MODEL, "--compile-mode=fastest"]) == 2
    assert "--compile-mode: invalid choice 'fastest'" in capsys.readouterr().err
