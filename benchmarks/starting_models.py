"""Trained starting models for the benchmarks, trained once and cached.

LRD's use case is "decompose a trained model, recover": a race or a Pareto front on a randomly
initialised CNN would measure how fast each variant learns from scratch, not what compression
keeps. The zoo's Fashion-MNIST CNNs have no published weights, so they are trained here, once:

    from starting_models import trained_fmnist_cnn
    model = trained_fmnist_cnn(train_limit=30000)   # ~2-3 min on one thread the first time, then read back

Training: `lrd.finetune` with AdamW (lr 3e-3, cosine to zero, no freezing) on
`lrdaccel.data.standardized_splits("fashion-mnist", train_limit)`: the images standardised by the
(limited) training split's own mean and std. The race's `fashion-mnist` task
(lrdaccel.tasks.registry) standardises a 1-channel model's images the same way, from the same
split with the same `train_limit`, so a model trained here and raced with the same `train_limit`
sees bitwise the same inputs (tests/test_benchmarks_pareto.py checks this).

The state dict is cached as safetensors under benchmarks/scratch/starting_models/ (git-ignored),
named by every setting that changes the weights; the test accuracy at the end of training is kept
in the file's metadata (`cached_accuracy`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lrdaccel as lrd
from lrdaccel import zoo
from lrdaccel.data import standardized_splits

CACHE_DIR = Path(__file__).resolve().parent / "scratch" / "starting_models"


def cache_path(model: str = "fmnist-cnn", epochs: int = 2, *, train_limit: int | None = None,
               batch_size: int = 128, lr: float = 3e-3, seed: int = 0, cache_dir: str | Path = CACHE_DIR) -> Path:
    """Where `trained_fmnist_cnn` keeps the weights for these settings (one file per setting)."""
    limit = "all" if train_limit is None else str(train_limit)
    return Path(cache_dir) / f"{model}_e{epochs}_n{limit}_b{batch_size}_lr{lr:g}_s{seed}.safetensors"


def trained_fmnist_cnn(model: str = "fmnist-cnn", epochs: int = 2, *, train_limit: int | None = None,
                       batch_size: int = 128, lr: float = 3e-3, seed: int = 0, cache_dir: str | Path = CACHE_DIR,
                       progress: bool = True) -> nn.Module:
    """The zoo model `model` trained on Fashion-MNIST: read from the cache, or trained and cached.

    Args:
        model: a zoo model for 1x28x28 images (fmnist-cnn, fmnist-cnn-wide, fmnist-bottleneck, fmnist-vit).
        epochs: training epochs (AdamW, cosine decay to zero, evaluated on the 10k test images).
        train_limit: train on the first N training images only; race with the same limit so that
            the race standardises its images with the same mean and std.
        batch_size, lr, seed: the training run's (the seed also draws the initial weights).
        cache_dir: where the safetensors files live.
        progress: tqdm bars while training.

    Returns:
        The trained model, in eval mode, on the CPU.

    Raises:
        ValueError: a model that does not take 1x28x28 images.
    """
    spec = zoo.get(model)
    if tuple(spec.input_shape) != (1, 28, 28):
        raise ValueError(f"{model!r} takes {spec.input_shape}, not Fashion-MNIST's 1x28x28 images")
    path = cache_path(model, epochs, train_limit=train_limit, batch_size=batch_size, lr=lr, seed=seed,
                      cache_dir=cache_dir)
    torch.manual_seed(seed)
    network = spec.build()
    if path.is_file():
        network.load_state_dict(load_file(path))
        print(f"{model}: trained weights read from {path} (test accuracy {cached_accuracy(path):.2f}%)")
        return network.eval()
    train, test = standardized_splits("fashion-mnist", train_limit=train_limit)
    began = time.perf_counter()
    history = lrd.finetune(network, train, test, epochs=epochs, optimizer="adamw", lr=lr, weight_decay=1e-4,
                           schedule=None, batch_size=batch_size, seed=seed, device="cpu", progress=progress)
    accuracy = 100.0 * history.epochs[-1].test_accuracy
    settings = {"model": model, "epochs": epochs, "train_limit": train_limit, "batch_size": batch_size, "lr": lr,
                "seed": seed, "test_accuracy": accuracy, "seconds": time.perf_counter() - began}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    state = {key: value.detach().cpu().contiguous() for key, value in network.state_dict().items()}
    save_file(state, str(partial), metadata={"lrdaccel_starting_model": json.dumps(settings)})
    os.replace(partial, path)  # a run killed mid-write leaves no file that later calls would trust
    print(f"{model}: trained {epochs} epochs in {settings['seconds']:.0f} s, test accuracy {accuracy:.2f}%; "
          f"cached at {path}")
    return network.eval()


def cached_accuracy(path: str | Path) -> float:
    """The test accuracy (percent) stored with a cached model."""
    with safe_open(str(path), framework="pt") as handle:
        return float(json.loads(handle.metadata()["lrdaccel_starting_model"])["test_accuracy"])
