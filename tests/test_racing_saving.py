"""racing/saving.py: `race(..., save=True)` / `race --save` keeps every trained variant, and what
it keeps loads back with the reported accuracy (issue 27, item 4)."""

import json

import pytest
import torch
from torch.utils.data import TensorDataset

from lrdaccel.racing import race
from lrdaccel.racing.saving import folder_names, load_variant
from test_racing_runner import blobs as runner_blobs, mlp

QUICK = dict(batch_size=16, eval_batch_size=64, lr=1e-2, evaluations=2, calibration_batches=2, infer_repeats=1,
             infer_batch_size=8, freeze_embeddings=False, max_steps=4, progress=False)


def blobs(n: int, seed: int) -> TensorDataset:
    return runner_blobs(n, seed, spread=1.0)


def test_saved_variants_load_back_with_the_reported_accuracy(tmp_path):
    pytest.importorskip("torch_pruning")
    start = mlp()
    names = ["original", "lrd(method=svd,ratio=2)", "prune"]
    results = race(start, blobs(96, 0), blobs(40, 1), ",".join(names), out=tmp_path / "r", save=True, **QUICK)
    saved = json.loads((tmp_path / "r" / "results.json").read_text())["saved"]
    assert saved == {"original": "models/original", "lrd(method=svd,ratio=2)": "models/lrd_method_svd_ratio_2",
                     "prune": "models/prune"}
    inputs, labels = blobs(40, 1).tensors
    for row in results["variants"]:
        model = load_variant(tmp_path / "r" / saved[row["name"]], start)
        with torch.no_grad():
            accuracy = 100.0 * (model(inputs).argmax(-1) == labels).float().mean().item()
        assert accuracy == pytest.approx(row["final_accuracy"])
    assert (tmp_path / "r" / "models" / "prune" / "pruned_config.json").is_file()
    assert (tmp_path / "r" / "models" / "original" / "lrdaccel_config.json").is_file()
    assert "models/lrd_method_svd_ratio_2/" in (tmp_path / "r" / "report.md").read_text()


def test_folder_names_are_safe_and_unique():
    assert folder_names(["lrd(ratio=1.5,freeze=static)", "lrd(ratio=1.5, freeze=static)", "a/b"]) == {
        "lrd(ratio=1.5,freeze=static)": "lrd_ratio_1.5_freeze_static",
        "lrd(ratio=1.5, freeze=static)": "lrd_ratio_1.5_freeze_static_2", "a/b": "a_b"}


def test_save_needs_an_output_folder():
    with pytest.raises(ValueError, match="save=True keeps the trained variants under out/models/: give out"):
        race(mlp(), blobs(96, 0), blobs(40, 1), "original", save=True, **QUICK)
