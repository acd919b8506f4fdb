"""lrdaccel._extras: an optional package that is absent or broken is one MissingDependency (an
ImportError and a ValueError) saying what needs it and how to install it."""

import sys

import pytest

from lrdaccel._extras import MissingDependency, install_hint, missing, require, require_module


def test_an_absent_package_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert missing("onnx") == "onnxscript"
    with pytest.raises(MissingDependency, match=r"^ONNX export needs onnxscript, which is not installed: "
                                                r"pip install lrdaccel\[onnx\]$") as error:
        require("onnx", "ONNX export")
    assert isinstance(error.value, ImportError) and isinstance(error.value, ValueError)


def test_a_broken_package_is_as_missing_as_an_absent_one(tmp_path, monkeypatch):
    package = tmp_path / "brokenpkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise OSError('libfoo.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingDependency, match=r"x needs brokenpkg, which cannot be imported \(OSError: libfoo.so"):
        require_module("brokenpkg", "x")


def test_hints():
    assert install_hint("sklearn") == "pip install lrdaccel[data]"
    assert install_hint("matplotlib") == "pip install lrdaccel[plot]"
    assert install_hint("mlxtend") == "pip install mlxtend"
    assert missing("data") is None  # installed here (make test installs the data extra)
