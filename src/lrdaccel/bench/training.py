"""Data and evaluation for the demo and the accuracy experiments (training is `lrdaccel.train`).

Image classifiers on in-memory datasets: standardised splits and top-1 accuracy.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from lrdaccel import data
from lrdaccel.bench.workloads import output_tensor


def prepare_data(name: str, train_limit: int | None = None, test_limit: int | None = None,
                 ) -> tuple[TensorDataset, TensorDataset]:
    """Train and test splits of a `lrdaccel.data` dataset, standardised by the train split's statistics."""
    train = data.load(name, "train", limit=train_limit)
    test = data.load(name, "test", limit=test_limit)
    images = train.tensors[0]
    mean, std = float(images.mean()), float(images.std())
    return (TensorDataset(data.normalize(images, mean, std), train.tensors[1]),
            TensorDataset(data.normalize(test.tensors[0], mean, std), test.tensors[1]))


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
