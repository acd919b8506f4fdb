"""Zoo models build and run forward; the small ones used by the demo and the accuracy runs
decompose exactly at full rank and keep their geometry."""

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel._modules import call_model
from lrdaccel import zoo

SMALL = ("fmnist-bottleneck", "fmnist-cnn", "fmnist-cnn-wide", "fmnist-vit", "resnet-mini", "vit-tiny")
LARGE = ("resnet50", "resnet101", "resnet152", "vit-b16", "gpt2", "minilm", "efficientnet-lite0")


def _forward(name: str, batch: int = 2):
    spec = zoo.get(name)
    model = spec.build().eval()
    with torch.no_grad():
        output = call_model(model, spec.example_inputs(batch))
    return spec, model, output


@pytest.mark.parametrize("name", SMALL)
def test_small_models_build_and_forward(name):
    spec, _, output = _forward(name)
    logits = output if isinstance(output, torch.Tensor) else output.logits
    assert logits.shape == (2, 10 if name.startswith("fmnist") else 1000)
    assert torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_large_models_build_and_forward(name):
    spec, _, output = _forward(name, batch=1)
    tensor = output if isinstance(output, torch.Tensor) else (
        output.logits if hasattr(output, "logits") else output.last_hidden_state)
    assert tensor.shape[0] == 1 and torch.isfinite(tensor).all()


def test_efficientnet_plain_convs_compute_what_the_package_computes():
    """The zoo's EfficientNet-Lite0 has exact nn.Conv2d layers (decomposable) behind explicit
    padding, and gives the packaged model's logits; every conv of the package was replaced."""
    packaged = zoo.efficientnet_lite0(plain=False)
    plain = zoo.efficientnet_lite0()
    assert all(type(m) is nn.Conv2d for m in plain.modules() if isinstance(m, nn.Conv2d))
    assert any(type(m) is not nn.Conv2d for m in packaged.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), packaged(x), rtol=0, atol=0)
    assert sum(p.numel() for p in plain.parameters()) == 4_652_008


def test_every_zoo_name_is_covered_here():
    assert set(zoo.names()) == set(SMALL) | set(LARGE)


def test_fmnist_cnn_geometry():
    model = zoo.get("fmnist-cnn").build()
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    three = [m for m in convs.values() if m.kernel_size == (3, 3) and m.in_channels > 1]
    assert [m.out_channels for m in three] == [32, 32, 64, 64, 128, 128]
    shortcuts = [m for name, m in convs.items() if "shortcut" in name]
    assert [(m.kernel_size, m.stride) for m in shortcuts] == [((1, 1), (2, 2))] * 3
    # 28 -> 14 -> 7 -> 4 before pooling
    features = model.blocks(model.stem(torch.zeros(1, 1, 28, 28)))
    assert features.shape == (1, 128, 4, 4)


def test_fmnist_vit_config():
    model = zoo.get("fmnist-vit").build()
    config = model.model.config
    assert (config.image_size, config.patch_size, config.num_channels) == (28, 7, 1)
    assert (config.hidden_size, config.num_hidden_layers, config.num_labels) == (128, 4, 10)


@pytest.mark.parametrize("name", ["fmnist-cnn", "fmnist-vit"])
def test_full_rank_decomposition_reproduces_the_small_models(name):
    spec = zoo.get(name)
    model = spec.build().eval()
    x = spec.example_inputs(3)
    with torch.no_grad():
        before = model(x)
    report = lrd.decompose(model, lrd.plan(model, ranks="full"))
    assert report.layers  # every candidate decomposed
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_image_classifier_returns_the_hf_logits():
    model = zoo.get("fmnist-vit").build().eval()
    x = zoo.get("fmnist-vit").example_inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.model(pixel_values=x).logits)


def test_example_inputs_are_deterministic():
    spec = zoo.get("fmnist-cnn")
    assert torch.equal(spec.example_inputs(4), spec.example_inputs(4))
    assert spec.example_inputs(4).shape == (4, 1, 28, 28)


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'nope'.*fmnist-cnn"):
        zoo.get("nope")


def test_fmnist_bottleneck_has_six_mergeable_bottlenecks():
    spec = zoo.get("fmnist-bottleneck")
    model = spec.build().eval()
    assert sum(p.numel() for p in model.parameters()) == 221_546
    candidates = lrd.find_merge_candidates(model, spec.example_inputs(2))
    assert len(candidates) == 6 and all(c.reason is None for c in candidates)
