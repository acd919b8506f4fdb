"""`lrdaccel finetune`: decompose or load, fine-tune, checkpoint, resume, save; --help covers every option."""

from __future__ import annotations

import json

import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.cli import build_parser, main

FACTORY = "test_cli_finetune:tiny_classifier"


def tiny_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(),
                         nn.Linear(8 * 7 * 7, 24), nn.ReLU(), nn.Linear(24, 10))


COMMON = ["--dataset", "digits", "--train-limit", "96", "--test-limit", "32", "--train-batch-size", "32",
          "--epochs", "2", "--no-progress"]


def test_finetune_decompose_distill_save(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["finetune", "--model", FACTORY, "--ratio", "1.5", "--min-rank", "1", "--distill", "--freeze", "static",
                 "--optimizer", "adamw", "--lr", "1e-3", "-o", str(out), *COMMON])
    assert code == 0
    history = json.loads((out / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [0, 1] and history["completed"]
    assert "test acc" in capsys.readouterr().out
    model = lrd.load(out, tiny_classifier())
    assert sum(isinstance(m, lrd.LowRankModule) for m in model.modules()) == 3


def test_finetune_from_saved_dir_stop_and_resume(tmp_path):
    saved = tmp_path / "compressed"
    model = tiny_classifier()
    lrd.decompose(model, ratio=1.5, min_rank=1)
    lrd.save(model, saved)
    checkpoints = tmp_path / "ckpt"
    args = ["finetune", "--model", FACTORY, "--from", str(saved), "--every-steps", "2",
            "--checkpoint-dir", str(checkpoints), *COMMON]
    assert main([*args, "--max-steps", "4"]) == 0
    state = torch.load(checkpoints / "checkpoint.pt", weights_only=True)
    assert state["position"] == {"epoch": 1, "batch": 1, "global_step": 4}
    assert main([*args, "--resume", "-o", str(tmp_path / "out")]) == 0
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert history["global_step"] == 6 and len(history["epochs"]) == 2


def test_bad_arguments(tmp_path, capsys):
    assert main(["finetune", "--model", FACTORY, "--ratio", "1.5", "--from", str(tmp_path), *COMMON]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["finetune", "--model", FACTORY, "--freeze", "rotate", *COMMON]) == 2  # nothing decomposed
    assert "--freeze rotate needs a decomposed model: give --ratio R" in capsys.readouterr().err
    assert main(["finetune", "--model", FACTORY, "--epochs", "0"]) == 2  # checked by FinetuneConfig
    assert "epochs must be an int >= 1, got 0" in capsys.readouterr().err


def test_help_explains_every_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["finetune"]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"
    text = sub.format_help()
    for option in ("--freeze", "--every-steps", "--distill", "--amp", "--checkpoint-dir", "--resume", "--output"):
        assert option in text


def test_amp_dtype_reaches_the_run(tmp_path, capsys):
    """--amp-dtype float16 is FinetuneConfig.amp_dtype: the run autocasts in float16 with a grad scaler."""
    checkpoints = tmp_path / "ckpt"
    assert main(["finetune", "--model", FACTORY, "--ratio", "1.5", "--min-rank", "1", "--amp", "--amp-dtype",
                 "float16", "--max-steps", "1", "--checkpoint-dir", str(checkpoints), *COMMON]) == 0
    state = torch.load(checkpoints / "checkpoint.pt", weights_only=True)
    assert state["config"]["amp_dtype"] == "float16" and state["scaler"]  # the scaler float16 needs ran
    assert main(["finetune", "--model", FACTORY, "--amp-dtype", "float8", *COMMON]) == 2
    assert "--amp-dtype: invalid choice 'float8' (choose from bfloat16, float16)" in capsys.readouterr().err


def test_amp_dtype_without_amp_is_refused(tmp_path, capsys):
    """0.3.0 ran in float32 without a word: --amp-dtype only chooses the dtype --amp autocasts in."""
    checkpoints = tmp_path / "ckpt"
    code = main(["finetune", "--model", FACTORY, "--ratio", "1.5", "--min-rank", "1", "--amp-dtype", "float16",
                 "--checkpoint-dir", str(checkpoints), *COMMON])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1
    assert "--amp-dtype float16 has no effect without --amp: add --amp to autocast in float16" in error
    assert not checkpoints.exists()  # refused before any work


def test_a_plan_file_decomposes_and_nothing_decomposed_trains_unfrozen(tmp_path, capsys):
    """--plan FILE decomposes by the plan; without --ratio, --plan or --from there is nothing to
    rotate, and the run trains every weight (0.3.0 refused it unless --freeze none was given)."""
    plan = tmp_path / "plan.json"
    lrd.plan(tiny_classifier(), ratio=3.0, min_rank=1).save(plan)
    out = tmp_path / "out"
    assert main(["finetune", "--model", FACTORY, "--plan", str(plan), "--input-shape", "1,28,28", "-o", str(out),
                 *COMMON]) == 0
    saved = json.loads((out / "lrdaccel_config.json").read_text())["plan"]["layers"]
    assert [row["rank"] for row in saved] == [row["rank"] for row in json.loads(plan.read_text())["layers"]
                                              if row["kind"] != "keep"] == [[1, 1], 7, 2]
    assert main(["finetune", "--model", FACTORY, "--plan", str(plan), "--ratio", "2", *COMMON]) == 2
    assert f"--plan {plan} gives the ranks: leave out --ratio" in capsys.readouterr().err
    assert main(["finetune", "--model", FACTORY, "-o", str(tmp_path / "plain"), *COMMON]) == 0
    history = json.loads((tmp_path / "plain" / "history.json").read_text())
    assert [e["trainable_share"] for e in history["epochs"]] == [1.0, 1.0]
    assert main(["finetune", "--model", FACTORY, "--max-length", "64", *COMMON]) == 2
    assert "--max-length 64 applies to a text --task, not to --dataset" in capsys.readouterr().err
