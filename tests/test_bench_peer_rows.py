"""The bench's peer rows: which rows `peers` adds, pruned models matched to an LRD plan's
parameters (built once per target), the note where a plan's parameters are the ratio plan's, and
the note where torch-pruning refuses the model."""

import sys

import pytest
import torch

import lrdaccel as lrd
from lrdaccel import peers, zoo
from lrdaccel._extras import MissingDependency
from lrdaccel.bench.config import PEER_VARIANTS, BenchConfig
from lrdaccel.bench.peer_rows import PeerModels
from lrdaccel.measure.counting import count_params
from lrdaccel.measure.steps import Placement

PRUNE, PRUNE_OPT = PEER_VARIANTS


def test_rows_add_pruning_matched_to_each_lrd_plan_the_table_measures():
    def keys(**settings):
        return [v.key for v in BenchConfig(models=["resnet-mini"], peers=["prune"], **settings).rows()]

    assert keys()[-2:] == ["prune", "prune_opt"]
    assert keys(variants=["lrd"]) == ["original", "lrd", "prune"]  # no "+ rank optimization": one row
    assert keys(variants=["lrd_both"]) == ["original", "lrd_opt", "lrd_both", "prune", "prune_opt"]
    assert "prune" not in [v.key for v in BenchConfig(models=["resnet-mini"]).rows()]  # only when asked


@pytest.mark.parametrize("peers_given, message", [
    (["lora"], r"peers: choose among prune, each at most once; got \['lora'\]"),
    (["prune", "prune"], "each at most once"),
    ("prune", "peers: choose among prune"),
])
def test_bad_peers_are_named(peers_given, message):
    with pytest.raises(ValueError, match=message):
        BenchConfig(models=["resnet-mini"], peers=peers_given)


def test_the_config_checks_the_extra_before_any_work(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(MissingDependency, match=r"peers 'prune' needs the peers extra \(torch-pruning is not "
                                                r"installed\): pip install lrdaccel\[peers\]"):
        BenchConfig(models=["resnet-mini"], peers=["prune"])
    BenchConfig(models=["resnet-mini"])  # without peers nothing is needed


def test_pruned_models_match_their_plans_parameters_and_are_built_once():
    spec = zoo.get("resnet-mini")
    torch.manual_seed(0)
    original, inputs = spec.build(), spec.example_inputs(2)
    ratio_plan, smaller_plan = lrd.plan(original, ratio=2.0), lrd.plan(original, ratio=3.0)
    models = PeerModels(original, inputs, Placement(), ratio_plan)

    built = models.build(PRUNE, ratio_plan)
    target = peers.lrd_params(original, ratio_plan)
    assert built.note is None and abs(count_params(built.model) / target - 1) <= 0.02
    assert built.info["target_params"] == target and built.info["params"] == count_params(built.model)
    assert built.info["matched_to"] == "LRD (ratio ranks)" and built.info["importance"] == "magnitude (L2)"
    assert 0 < built.info["pruning_ratio"] < 1 and "classifier.1" in built.info["kept"]
    assert models.build(PRUNE, ratio_plan).model is built.model  # one pruned copy per target, shared by runtimes

    smaller = models.build(PRUNE_OPT, smaller_plan)
    assert abs(count_params(smaller.model) / peers.lrd_params(original, smaller_plan) - 1) <= 0.02
    assert smaller.info["matched_to"] == "LRD + rank optimization"

    same = models.build(PRUNE_OPT, ratio_plan)  # the search left the parameters where they were
    assert same.model is None and "the same as the row at LRD's parameters" in same.note


def test_a_model_torch_pruning_refuses_gets_a_note_not_a_row():
    """GPT-2's Conv1D has no torch-pruning pruner: the row is absent and the note says why."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                                                 n_positions=16))
    inputs = {"input_ids": torch.randint(0, 64, (2, 8))}
    plan = lrd.plan(model, ratio=2.0)
    built = PeerModels(model, inputs, Placement(), plan).build(PRUNE, plan)
    assert built.model is None and built.info is None
    assert built.note.startswith("channel pruning (torch-pruning) at LRD's parameters: n/a, cannot prune "
                                 "GPT2LMHeadModel")
    assert "Conv1D" in built.note and "\n" not in built.note
