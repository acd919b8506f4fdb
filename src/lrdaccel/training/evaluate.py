"""Top-1 accuracy of a classifier on an in-memory dataset, for the demo and the accuracy studies."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from lrdaccel._modules import output_tensor


@torch.no_grad()
def accuracy(model: nn.Module, dataset: TensorDataset, batch_size: int = 1000, desc: str = "evaluate",
             progress: bool = True) -> float:
    """Top-1 accuracy in [0, 1]; the model is evaluated in eval mode and put back as it was."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        loader = DataLoader(dataset, batch_size=batch_size)
        for images, labels in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
            correct += int((output_tensor(model(images)).argmax(-1) == labels).sum())
    finally:
        model.train(was_training)
    return correct / len(dataset)
