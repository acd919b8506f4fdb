"""Files written through a temporary file get the mode a plain open() would give them
(0o666 & ~umask, or an existing file's own mode), not tempfile's private 0600: a serving process
or a colleague must read them, and a file its owner made private stays private."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel._extras import missing
from lrdaccel._files import atomic_write, replace_together
from lrdaccel.rankopt import TimingCache


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    """Run the test under this umask, restoring the caller's afterwards."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def plain_write_mode(tmp_path: Path) -> int:
    """What open(..., "w") gives under the current umask: the reference."""
    reference = tmp_path / "plain.txt"
    reference.write_text("x")
    return mode(reference)


def test_atomic_write_and_replace_together_give_the_plain_write_mode(tmp_path, umask):
    expected = 0o666 & ~umask
    assert plain_write_mode(tmp_path) == expected
    atomic_write(tmp_path / "deep" / "one.json", lambda tmp: Path(tmp).write_text("{}"))
    pair = {tmp_path / "a.bin": lambda tmp: Path(tmp).write_bytes(b"a"),
            tmp_path / "b.json": lambda tmp: Path(tmp).write_text("{}")}
    replace_together(pair)
    replace_together(pair)  # replacing an existing pair (through backups) too
    written = [tmp_path / "deep" / "one.json", tmp_path / "a.bin", tmp_path / "b.json"]
    assert {path.name: oct(mode(path)) for path in written} == {path.name: oct(expected) for path in written}
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []  # no temporary or backup left behind


@pytest.mark.parametrize("existing", [0o600, 0o640, 0o664])
def test_a_file_written_over_keeps_its_own_mode_as_a_plain_write_does(tmp_path, umask, existing):
    """A results or plan file its owner chmod-ed 0600 became 0644 when lrdaccel wrote it again."""
    reference = tmp_path / "plain.txt"
    reference.write_text("old")
    reference.chmod(existing)
    reference.write_text("new")
    assert mode(reference) == existing  # what a plain write does: the umask applies only to new files
    one, pair = tmp_path / "one.json", {tmp_path / "a.bin": lambda tmp: Path(tmp).write_bytes(b"a")}
    for path in (one, *pair):
        path.write_text("old")
        path.chmod(existing)
    atomic_write(one, lambda tmp: Path(tmp).write_text("new"))
    replace_together(pair)
    assert {p.name: oct(mode(p)) for p in (one, *pair)} == {"one.json": oct(existing), "a.bin": oct(existing)}
    assert one.read_text() == "new" and (tmp_path / "a.bin").read_bytes() == b"a"
    lrd.save(nn.Sequential(nn.Linear(4, 2)), tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.chmod(existing)
    lrd.save(nn.Sequential(nn.Linear(4, 2)), tmp_path / "model")  # safetensors renames its own 0600 temporary
    assert mode(weights) == existing


def test_the_library_s_writers_give_the_plain_write_mode(tmp_path, umask):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    plan = lrd.plan(model, ratio=2.0)
    plan.save(tmp_path / "plan.json")
    cache = TimingCache(tmp_path / "timings.json")
    cache.put("key", 1.0, 0.1)
    cache.save()
    lrd.decompose(model, plan)
    lrd.save(model, tmp_path / "decomposed")
    lrd.peers.save_pruned(nn.Sequential(nn.Linear(16, 4)), tmp_path / "pruned")
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.name != "plain.txt")
    assert len(files) == 6
    expected = oct(plain_write_mode(tmp_path))
    assert {str(p.relative_to(tmp_path)): oct(mode(p)) for p in files} == {
        str(p.relative_to(tmp_path)): expected for p in files}


def test_checkpoints_results_plots_and_onnx_files_give_the_plain_write_mode(tmp_path, umask):
    from lrdaccel.racing.results import write_results
    from lrdaccel.training.checkpoint import write_checkpoint

    write_checkpoint(tmp_path / "checkpoint.pt", {"step": 1})
    write_results({"format": "x"}, tmp_path / "results.json")
    written = ["checkpoint.pt", "results.json"]
    if missing("plot") is None:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
        figure = plt.figure()
        atomic_write(tmp_path / "race.png", lambda tmp: figure.savefig(tmp, format="png"))
        plt.close(figure)
        written.append("race.png")
    if missing("onnx") is None:
        lrd.deploy.export_onnx(nn.Sequential(nn.Linear(4, 2)).eval(), torch.randn(2, 4), tmp_path / "model.onnx")
        written.append("model.onnx")
    expected = oct(plain_write_mode(tmp_path))
    assert {name: oct(mode(tmp_path / name)) for name in written} == {name: expected for name in written}
