"""`lrdaccel bench` with two micro models registered in the zoo, for `gpu_check.sh --smoke`.

The smoke run must go through the same code as the GPU run (HF ResNet bottlenecks traced and
merged, HF ViT attention blocks, compiled graphs) in minutes on a CPU, so it uses the same
Hugging Face classes at toy widths: "hf-resnet-micro" (ResNet with one bottleneck per stage,
16-128 wide, 32x32 inputs) and "hf-vit-micro" (ViT, 2 layers, 64 wide, patch 8, 32x32).

    python benchmarks/gpu_bench.py --models hf-resnet-micro,hf-vit-micro --batch-size 4 --out out/
"""

from __future__ import annotations

import sys

from lrdaccel import zoo
from lrdaccel.cli import main
from lrdaccel.zoo import ModelSpec

MICRO_MODELS = ("hf-resnet-micro", "hf-vit-micro")


def _resnet_micro():
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=16, hidden_sizes=[32, 64, 96, 128], depths=[1, 1, 1, 1],
                          layer_type="bottleneck", num_labels=10)
    return ResNetForImageClassification(config)


def _vit_micro():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, num_labels=10)
    return ViTForImageClassification(config)


def register_micro_models() -> None:
    """Add the two micro models to the zoo (once)."""
    if MICRO_MODELS[0] in zoo.names():
        return
    zoo.register(ModelSpec(MICRO_MODELS[0], "HF ResNet, one bottleneck per stage, 16-128 wide, random weights, "
                                            "32x32; for smoke runs", _resnet_micro, (3, 32, 32)))
    zoo.register(ModelSpec(MICRO_MODELS[1], "HF ViT, 2 layers, 64 wide, patch 8, random weights, 32x32; for "
                                            "smoke runs", _vit_micro, (3, 32, 32)))


if __name__ == "__main__":
    register_micro_models()
    sys.exit(main(["bench", *sys.argv[1:]]))
