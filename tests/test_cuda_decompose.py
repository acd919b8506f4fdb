"""Decomposition on the device the model lives on: full-rank equivalence of HF ResNet and ViT in
float32 and within bfloat16's rounding, the result in the model's dtype, device and memory
format, and every method giving the same model on the GPU as on the CPU.

Each test runs on the CPU and, marked `cuda`, on a GPU where there is one. On the GPU the models
have their real widths (ResNet-50; ViT-B/16's 768-wide blocks, two of them), on the CPU toy ones.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.layers import LowRankModule
from lrdaccel.layers.base import is_channels_last
from test_planning_merging import bottleneck

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# bfloat16 keeps 8 bits of mantissa: the original model in bf16 is ~0.5-1% off its float32 output
# (relative to the largest logit); the full-rank decomposition in bf16 may add rounding of its own
# (each factor's output is rounded), measured at 1.0-1.9x the original's error on CPU.
BF16_FACTOR = 4


def hf_resnet(device: str):
    from transformers import ResNetConfig, ResNetForImageClassification

    if device == "cpu":
        config = ResNetConfig(embedding_size=16, hidden_sizes=[32, 64, 96, 128], depths=[1, 1, 1, 1], num_labels=10)
        return ResNetForImageClassification(config), torch.randn(2, 3, 32, 32)
    return ResNetForImageClassification(ResNetConfig(num_labels=10)), torch.randn(2, 3, 64, 64)  # ResNet-50


def hf_vit(device: str):
    from transformers import ViTConfig, ViTForImageClassification

    widths = ({"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128} if device == "cpu" else
              {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072})  # ViT-B/16's
    config = ViTConfig(image_size=64, patch_size=16, num_hidden_layers=2, num_labels=10, **widths)
    return ViTForImageClassification(config), torch.randn(2, 3, 64, 64)


MODELS = {"resnet": hf_resnet, "vit": hf_vit}


def placed(name: str, device: str, dtype: torch.dtype = torch.float32):
    """(model in eval mode on `device` in `dtype`, channels_last for the ResNet; its input)."""
    model, x = MODELS[name](device)
    model = model.eval().to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype)
    if name == "resnet":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return model, x


@contextlib.contextmanager
def exact_float32():
    """float32 matmuls and convs without TF32 (CUDA uses it for convs by default), restored after
    (torch >= 2.9's fp32_precision settings, else the older allow_tf32 flags)."""
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
        flags = [(torch.backends.cuda.matmul, "fp32_precision", "ieee"), (torch.backends.cudnn.conv, "fp32_precision",
                                                                         "ieee")]
    else:
        flags = [(torch.backends.cuda.matmul, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", False)]
    saved = [getattr(owner, name) for owner, name, _ in flags]
    for owner, name, value in flags:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(flags, saved):
            setattr(owner, name, value)


def logits(model: nn.Module, x: torch.Tensor, autocast: bool = False) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        return model(pixel_values=x).logits.float()


def check_placement(model: nn.Module, device: str, dtype: torch.dtype) -> None:
    """Every parameter of every decomposed layer on `device` in `dtype`; a channels_last model's
    k x k decompositions channels_last too."""
    layers = [m for m in model.modules() if isinstance(m, LowRankModule)]
    assert layers
    channels_last = any(is_channels_last(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d))
    for layer in layers:
        for parameter in layer.parameters():
            assert parameter.device.type == device and parameter.dtype == dtype
        if channels_last and hasattr(layer, "core") and layer.core.kernel_size != (1, 1):
            assert is_channels_last(layer.core.weight)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("device", DEVICES)
def test_full_rank_reproduces_hf_models_in_float32(name, device):
    with exact_float32():
        model, x = placed(name, device)
        expected = logits(model, x)
        lrd.decompose(model, lrd.plan(model, ranks="full"))
        check_placement(model, device, torch.float32)
        error = (logits(model, x) - expected).abs().max() / expected.abs().max()
    assert error <= (1e-4 if device == "cpu" else 1e-3), error  # cuDNN's algorithms round differently


@pytest.mark.slow
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-weights", "bf16-autocast"])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("device", DEVICES)
def test_full_rank_in_bfloat16_stays_within_its_rounding(name, device, autocast):
    """A bf16 model decomposes in float64 on its device into bf16 factors; under autocast a float32
    model's factors stay float32. Either way the decomposed model is as close to the float32
    output as bf16 rounding allows."""
    with exact_float32():
        model, x = placed(name, device)
        reference = logits(model, x)
        if not autocast:
            model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
        original = logits(model, x, autocast)
        lrd.decompose(model, lrd.plan(model, ranks="full"))
        check_placement(model, device, torch.float32 if autocast else torch.bfloat16)
        decomposed = logits(model, x, autocast)
    scale = reference.abs().max()
    own = (original - reference).abs().max() / scale
    error = (decomposed - reference).abs().max() / scale
    assert 0 < own < 0.05 and error <= BF16_FACTOR * own, (error, own)


@pytest.mark.parametrize("device", DEVICES)
def test_a_bf16_layer_is_factorized_in_high_precision_on_its_device(device):
    """The factors come from a float64 factorization of the bf16 weight, rounded once to bf16: at
    full rank they rebuild the weight to bf16 rounding (a bf16 SVD could not; torch has none)."""
    conv = nn.Conv2d(32, 48, 3, padding=1).to(device=device, dtype=torch.bfloat16)
    conv = conv.to(memory_format=torch.channels_last)
    linear = nn.Linear(64, 40).to(device=device, dtype=torch.bfloat16)
    for dense, layer in ((conv, lrd.TuckerConv2d.from_dense(conv, (32, 48), "conv")),
                         (linear, lrd.SVDLinear.from_dense(linear, 40, "linear"))):
        assert all(p.dtype == torch.bfloat16 and p.device.type == device for p in layer.parameters())
        weight = dense.weight.double()
        rebuilt = layer.dense_weight().double()
        assert (rebuilt - weight).norm() / weight.norm() < 2 ** -7
    assert is_channels_last(layer_core := lrd.TuckerConv2d.from_dense(conv, (16, 24), "conv").core.weight)
    assert layer_core.dtype == torch.bfloat16


class StemBottleneckNet(nn.Module):
    """A stem conv, one bottleneck (merge candidate) and a classifier: every method's layer kinds."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = bottleneck(width=16, inner=32)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


METHODS = {
    "svd": lambda model, x, batches: lrd.decompose(model, ratio=2.0, min_rank=1),
    "whiten": lambda model, x, batches: lrd.decompose(model, ratio=2.0, min_rank=1, method="whiten",
                                                      calibration=batches),
    "sequential": lambda model, x, batches: lrd.decompose(model, ratio=2.0, min_rank=1, method="whiten",
                                                          sequential=True, calibration=batches),
    "merge": lambda model, x, batches: lrd.decompose(
        model, lrd.plan(model, ratio=2.0, merge=True, example_inputs=x, min_rank=1), calibration=batches),
    "branched": lambda model, x, batches: lrd.decompose(model, _branched_plan(model)),
    "sensitivity": lambda model, x, batches: lrd.decompose(model, ratio=2.0, min_rank=1, allocate="sensitivity",
                                                           method="whiten", calibration=batches),
}


def _branched_plan(model: nn.Module):
    plan = lrd.plan(model, ratio=2.0, min_rank=1)
    rows = [row.with_rank((8, 8), "branched", kind="tucker2_branched", branches=2) if row.name == "block.3"
            else row for row in plan]
    return lrd.Plan(rows, ratio=plan.ratio, beta=plan.beta, meta=plan.meta)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("device", DEVICES)  # on the CPU: the same model twice
def test_every_method_gives_the_same_model_on_the_gpu_as_on_the_cpu(method, device):
    """SVD, whitening, sequential calibration, merging and branched Tucker-2 run on the model's
    device (statistics, factorizations and solves in float64 there) and agree with the CPU.

    The calibrated methods solve least-squares problems on float32 activations, which amplify
    rounding (on the CPU alone, the memory alignment MKL sees moves sequential calibration's
    output by ~1e-3): for them the GPU's decomposition must be as close to the original as the
    CPU's, and its output close to the CPU's."""
    torch.manual_seed(0)
    original = StemBottleneckNet().eval()
    with torch.no_grad():
        for bn in original.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_var.uniform_(0.5, 2.0), bn.running_mean.uniform_(-0.5, 0.5)
    cpu_model, gpu_model = copy.deepcopy(original), copy.deepcopy(original).to(device)
    x, batches = torch.randn(4, 3, 8, 8), [torch.randn(8, 3, 8, 8) for _ in range(3)]
    held_out = torch.randn(16, 3, 8, 8)
    with exact_float32(), torch.no_grad():
        METHODS[method](cpu_model, x, batches)
        METHODS[method](gpu_model, x.to(device), [b.to(device) for b in batches])
        reference, expected, got = original(held_out), cpu_model(held_out), gpu_model(held_out.to(device)).cpu()
    assert all(p.device.type == device for p in gpu_model.parameters())
    scale = reference.abs().max()
    if method in ("svd", "branched"):
        assert (got - expected).abs().max() <= 1e-4 * scale
        return
    cpu_error, gpu_error = ((out - reference).norm() / reference.norm() for out in (expected, got))
    assert abs(gpu_error - cpu_error) <= 0.1 * cpu_error + 1e-4, (gpu_error, cpu_error)
    assert (got - expected).abs().max() <= 2e-2 * scale
