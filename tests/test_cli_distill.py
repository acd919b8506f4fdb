"""`lrdaccel distill`: decompose or load, distil on unlabeled images or sentences, checkpoint,
resume, save; bad arguments are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.cli import main

FACTORY = "test_cli_distill:tiny_classifier"
COMMON = ["--data", "digits", "--limit", "96", "--eval-limit", "32", "--train-batch-size", "32", "--no-progress"]


def tiny_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(),
                         nn.Linear(8 * 7 * 7, 24), nn.ReLU(), nn.Linear(24, 10))


def test_distill_decomposes_trains_and_saves(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["distill", "--model", FACTORY, "--ratio", "1.5", "--min-rank", "1", "--epochs", "2",
                 "--freeze", "rotate", "--lr", "1e-3", "-o", str(out), *COMMON])
    assert code == 0
    history = json.loads((out / "history.json").read_text())
    assert history["completed"] and [e["epoch"] for e in history["epochs"]] == [0, 1]
    assert all(0 <= e["test_agreement"] <= 1 and e["test_accuracy"] is None for e in history["epochs"])
    assert "test agr" in capsys.readouterr().out
    model = lrd.load(out, tiny_classifier())
    assert sum(isinstance(m, lrd.LowRankModule) for m in model.modules()) == 3


def test_distill_from_saved_dir_stop_and_resume(tmp_path):
    saved = tmp_path / "compressed"
    model = tiny_classifier()
    lrd.decompose(model, ratio=1.5, min_rank=1)
    lrd.save(model, saved)
    checkpoints = tmp_path / "ckpt"
    args = ["distill", "--model", FACTORY, "--from", str(saved), "--checkpoint-dir", str(checkpoints),
            "--epochs", "2", *COMMON]
    assert main([*args, "--max-steps", "4"]) == 0
    state = torch.load(checkpoints / "checkpoint.pt", weights_only=True)
    assert state["format"] == "lrdaccel.distill" and state["position"]["global_step"] == 4
    assert main([*args, "--resume", "-o", str(tmp_path / "out")]) == 0
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert history["global_step"] == 6 and history["completed"]


@pytest.mark.slow
def test_distill_minilm_on_sentences(tmp_path):
    out = tmp_path / "out"
    assert main(["distill", "--model", "minilm", "--ratio", "1.5", "--data", "text", "--limit", "16",
                 "--eval-limit", "8", "--train-batch-size", "8", "--max-steps", "1", "--no-progress",
                 "--checkpoint-dir", str(tmp_path / "c"), "-o", str(out)]) == 0
    history = json.loads((out / "history.json").read_text())
    assert history["global_step"] == 1 and not history["completed"]
    from lrdaccel import zoo

    base = zoo.minilm()
    expected = len(lrd.plan(base, ratio=1.5).decomposed)
    model = lrd.load(out, base)
    assert sum(isinstance(m, lrd.SVDLinear) for m in model.modules()) == expected > 0


def test_bad_arguments(tmp_path, capsys):
    assert main(["distill", "--model", FACTORY, *COMMON]) == 2
    assert "give --from DIR" in capsys.readouterr().err
    assert main(["distill", "--model", FACTORY, "--ratio", "1.5", "--data", "text", *COMMON[2:]]) == 2
    assert "--data text needs --tokenizer" in capsys.readouterr().err
    assert main(["distill", "--model", FACTORY, "--ratio", "1.5", "--loss", "l1"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["distill", "--model", FACTORY, "--ratio", "1.5", "--warmup-steps", "-2", *COMMON]) == 2
    assert "warmup_steps must be an int >= 0" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["distill", "--model", FACTORY, "--ratio", "1.5", "-o", str(tmp_path / "file"), *COMMON]) == 2
    assert "--output" in capsys.readouterr().err


def test_amp_dtype_reaches_the_run(tmp_path, capsys):
    """--amp-dtype float16 is DistillConfig.amp_dtype: the run autocasts in float16 with a grad scaler."""
    checkpoints = tmp_path / "ckpt"
    assert main(["distill", "--model", FACTORY, "--ratio", "1.5", "--min-rank", "1", "--amp", "--amp-dtype",
                 "float16", "--max-steps", "1", "--checkpoint-dir", str(checkpoints), *COMMON]) == 0
    state = torch.load(checkpoints / "checkpoint.pt", weights_only=True)
    assert state["config"]["amp_dtype"] == "float16" and state["scaler"]
    assert main(["distill", "--model", FACTORY, "--ratio", "1.5", "--amp-dtype", "float8", *COMMON]) == 2
    assert "--amp-dtype: invalid choice 'float8' (choose from bfloat16, float16)" in capsys.readouterr().err


def test_amp_dtype_without_amp_and_a_zero_ratio_are_refused_in_one_line(tmp_path, capsys):
    """Before, --amp-dtype without --amp ran in float32 without a word (as finetune did), and
    --ratio 0 was told to "give --from DIR or --ratio R"."""
    checkpoints = tmp_path / "ckpt"
    assert main(["distill", "--model", FACTORY, "--ratio", "1.5", "--amp-dtype", "float16", "--checkpoint-dir",
                 str(checkpoints), *COMMON]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--amp-dtype float16 has no effect without --amp: add --amp" in error
    assert not checkpoints.exists()
    assert main(["distill", "--model", FACTORY, "--ratio", "0", *COMMON]) == 2
    assert capsys.readouterr().err == "lrdaccel distill: error: ratio must be a finite number > 1, got 0.0\n"
