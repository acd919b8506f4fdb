"""`lrdaccel bench --quick` end to end on the smallest zoo model: well-formed results, exact counts."""

import json
import sys

import pytest
import torch

import lrdaccel as lrd
from lrdaccel import zoo
from lrdaccel.bench.schema import load_results
from lrdaccel.bench.config import VARIANTS
from lrdaccel.cli import build_parser, main
from lrdaccel.bench.paper_table import structural_copy
from lrdaccel.layers.merged import MergedConv2d
from lrdaccel.measure.counting import count_params
from lrdaccel.measure.steps import Placement

TINY = ["--quick", "--models", "fmnist-cnn", "--repeats", "2", "--batch-size", "2", "--min-run-time", "0",
        "--rank-budget", "0.2", "--rank-min-run-time", "0.01"]


@pytest.mark.slow
def test_bench_quick_writes_well_formed_results(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", *TINY, "--timing-cache", str(tmp_path / "cache.json"), "--out", str(out),
                 "--no-progress"]) == 0
    results = load_results(out / "results.json")  # the schema check
    assert results["config"]["quick"] and results["config"]["repeats"] == 2
    (model,) = results["models"]
    rows = {row["variant"]: row for row in model["rows"]}
    assert list(rows) == [v.key for v in VARIANTS if v.key != "lrd_merge"]  # fmnist-cnn has no bottleneck
    assert any("LRD + merging: n/a" in note for note in model["notes"])
    for row in rows.values():
        assert len(row["infer_ratio"]["values"]) == len(row["train_ratio"]["values"]) == 2

    # Parameter counts are exact: the original's, and the ratio plan's savings for the LRD rows.
    original = zoo.get("fmnist-cnn").build()
    plan = lrd.plan(original, ratio=2.0)
    saved = sum(row.params_before - row.params_after for row in plan.decomposed)
    assert rows["original"]["params"] == sum(p.numel() for p in original.parameters())
    for key in ("lrd", "lrd_seq", "lrd_static"):
        assert rows[key]["params"] == rows["original"]["params"] - saved
        assert rows[key]["macs"] < rows["original"]["macs"]
    assert rows["lrd_both"]["params"] == rows["lrd_opt"]["params"]
    assert rows["lrd_opt"]["params"] <= rows["original"]["params"]

    # Freezing rows train over one cycle of their schedule; static is one phase.
    assert rows["lrd_seq"]["train_phases"] == 6 and rows["lrd_static"]["train_phases"] == 1
    assert rows["lrd_seq"]["trainable_params"]["max"] < rows["lrd"]["trainable_params"]["max"]
    assert rows["lrd_seq"]["infer_ratio"] == rows["lrd"]["infer_ratio"]  # same inference graph

    # Evidence for the analysis: the search's per-layer times and the top operators.
    assert [layer["name"] for layer in model["optimized_layers"]] == [row.name for row in plan.decomposed]
    for key in ("original", "lrd_both"):
        for what in ("infer", "train"):
            ops = model["profile"][key][what]
            assert ops and all(op["ms"] > 0 for op in ops)
            assert any("conv" in op["op"] for op in ops)

    report = (out / "report.md").read_text()
    assert report in capsys.readouterr().out
    assert "| LRD (ratio ranks) |" in report and "## fmnist-cnn" in report
    assert (out / "report.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((tmp_path / "cache.json").read_text())  # rank timings were cached there
    assert not (out / "staircase.png").exists()  # --quick leaves the staircase out


def test_help_explains_every_option():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    for command in ("bench", "demo"):
        for action in sub[command]._actions:
            if action.dest != "help":
                assert action.help and "being built" not in action.help, f"{command} {action.option_strings}"


def test_bad_options_fail_cleanly(tmp_path, capsys):
    assert main(["bench", "--models", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["bench", "--quick", "--models", "fmnist-cnn", "--repeats", "0", "--out", str(tmp_path)]) == 2
    assert "repeats must be an int >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_staircase_step_writes_plot_and_data(tmp_path):
    from lrdaccel.bench.config import BenchConfig
    from lrdaccel.bench.paper_table import paper_staircase

    torch.manual_seed(0)
    config = BenchConfig(models=["fmnist-cnn"], batch_size=1, timing_cache="none")
    paths = paper_staircase(tmp_path, config, ranks=[248, 256])
    data = json.loads(paths["data"].read_text())
    assert data["ranks"] == [[248, 248], [256, 256]] and len(data["times_ms"]) == 2
    assert paths["plot"].read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_bench_under_two_runtimes_inference_only(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", *TINY, "--runtimes", "eager,compile", "--no-train", "--no-profile", "--repeats", "1",
                 "--timing-cache", "none", "--out", str(out), "--no-progress"]) == 0
    results = load_results(out / "results.json")
    assert [(m["name"], m["runtime"]) for m in results["models"]] == [("fmnist-cnn", "eager"),
                                                                       ("fmnist-cnn", "compile")]
    for model in results["models"]:
        # no freezing rows without training; ranks optimized for each runtime
        assert [row["variant"] for row in model["rows"]] == ["original", "lrd", "lrd_opt"]
        assert all("train_ratio" not in row for row in model["rows"])
    (best,) = results["best"]
    assert best["infer"]["original"] in ("eager/original", "compile/original")
    assert best["infer"]["ours"].split("/")[1] in ("lrd", "lrd_opt") and "train" not in best


@pytest.mark.slow
def test_merging_row_and_chosen_variants(tmp_path):
    """A bottleneck model gets the "LRD + merging" row at the merged plan's shapes; --variants
    keeps the chosen rows (and the model a chosen freezing row freezes)."""
    out = tmp_path / "bench"
    assert main(["bench", *TINY, "--models", "fmnist-bottleneck", "--variants", "lrd_merge,lrd_both",
                 "--no-profile", "--repeats", "1", "--timing-cache", "none", "--out", str(out), "--no-progress"]) == 0
    (model,) = load_results(out / "results.json")["models"]
    rows = {row["variant"]: row for row in model["rows"]}
    assert list(rows) == ["original", "lrd_opt", "lrd_both", "lrd_merge"]
    spec = zoo.get("fmnist-bottleneck")
    original = spec.build()
    planned = lrd.plan(original, ratio=2.0, merge=True, example_inputs=spec.example_inputs(2))
    assert model["plans"]["merged"]["merged"] == len(planned.merged) == 6
    merged = structural_copy(original, planned, Placement())
    assert rows["lrd_merge"]["params"] == count_params(merged) < rows["original"]["params"] / 2
    assert sum(isinstance(m, MergedConv2d) for m in merged.modules()) == 3 * 6
    assert rows["lrd_merge"]["schedule"] is None and rows["lrd_merge"]["train_phases"] == 1
    assert "| LRD + merging |" in (out / "report.md").read_text()


PEER_RUN = ["--quick", "--models", "resnet-mini", "--peers", "prune", "--variants", "lrd_opt", "--repeats", "1",
            "--batch-size", "2", "--min-run-time", "0", "--rank-budget", "0.2", "--rank-min-run-time", "0.01",
            "--no-profile", "--timing-cache", "none", "--no-progress"]


@pytest.mark.slow
def test_peers_prune_rows_in_every_runtime(tmp_path, capsys):
    """--peers prune: channel pruning at the LRD plans' parameters is a row of every runtime's
    table, with the fields every row has (training where the runtime trains)."""
    from lrdaccel import peers

    out = tmp_path / "bench"
    assert main(["bench", *PEER_RUN, "--runtimes", "eager,onnxruntime", "--rank-runtime", "eager",
                 "--out", str(out)]) == 0
    results = load_results(out / "results.json")  # the schema accepts the rows
    assert results["config"]["peers"] == ["prune"]
    spec = zoo.get("resnet-mini")
    original = spec.build()
    lrd_params = peers.lrd_params(original, lrd.plan(original, ratio=2.0))
    for model in results["models"]:
        rows = {row["variant"]: row for row in model["rows"]}
        assert list(rows)[:2] == ["original", "lrd_opt"] and "prune" in rows, model["runtime"]
        for key in ("prune", "prune_opt"):
            if key not in rows:  # the search kept the ratio plan's parameters: the note says so
                assert any("the same as the row at LRD's parameters" in note for note in model["notes"])
                continue
            assert set(rows[key]) - {"peer"} == set(rows["lrd_opt"]) - {"peer"}
            assert rows[key]["schedule"] is None and rows[key]["peer"]["kind"] == "prune"
        assert abs(rows["prune"]["params"] / lrd_params - 1) <= 0.02
        if "prune_opt" in rows:
            assert abs(rows["prune_opt"]["params"] / rows["lrd_opt"]["params"] - 1) <= 0.02
        assert ("train_ratio" in rows["prune"]) == (model["runtime"] == "eager")
    report = (out / "report.md").read_text()
    assert report.count("| channel pruning (torch-pruning) at LRD's parameters |") == 2
    assert "of every prunable group's channels removed" in report


def test_peers_prune_without_the_extra_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    import lrdaccel.cli.bench as bench_cli

    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    monkeypatch.setattr(bench_cli, "run_bench", lambda *a, **k: pytest.fail("work started"))
    assert main(["bench", *PEER_RUN, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == ("lrdaccel bench: error: --peers prune needs the peers extra (torch-pruning is not installed): "
                   "pip install lrdaccel[peers]\n")
    assert not (tmp_path / "out").exists()
    assert main(["bench", "--quick", "--peers", "lora", "--out", str(tmp_path / "out")]) == 2
    assert "peers: choose among prune" in capsys.readouterr().err


@pytest.mark.slow
def test_a_model_torch_pruning_refuses_has_a_note_and_the_rest_of_the_table(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")

    def tiny_gpt2():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                                                     n_positions=16))

    monkeypatch.setattr(zoo, "_SPECS", zoo._SPECS + [zoo.ModelSpec("gpt2-tiny", "GPT-2, 1 layer, 32 wide", tiny_gpt2,
                                                                    (8,), kind="tokens", vocab_size=64)])
    out = tmp_path / "bench"
    run = [arg if arg != "resnet-mini" else "gpt2-tiny" for arg in PEER_RUN]
    assert main(["bench", *run, "--variants", "lrd", "--no-train", "--out", str(out)]) == 0
    (model,) = load_results(out / "results.json")["models"]
    assert [row["variant"] for row in model["rows"]] == ["original", "lrd"]
    (note,) = [note for note in model["notes"] if "channel pruning" in note]
    assert "n/a, cannot prune GPT2LMHeadModel" in note and "Conv1D" in note
    assert f"Note: {note}." in (out / "report.md").read_text()


@pytest.mark.slow
def test_int8_runtime_rows_are_named_and_run_int8_kernels(tmp_path):
    """--runtimes eager,int8 --peers prune: an int8 table with the original, LRD and pruning rows,
    each timed on its `lrd.quantize` copy (the profile shows quantized operators), inference only."""
    out = tmp_path / "bench"
    args = [arg for arg in PEER_RUN if arg != "--no-profile"]
    assert main(["bench", *args, "--runtimes", "eager,int8", "--rank-runtime", "eager", "--no-train",
                 "--out", str(out)]) == 0
    results = load_results(out / "results.json")
    int8 = next(model for model in results["models"] if model["runtime"] == "int8")
    assert [row["variant"] for row in int8["rows"]][:2] == ["original", "lrd_opt"]
    assert "prune" in [row["variant"] for row in int8["rows"]]
    assert all("train_ratio" not in row for row in int8["rows"])
    for variant in ("original", "lrd_opt"):
        names = " ".join(op["op"] for op in int8["profile"][variant]["infer"])
        assert "quantized::" in names, names
    report = (out / "report.md").read_text()
    assert "## resnet-mini, int8" in report and "int8/" in json.dumps(results["best"])
