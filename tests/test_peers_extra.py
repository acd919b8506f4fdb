"""Without the peers extra every peer fails at once, in one line naming the extra, before any work."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from lrdaccel import peers

MESSAGE = r"needs the peers extra \(.* is not installed\): pip install lrdaccel\[peers\]"


class Untouchable(nn.Module):
    """A model any work on would notice: reading its parameters or copying it fails the test."""

    def parameters(self, recurse=True):
        pytest.fail("work started before the extra was checked")

    def __deepcopy__(self, memo):
        pytest.fail("work started before the extra was checked")


@pytest.mark.parametrize("kind, module", [("prune", "torch_pruning"), ("lora", "peft")])
def test_require_peers_names_the_extra(kind, module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ImportError, match=f"lrdaccel.peers.{kind} {MESSAGE}"):
        peers.require_peers(kind)


def test_the_extra_is_in_the_registry_and_a_missing_one_is_a_one_line_user_error(monkeypatch):
    """lrdaccel._extras knows the peers extra like every other one, and the error is also a
    ValueError: the CLI reports it in one line (exit 2)."""
    from lrdaccel._extras import EXTRAS, MissingDependency, install_hint
    from lrdaccel.peers._extra import MODULES

    assert set(MODULES.values()) <= set(EXTRAS["peers"])
    assert install_hint("torch_pruning") == install_hint("peft") == "pip install lrdaccel[peers]"
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(MissingDependency, match=r"^--peers prune needs the peers extra \(torch-pruning is not "
                                                r"installed\): pip install lrdaccel\[peers\]$") as error:
        peers.require_peers("prune", what="--peers prune")
    assert isinstance(error.value, ValueError)
    assert peers.require_peers("lora") is not None  # pruning's package missing does not stop LoRA


def test_prune_without_torch_pruning_fails_before_any_work(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(ImportError, match=MESSAGE):
        peers.prune(Untouchable(), torch.zeros(1), params_fraction=0.5)


def test_lora_without_peft_fails_before_any_work(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=MESSAGE):
        peers.lora(Untouchable(), ["layer"])


def test_an_unknown_kind_is_a_value_error():
    with pytest.raises(ValueError, match="'quantize'"):
        peers.require_peers("quantize")


def test_importing_lrdaccel_peers_needs_neither_package():
    """The extra is imported inside the functions: the package itself imports without it (in a
    fresh interpreter, so that no test sees a second copy of the package's modules)."""
    code = ("import sys; sys.modules['torch_pruning'] = None; sys.modules['peft'] = None\n"
            "import lrdaccel.peers as p; assert p.prune and p.lora")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=environment)
