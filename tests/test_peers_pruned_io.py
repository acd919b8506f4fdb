"""save_pruned / load_pruned: a fresh model of the architecture, shrunk to the saved widths (and
head counts), gives the pruned model's outputs exactly; wrong or tampered files are refused."""

import json

import pytest
import torch

from lrdaccel import peers, zoo
from lrdaccel.peers.pruned_io import CONFIG_NAME, WEIGHTS_NAME

pytest.importorskip("torch_pruning")


@pytest.fixture(scope="module")
def pruned_cnn():
    model = zoo.get("fmnist-cnn").build().eval()
    x = torch.randn(3, 1, 28, 28)
    pruned, _ = peers.prune(model, x, params_fraction=0.5)
    with torch.no_grad():  # BatchNorm statistics that are not the defaults, to be saved too
        pruned.train()
        pruned(x)
        pruned.eval()
    return pruned, x


def test_cnn_round_trip_gives_identical_outputs_in_a_fresh_model(pruned_cnn, tmp_path):
    pruned, x = pruned_cnn
    peers.save_pruned(pruned, tmp_path)
    base = zoo.get("fmnist-cnn").build().eval()  # other random weights, full widths
    before = {k: v.clone() for k, v in base.state_dict().items()}
    loaded = peers.load_pruned(tmp_path, base)
    assert loaded is not base and all(torch.equal(base.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    assert loaded.blocks[0].conv1.out_channels == pruned.blocks[0].conv1.out_channels


def test_the_config_records_widths_and_is_versioned(pruned_cnn, tmp_path):
    pruned, _ = pruned_cnn
    peers.save_pruned(pruned, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["format"] == "lrdaccel.pruned" and config["version"] == 1
    assert config["layers"]["blocks.0.conv1"] == {"type": "Conv2d", "in_channels": pruned.blocks[0].conv1.in_channels,
                                                  "out_channels": pruned.blocks[0].conv1.out_channels, "groups": 1}


def test_a_checkpoint_of_another_architecture_is_refused(pruned_cnn, tmp_path):
    peers.save_pruned(pruned_cnn[0], tmp_path)
    other = zoo.get("fmnist-bottleneck").build()
    with pytest.raises(ValueError, match=str(tmp_path)):
        peers.load_pruned(tmp_path, other)


def test_tampered_or_foreign_files_are_refused(pruned_cnn, tmp_path):
    peers.save_pruned(pruned_cnn[0], tmp_path)
    base = zoo.get("fmnist-cnn").build()
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["layers"]["blocks.0.conv1"]["out_channels"] += 1
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="blocks.0.conv1"):
        peers.load_pruned(tmp_path, base)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not an lrdaccel pruned-model config"):
        peers.load_pruned(tmp_path, base)
    peers.save_pruned(pruned_cnn[0], tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes((tmp_path / WEIGHTS_NAME).read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="SHA-256"):
        peers.load_pruned(tmp_path, base)
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        peers.load_pruned(tmp_path / "missing", base)


def test_save_refuses_a_file_in_the_way(pruned_cnn, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        peers.save_pruned(pruned_cnn[0], tmp_path / "file")


def test_tiny_bert_round_trip_keeps_head_counts(tmp_path):
    transformers = pytest.importorskip("transformers")

    def build():
        config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, max_position_embeddings=32)
        return transformers.BertModel(config).eval()

    model = build()
    batch = {"input_ids": torch.randint(1, 100, (2, 7)), "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3])}
    pruned, report = peers.prune(model, batch, pruning_ratio=0.5)
    peers.save_pruned(pruned, tmp_path)
    loaded = peers.load_pruned(tmp_path, build())
    for name, (_, heads) in report.heads.items():
        assert loaded.get_submodule(name).num_attention_heads == heads
        assert loaded.get_submodule(name).all_head_size == pruned.get_submodule(name).all_head_size
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, pruned(**batch).last_hidden_state)


@pytest.mark.slow
def test_minilm_round_trip(tmp_path):
    minilm = zoo.minilm().eval()
    batch = dict(zoo.minilm_tokenizer()(["a short one", "and a somewhat longer sentence to pad the other"],
                                        padding=True, return_tensors="pt"))
    pruned, report = peers.prune(minilm, batch, params_fraction=0.8)
    peers.save_pruned(pruned, tmp_path)
    loaded = peers.load_pruned(tmp_path, zoo.minilm().eval())
    assert {name: loaded.get_submodule(name).num_attention_heads for name in report.heads} == \
        {name: after for name, (_, after) in report.heads.items()}
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, pruned(**batch).last_hidden_state)


def test_a_subclass_with_another_forward_is_refused_in_one_line(pruned_cnn, tmp_path):
    peers.save_pruned(pruned_cnn[0], tmp_path)
    base = zoo.get("fmnist-cnn").build()

    class Doubled(type(base)):
        def forward(self, x):
            return 2 * super().forward(x)

    base.__class__ = Doubled
    with pytest.raises(ValueError) as error:
        peers.load_pruned(tmp_path, base)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())["model_class"]
    assert str(error.value) == (f"{tmp_path / CONFIG_NAME}: model_class is {saved!r} but the model given is a "
                                f"'Doubled'; load it onto a {saved}")


def test_unknown_config_fields_warn_that_a_newer_lrdaccel_wrote_them(pruned_cnn, tmp_path):
    pruned, x = pruned_cnn
    peers.save_pruned(pruned, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["sparsity"] = 0.5
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"ignoring unknown pruned-model config fields \['sparsity'\] "
                                         r"\(written by a newer lrdaccel\? upgrade\)") as caught:
        loaded = peers.load_pruned(tmp_path, zoo.get("fmnist-cnn").build().eval())
    assert [w.filename for w in caught if "sparsity" in str(w.message)] == [__file__]  # the caller's line
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
