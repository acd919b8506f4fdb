"""Module paths that moved in the reorganisation keep working for one release, with a warning."""

import importlib
import sys

import pytest

import lrdaccel as lrd


@pytest.mark.parametrize("path, names", [
    ("lrdaccel.freezing", ("SequentialFreezer", "SCHEDULES", "clean_name")),
    ("lrdaccel.train", ("finetune", "FinetuneConfig", "History", "CHECKPOINT_NAME", "init_distributed")),
    ("lrdaccel.integrations.hf", ("SequentialFreezingCallback",)),
])
def test_old_module_paths_warn_and_still_work(path, names):
    sys.modules.pop(path, None)
    with pytest.warns(DeprecationWarning, match=path.replace(".", r"\.") + " is deprecated"):
        module = importlib.import_module(path)
    for name in names:
        assert hasattr(module, name), f"{path}.{name} is gone"


def test_the_public_verbs_stay_functions_after_importing_their_modules():
    """`lrd.plan` and `lrd.finetune` are functions even after their modules are imported by path
    (the old lrdaccel.plan module shadowed nothing only by import order)."""
    importlib.import_module("lrdaccel.planning.planner")
    importlib.import_module("lrdaccel.training.loop")
    assert callable(lrd.plan) and lrd.plan.__module__ == "lrdaccel.planning.planner"
    assert callable(lrd.finetune) and lrd.finetune.__module__ == "lrdaccel.training.loop"
