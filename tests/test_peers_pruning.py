"""peers.prune on CNNs: the budget is met, the copy runs and trains, the original never changes,
the stem and classifier stay, and bad input is refused before any work."""

import copy

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel import peers, zoo
from lrdaccel.measure.counting import count_params
from lrdaccel.peers import pruning as prune_module

pytest.importorskip("torch_pruning")


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return zoo.get("fmnist-cnn").build().eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_parameters_within_two_percent_of_the_lrd_budget(cnn, images, importance):
    target = peers.lrd_params(cnn, 2.0)
    state = _state(cnn)
    extra = {"loss_fn": peers.labelled_loss([(images, torch.tensor([0, 1, 2, 3]))])} if importance == "taylor" else {}
    pruned, report = peers.prune(cnn, images, target_params=target, importance=importance, **extra)
    assert abs(count_params(pruned) - target) <= 0.02 * target
    assert report.params_after == count_params(pruned) and report.target_params == target
    assert report.params_before == count_params(cnn) and 0 < report.pruning_ratio < 1
    assert report.importance.startswith(importance) and report.trials and report.seconds > 0
    assert _same_state(cnn, state) and pruned is not cnn


def test_params_fraction_l1_and_a_printed_report(cnn, images):
    pruned, report = peers.prune(cnn, images, params_fraction=0.6, norm=1)
    assert abs(report.params_fraction - 0.6) <= 0.02 * 0.6
    text = str(report)
    assert "magnitude (L1)" in text and "kept stem.0" in text and "kept classifier" in text


def test_ratio_zero_gives_the_original_outputs_exactly(cnn, images):
    pruned, report = peers.prune(cnn, images, pruning_ratio=0.0)
    assert count_params(pruned) == count_params(cnn) and report.pruning_ratio == 0
    with torch.no_grad():
        assert torch.equal(pruned(images), cnn(images))


def test_the_pruned_copy_runs_forward_and_backward_and_keeps_modes_and_flags(images):
    model = zoo.get("fmnist-cnn").build().train()
    model.stem[0].weight.requires_grad_(False)
    pruned, _ = peers.prune(model, images, pruning_ratio=0.4)
    assert pruned.training and not pruned.stem[0].weight.requires_grad
    out = pruned(images)
    assert out.shape == (4, 10)
    out.square().mean().backward()
    assert all(p.grad is not None for p in pruned.parameters() if p.requires_grad)


def test_stem_and_classifier_keep_their_widths(cnn, images):
    pruned, report = peers.prune(cnn, images, pruning_ratio=0.5)
    assert pruned.stem[0].out_channels == cnn.stem[0].out_channels
    assert pruned.classifier.out_features == cnn.classifier.out_features
    assert pruned.classifier.in_features < cnn.classifier.in_features  # its input width is pruned
    assert set(report.kept) == {"stem.0", "classifier"}
    free, _ = peers.prune(cnn, images, pruning_ratio=0.5, keep_stem=False)
    assert free.stem[0].out_channels < cnn.stem[0].out_channels


@pytest.mark.parametrize("exclude", [["blocks.0.conv1"], r"blocks\.0\.conv1", lambda m, n: n == "blocks.0.conv1"])
def test_excluded_layers_keep_their_output_width(cnn, images, exclude):
    pruned, report = peers.prune(cnn, images, pruning_ratio=0.5, exclude=exclude)
    assert pruned.blocks[0].conv1.out_channels == cnn.blocks[0].conv1.out_channels
    assert pruned.blocks[1].conv1.out_channels < cnn.blocks[1].conv1.out_channels
    assert report.kept["blocks.0.conv1"].startswith("excluded")


def test_exclude_by_type(cnn, images):
    pruned, _ = peers.prune(cnn, images, pruning_ratio=0.5, exclude=nn.Conv2d)
    assert count_params(pruned) == count_params(cnn)


def test_hf_resnet_is_pruned_to_the_budget():
    spec = zoo.get("resnet-mini")
    model, x = spec.build().eval(), spec.example_inputs(2, (3, 64, 64))
    pruned, report = peers.prune(model, x, params_fraction=0.5)
    assert abs(report.params_fraction - 0.5) <= 0.01
    assert "resnet.embedder.embedder.convolution" in report.kept
    assert pruned(pixel_values=x).logits.shape == (2, 1000)


@pytest.mark.slow
def test_efficientnet_lite0_depthwise_convs_stay_depthwise():
    efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
    model = efficientnet.EfficientNet.from_name("efficientnet-lite0").eval()
    x = torch.randn(2, 3, 64, 64)
    pruned, report = peers.prune(model, x, params_fraction=0.5)
    assert abs(report.params_fraction - 0.5) <= 0.01
    depthwise = [m for m in pruned.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels == m.weight.shape[0] for m in depthwise)
    assert any(m.out_channels < o.out_channels for m, o in zip(pruned.modules(), model.modules())
               if isinstance(m, nn.Conv2d) and m.groups > 1)
    pruned.train()
    pruned(x).square().mean().backward()


def test_time_budget_searches_on_the_measured_fraction(cnn, images, monkeypatch):
    """The search logic, with the timer replaced by a deterministic stand-in (no timing asserted)."""
    monkeypatch.setattr(prune_module, "time_fraction", lambda original, pruned, x, config:
                        count_params(pruned) / count_params(original))
    _, report = peers.prune(cnn, images, latency_fraction=0.7)
    assert abs(report.latency_fraction - 0.7) <= 0.05 * 0.7
    assert all("latency_fraction" in trial for trial in report.trials)
    monkeypatch.setattr(prune_module, "seconds_per_call", lambda model, x, config: 2.0)
    _, report = peers.prune(cnn, images, target_latency=1.0)
    assert abs(report.latency_fraction - 0.5) <= 0.05 * 0.5
    with pytest.raises(ValueError, match="target_latency 3.0"):
        peers.prune(cnn, images, target_latency=3.0)


def test_time_fraction_measures_both_models_and_leaves_their_modes(cnn, images):
    from lrdaccel.peers.timing import time_fraction

    model = copy.deepcopy(cnn).train()
    fraction = time_fraction(model, copy.deepcopy(cnn), images, peers.PruneConfig(pruning_ratio=0.0,
                                                                                  min_run_time=0.01,
                                                                                  latency_repeats=1))
    assert fraction > 0 and model.training


# ---- bad input: a ValueError naming the value, the model unchanged, before any work ----------------


@pytest.mark.parametrize("settings, match", [
    ({"params_fraction": 0.0}, "params_fraction"), ({"params_fraction": 1.0}, "params_fraction"),
    ({"params_fraction": -0.5}, "-0.5"), ({"latency_fraction": 1.5}, "1.5"),
    ({"pruning_ratio": 1.0}, "pruning_ratio"), ({"target_params": 0}, "target_params"),
    ({"params_fraction": 0.5, "importance": "random"}, "'random'"),
    ({"params_fraction": 0.5, "norm": 3}, "norm"), ({}, "exactly one budget"),
    ({"params_fraction": 0.5, "target_params": 10}, "exactly one budget"),
    ({"params_fraction": 0.5, "tolerance": 0}, "tolerance"), ({"params_fraction": 0.5, "nonsense": 1}, "nonsense"),
])
def test_bad_settings_are_refused_with_the_value(cnn, images, settings, match):
    state = _state(cnn)
    with pytest.raises(ValueError, match=match):
        peers.prune(cnn, images, **settings)
    assert _same_state(cnn, state)


def test_a_target_above_the_model_is_refused_before_any_work(cnn, images, monkeypatch):
    monkeypatch.setattr(prune_module, "analyse", lambda *a, **k: pytest.fail("work started"))
    above = count_params(cnn) + 1
    with pytest.raises(ValueError, match=f"target_params {above}"):
        peers.prune(cnn, images, target_params=above)
    with pytest.raises(ValueError, match="loss_fn"):
        peers.prune(cnn, images, params_fraction=0.5, importance="taylor")
    with pytest.raises(ValueError, match="loss_fn"):
        peers.prune(cnn, images, params_fraction=0.5, loss_fn=lambda m: m(images).sum())
    with pytest.raises(ValueError, match="exclude"):
        peers.prune(cnn, images, params_fraction=0.5, exclude=["no_such_layer"])


def test_a_budget_no_ratio_reaches_names_what_is_reachable(cnn, images):
    state = _state(cnn)
    with pytest.raises(ValueError, match="below what pruning reaches"):
        peers.prune(cnn, images, params_fraction=0.001)
    assert _same_state(cnn, state)


def test_a_bad_loss_fn_is_refused(cnn, images):
    with pytest.raises(ValueError, match="scalar tensor"):
        peers.prune(cnn, images, params_fraction=0.5, importance="taylor", loss_fn=lambda m: m(images))
    with pytest.raises(ValueError, match="non-finite"):
        peers.prune(cnn, images, params_fraction=0.5, importance="taylor",
                    loss_fn=lambda m: m(images).sum() * float("nan"))


class Conv1D(nn.Module):
    """Stands in for transformers' Conv1D: a weight layer torch-pruning has no pruner for."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return x @ self.weight


class WithUnprunable(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.inner, self.layer, self.out = nn.Linear(8, 8), layer, nn.Linear(8, 2)

    def forward(self, x):
        y = self.inner(x)
        if isinstance(self.layer, nn.MultiheadAttention):
            return self.out(self.layer(y[:, None], y[:, None], y[:, None])[0][:, 0])
        return self.out(self.layer(y))


@pytest.mark.parametrize("layer, match", [(Conv1D(), "layer 'layer' is a Conv1D"),
                                          (nn.MultiheadAttention(8, 2), "'layer' is an nn.MultiheadAttention"),
                                          (nn.LazyLinear(8), "not initialized")])
def test_a_layer_torch_pruning_cannot_handle_is_named_before_any_work(layer, match, monkeypatch):
    model = WithUnprunable(layer)
    monkeypatch.setattr(prune_module, "analyse", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match=f"cannot prune WithUnprunable: .*{match}"):
        peers.prune(model, torch.randn(2, 8), params_fraction=0.5)


def test_excluding_the_unsupported_layer_lets_the_rest_be_pruned():
    model = WithUnprunable(Conv1D()).eval()
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="the pruned WithUnprunable fails its forward"):
        peers.prune(model, x, pruning_ratio=0.5, exclude=["layer"])  # its input width was pruned
    pruned, report = peers.prune(model, x, pruning_ratio=0.5, exclude=["inner", "layer"])
    assert pruned.layer.weight.shape == (8, 8) and report.kept["inner"].startswith("excluded")
    with torch.no_grad():
        assert pruned(x).shape == (2, 2)


def test_a_model_torch_pruning_cannot_trace_is_named():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(x).detach()  # no autograd graph to trace

    with pytest.raises(ValueError, match="torch-pruning cannot trace Untraceable"):
        peers.prune(Untraceable(), torch.randn(2, 4), pruning_ratio=0.5)


def test_a_ddp_style_wrapper_is_unwrapped(cnn, images):
    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

        def forward(self, x):
            return self._orig_mod(x)

    pruned, _ = peers.prune(Wrapper(cnn), images, pruning_ratio=0.3)
    assert type(pruned) is type(cnn)


def test_matched_budget_is_the_decomposed_models_parameter_count(cnn):
    decomposed = copy.deepcopy(cnn)
    lrd.decompose(decomposed, ratio=2.0)
    assert peers.lrd_params(cnn, 2.0) == count_params(decomposed)
    assert peers.lrd_params(cnn, lrd.plan(cnn, ratio=3.0)) < peers.lrd_params(cnn, 2.0)


class TiedLM(nn.Module):
    """An output layer that reads the embedding's weight (tied input/output embeddings)."""

    def __init__(self, vocab=50, dim=32, hidden=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.fc2(torch.relu(self.fc1(self.embed(ids)))))


def test_tied_input_and_output_embeddings_stay_one_tensor():
    torch.manual_seed(0)
    model = TiedLM().eval()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    state = _state(model)
    pruned, report = peers.prune(model, ids, params_fraction=0.8)
    assert pruned.head.weight is pruned.embed.weight and pruned.embed.weight.shape == (50, 32)
    assert torch.equal(pruned.embed.weight, model.embed.weight)
    assert report.kept["fc2"] == "head's weight is tied to embed's (pruning would untie them)"
    assert pruned.fc2.out_features == 32 and pruned.fc1.out_features < 64  # only the free width shrank
    assert pruned(ids).shape == (2, 7, 50)
    assert model.head.weight is model.embed.weight and _same_state(model, state)
