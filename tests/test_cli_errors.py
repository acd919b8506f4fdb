"""Every user mistake on the command line: exit 2, one line on stderr, no traceback, and (for
output paths) no work started (issue #13, items 5 and 8)."""

import os

import pytest
import torch
from torch import nn

import lrdaccel.cli.bench
import lrdaccel.cli.demo
from lrdaccel.cli import main

CALLS = []


def small_cnn():
    """A factory that records each call: a subcommand that rejects its output path never calls it."""
    CALLS.append(1)
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(),
                         nn.Linear(16 * 28 * 28, 10))


def not_callable():
    pass


NOT_A_FACTORY = 42


def needs_arguments(width):
    return nn.Linear(width, width)


def returns_a_string():
    return "a model"


def raises():
    raise RuntimeError("weights server unreachable")


MODEL = ["--model", f"{__name__}:small_cnn", "--input-shape", "1,28,28", "--batch-size", "2"]


@pytest.fixture
def paths(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    return {"a file": a_file, "inside a file": a_file / "x", "a directory": a_dir}


# (subcommand args with {path}, the kinds of path that are wrong for that output)
OUTPUTS = [
    (["plan", *MODEL, "-o", "{path}"], ("inside a file", "a directory")),
    (["optimize", *MODEL, "--no-cache", "-o", "{path}"], ("inside a file", "a directory")),
    (["optimize", *MODEL, "--no-cache", "--staircase", "{path}"], ("inside a file", "a directory")),
    (["compress", *MODEL, "-o", "{path}"], ("a file", "inside a file")),
    (["finetune", *MODEL, "--ratio", "2", "-o", "{path}"], ("a file", "inside a file")),
    (["finetune", *MODEL, "--ratio", "2", "--checkpoint-dir", "{path}"], ("a file", "inside a file")),
    (["bench", "--quick", "--models", "fmnist-cnn", "--out", "{path}"], ("a file", "inside a file")),
    (["demo", "--quick", "--out", "{path}"], ("a file", "inside a file")),
]


def _one_line_error(capsys, code):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("args, bad_kinds", OUTPUTS, ids=lambda v: " ".join(v[:1]) if isinstance(v, list) else None)
def test_a_bad_output_path_stops_before_any_work(args, bad_kinds, paths, capsys, monkeypatch):
    started = []
    monkeypatch.setattr(lrdaccel.cli.bench, "run_bench", lambda *a, **k: started.append("bench"))
    monkeypatch.setattr(lrdaccel.cli.demo, "run_demo", lambda *a, **k: started.append("demo"))
    for kind in bad_kinds:
        CALLS.clear()
        path = paths[kind]
        line = _one_line_error(capsys, main([a.replace("{path}", str(path)) for a in args]))
        assert str(path) in line, line
        assert not CALLS and not started, f"{kind}: work started"
    assert paths["a file"].read_text() == "not a directory"


@pytest.mark.parametrize("args, message", [
    (["plan", "--model", f"{__name__}:nope", "--input-shape", "1,28,28"], "has no 'nope'"),
    (["plan", "--model", "no_such_module_anywhere:factory", "--input-shape", "1,28,28"], "cannot import"),
    (["plan", "--model", f"{__name__}:NOT_A_FACTORY", "--input-shape", "1,28,28"], "is a int, not a callable"),
    (["plan", "--model", f"{__name__}:needs_arguments", "--input-shape", "1,28,28"], r"needs arguments \['width'\]"),
    (["plan", "--model", f"{__name__}:returns_a_string", "--input-shape", "1,28,28"], "returned a str, not a"),
    (["plan", "--model", f"{__name__}:raises", "--input-shape", "1,28,28"], "raised RuntimeError: weights server"),
    (["plan", "--model", "not-a-zoo-model"], "unknown model 'not-a-zoo-model'"),
    (["compress", *MODEL[:2], "--input-shape", "3,28,28", "-o", "{tmp}/o"], "--input-shape 3,28,28"),
    (["optimize", *MODEL, "--device", "cuda"], "CUDA is not available"),
    (["plan", *MODEL, "--weights", "{tmp}/missing.safetensors"], "--weights .*missing.safetensors: no such file"),
    (["plan", *MODEL, "--weights", "{tmp}/garbage.safetensors"], "not a readable safetensors file"),
    (["plan", *MODEL, "--batch-size", "-3"], "--batch-size: expected a positive int, got -3"),
    (["plan", *MODEL, "--min-rank", "0"], "min_rank must be an int >= 1, got 0"),
    (["plan", *MODEL, "--ratio", "0.5"], "ratio must be a finite number > 1"),
    (["optimize", *MODEL, "--check-rounds", "-1"], "--check-rounds"),
    (["finetune", *MODEL, "--epochs", "0"], "epochs must be an int >= 1"),
    (["finetune", *MODEL, "--freeze", "rotate"], "--freeze rotate needs a decomposed model"),
    (["bench", "--repeats", "0", "--quick"], "repeats must be an int >= 1"),
    (["demo", "--quick", "--limit", "0"], "--limit: expected a positive int"),
])
def test_user_errors_are_one_line(args, message, tmp_path, capsys):
    import re

    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    code = main([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert re.search(message, _one_line_error(capsys, code))


def test_a_factory_module_in_the_current_directory_is_found(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_models_for_cli.py").write_text(
        "import torch.nn as nn\n\ndef build():\n    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", os.getcwd())])
    assert main(["plan", "--model", "my_models_for_cli:build", "--input-shape", "64"]) == 0
    assert "1/2 layers decomposed" in capsys.readouterr().out
