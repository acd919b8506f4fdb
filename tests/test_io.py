"""save/load: a round trip in another process, tied weights, and every bad file refused safely."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lrdaccel as lrd
from lrdaccel.io import CONFIG_NAME, WEIGHTS_NAME
from test_planning import Net
from test_decomposition_apply import snapshot, unchanged

ROOT = Path(__file__).resolve().parent


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(3)
    model = Net().eval()
    lrd.decompose(model, lrd.plan(model, ratio=2, ranks={"conv": (20, 30)}))
    lrd.save(model, tmp_path / "out")
    return model, tmp_path / "out"


def test_files_are_ours_and_readable(saved):
    model, out = saved
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["format"] == "lrdaccel.model" and config["lrdaccel_version"] == lrd.__version__
    kinds = {row["name"]: (row["kind"], row["rank"]) for row in config["plan"]["layers"]}
    assert kinds["conv"] == ("tucker2", [20, 30]) and kinds["fc"] == ("svd", 35)
    tensors = load_file(out / WEIGHTS_NAME)
    assert torch.equal(tensors["conv.core.weight"], model.conv.core.weight)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_load_in_another_process_gives_identical_outputs(saved, tmp_path):
    model, out = saved
    x = torch.randn(2, 3, 24, 24)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model(x)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        import lrdaccel as lrd
        from test_planning import Net
        torch.manual_seed(12345)  # different random init: every weight must come from the file
        model = lrd.load({str(out)!r}, Net()).eval()
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_tied_weights_stay_tied(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(40, 64)
            self.proj = nn.Linear(64, 64)
            self.head = nn.Linear(64, 40, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.proj(self.emb(ids)))

    model = Tied()
    lrd.decompose(model, ratio=2)
    assert isinstance(model.proj, lrd.SVDLinear)
    lrd.save(model, tmp_path)
    assert "head.weight" in json.loads((tmp_path / CONFIG_NAME).read_text())["aliases"]
    loaded = lrd.load(tmp_path, Tied())
    assert loaded.head.weight is loaded.emb.weight
    ids = torch.randint(0, 40, (2, 5))
    assert torch.equal(loaded(ids), model(ids))


def _corrupt(out: Path, how: str) -> None:
    weights = out / WEIGHTS_NAME
    config = out / CONFIG_NAME
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    elif how == "foreign_weights":
        weights.write_bytes(b"\x80\x04\x95 this is a pickle, not safetensors")
    elif how == "missing_tensor":
        tensors = load_file(weights)
        del tensors["fc.second.bias"]
        save_file(tensors, weights)
    elif how == "extra_tensor":
        tensors = load_file(weights)
        tensors["fc.extra"] = torch.zeros(3)
        save_file(tensors, weights)
    elif how == "wrong_shape":
        tensors = load_file(weights)
        tensors["fc.first.weight"] = torch.zeros(36, 256)
        save_file(tensors, weights)
    elif how == "foreign_config":
        config.write_text(json.dumps({"architectures": ["BertModel"]}))
    elif how == "not_json":
        config.write_text("\x00\x01garbage")
    elif how == "future_version":
        data = json.loads(config.read_text())
        data["version"] = 42
        config.write_text(json.dumps(data))
    elif how == "no_config":
        config.unlink()


@pytest.mark.parametrize("how,match", [
    ("truncated", "not a readable safetensors file"),
    ("foreign_weights", "not a readable safetensors file"),
    ("missing_tensor", r"missing from file: \['fc.second.bias'\]"),
    ("extra_tensor", r"not in model: \['fc.extra'\]"),
    ("wrong_shape", r"fc.first.weight: file \(36, 256\) vs model \(35, 256\)"),
    ("foreign_config", "not an lrdaccel model config"),
    ("not_json", "not valid JSON"),
    ("future_version", "upgrade lrdaccel"),
    ("no_config", "no lrdaccel config"),
])
def test_bad_files_rejected_and_model_unchanged(saved, how, match):
    _, out = saved
    _corrupt(out, how)
    base = Net()
    snap = snapshot(base)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        lrd.load(out, base)
    assert unchanged(base, snap)


def test_plan_for_another_architecture_rejected(saved):
    _, out = saved
    other = Net()
    other.conv = nn.Conv2d(64, 64, 5, padding=2)
    snap = snapshot(other)
    with pytest.raises(ValueError, match=r"plan row 'conv'.*another architecture"):
        lrd.load(out, other)
    assert unchanged(other, snap)


def test_load_looks_through_wrappers(saved):
    model, out = saved
    base = Net()
    wrapped = nn.DataParallel(base)
    lrd.load(out, wrapped)
    assert isinstance(base.conv, lrd.TuckerConv2d)
    assert torch.equal(base.conv.core.weight, model.conv.core.weight)


def test_loading_into_an_already_decomposed_model_says_so(saved):
    model, out = saved
    with pytest.raises(ValueError, match="already decomposed"):
        lrd.load(out, model)


def _outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("step", ["weights_write", "config_write", "first_replace", "second_replace", "backup"])
def test_a_failure_at_any_write_step_keeps_a_loadable_checkpoint(tmp_path, monkeypatch, step):
    """Overwriting a checkpoint: whatever write fails, the directory holds the old pair or the new
    pair, and it loads (issue #13, item 4)."""
    import lrdaccel._files as files
    import lrdaccel.io as io

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    old, new = Net(), Net()
    lrd.decompose(old, ratio=2.0)
    lrd.decompose(new, ratio=3.0)
    out = tmp_path / "ckpt"
    lrd.save(old, out)

    real_replace, calls = os.replace, []

    def flaky_replace(source, target):
        calls.append(Path(target).name)
        failing = {"first_replace": 2, "second_replace": 4, "backup": 3}.get(step)  # backup/new/backup/new
        if failing is not None and len(calls) == failing:
            raise OSError(f"injected failure at {step}")
        return real_replace(source, target)

    if step == "weights_write":
        monkeypatch.setattr(io, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("injected")))
    elif step == "config_write":
        monkeypatch.setattr(Path, "write_text", lambda *a, **k: (_ for _ in ()).throw(OSError("injected")))
    else:
        monkeypatch.setattr(files.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="injected"):
        lrd.save(new, out)
    monkeypatch.undo()

    loaded = lrd.load(out, Net())
    assert torch.equal(_outputs(loaded, x), _outputs(old, x))  # every failure here happens before the new pair is whole
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temporary left behind
    lrd.save(new, out)  # and the next save works
    assert torch.equal(_outputs(lrd.load(out, Net()), x), _outputs(new, x))


def test_a_directory_mixing_two_saves_is_refused(tmp_path):
    first, second = Net(), Net()
    lrd.decompose(first, ratio=2.0)
    lrd.decompose(second, ratio=2.0)
    lrd.save(first, tmp_path / "a")
    lrd.save(second, tmp_path / "b")
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes((tmp_path / "b" / WEIGHTS_NAME).read_bytes())
    base = Net()
    snap = snapshot(base)
    with pytest.raises(ValueError, match="not the weights file .* was saved with"):
        lrd.load(tmp_path / "a", base)
    assert unchanged(base, snap)


def test_save_into_a_file_path_is_refused_before_writing(tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    model = Net()
    lrd.decompose(model, ratio=2.0)
    with pytest.raises(ValueError, match="is a file"):
        lrd.save(model, target)
    with pytest.raises(ValueError, match="is a file"):
        lrd.save(model, target / "inside")
    assert target.read_text() == "keep me"


class OtherNet(Net):
    """Net's layers and tensors, another forward: loading Net's checkpoint onto it must be refused."""

    def forward(self, x):
        return -super().forward(x)


def test_a_model_of_another_class_is_refused_in_one_line_and_left_unchanged(saved):
    _, out = saved
    base = OtherNet()
    snap = snapshot(base)
    with pytest.raises(ValueError) as error:
        lrd.load(out, base)
    assert str(error.value) == (f"{out / CONFIG_NAME}: model_class is 'Net' but the model given is a "
                                f"'OtherNet'; load it onto a Net")
    assert unchanged(base, snap)


def test_unknown_config_fields_warn_that_a_newer_lrdaccel_wrote_them(saved):
    model, out = saved
    config = json.loads((out / CONFIG_NAME).read_text())
    config.update(quantization="int4", zz_new={"a": 1})
    (out / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.warns(UserWarning) as caught:
        loaded = lrd.load(out, Net())
    assert [str(w.message) for w in caught] == [
        f"{out / CONFIG_NAME}: ignoring unknown model config fields ['quantization', 'zz_new'] "
        f"(written by a newer lrdaccel? upgrade)"]
    assert caught[0].filename == __file__  # the caller's line, not lrdaccel's
    x = torch.randn(2, 3, 24, 24)
    assert torch.equal(_outputs(loaded, x), _outputs(model, x))
