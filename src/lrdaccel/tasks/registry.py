"""Real labelled tasks offline, by name, made ready for a model: `load_task`.

- "wordnet-supersense": WordNet noun glosses -> their lexicographer file (26 classes; ~79k
  training texts, 2,000 held out by a hash of the text), from Debian's `wordnet-base`; for a
  token model with a tokenizer (zoo "minilm").
- "fashion-mnist": the full 60k/10k Fashion-MNIST from Debian's `dataset-fashion-mnist`. A
  1-channel 28x28 model (zoo "fmnist-cnn") gets the images standardised; a 3-channel ImageNet
  model (zoo "efficientnet-lite0") gets them resized to `image_size`, repeated over 3 channels
  and normalised by ImageNet's mean and std, per batch.
- a path to a JSONL file (`lrdaccel.tasks.text.jsonl_task`): a user's own labelled texts.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from lrdaccel import data as datasets
from lrdaccel._settings import check_int
from lrdaccel.tasks.data import RaceData, TensorData, TokenData
from lrdaccel.tasks.text import TextSplits, check_task_file, jsonl_task, text_overlap, wordnet_supersense
from lrdaccel.zoo import IMAGENET_MEAN, IMAGENET_STD, ModelSpec

TEXT_TASKS: dict[str, Callable[[], TextSplits]] = {"wordnet-supersense": wordnet_supersense}
IMAGE_TASKS = ("fashion-mnist",)
TASKS = (*TEXT_TASKS, *IMAGE_TASKS)
MAX_LENGTH = 128  # tokens kept per text by default


def is_task_file(task: str) -> bool:
    """A path, not a task name: it ends in .jsonl, has a folder in it, or names something that
    exists (`data.json` in the current folder is a file, not an unknown task)."""
    return task.endswith(".jsonl") or os.sep in task or Path(task).exists()


def check_task(task: str) -> None:
    """A known task name or an existing JSONL file, checked before any work.

    Raises:
        ValueError: an unknown name; FileNotFoundError: a JSONL path that does not exist;
        IsADirectoryError: a directory.
    """
    if task in TASKS:
        return
    if is_task_file(task):
        check_task_file(Path(task))
        return
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}, or a path to a JSONL file "
                     f"(one {{\"text\": ..., \"label\": ...}} per line)")


def task_kind(task: str) -> str:
    """"text" or "image"."""
    check_task(task)
    return "image" if task in IMAGE_TASKS else "text"


def check_task_model(task: str, spec: ModelSpec) -> None:
    """The zoo model `spec` can take `task` (checked before the model or the data are loaded).

    Raises:
        ValueError: text for a model without tokens and a tokenizer, images for a token model, or
            a bad task (as check_task).
    """
    if task_kind(task) == "text":
        if spec.kind != "tokens" or spec.tokenizer is None:
            raise ValueError(f"task {task!r} is text: it needs a token model with a tokenizer (e.g. minilm), "
                             f"not {spec.name!r}")
    elif spec.kind != "image":
        raise ValueError(f"task {task!r} is images: it needs an image model, not {spec.name!r}")


def load_task(task: str, spec: ModelSpec, *, image_size: int = 64, max_length: int = MAX_LENGTH,
              train_limit: int | None = None, eval_limit: int | None = None) -> RaceData:
    """The task's data, ready for the model `spec` describes.

    For a text task, `overlap` on the result counts the evaluation texts (after the limits) that
    the model reads as a training text (the same token ids: case folded by an uncased tokenizer,
    cut at `max_length`), warned once where there are any; `conflicts` the texts dropped for
    having two labels (lrdaccel.tasks.text), and the inputs dropped for the same reason once
    tokenized (texts that differ only in case, or in what `max_length` cuts off), warned once.

    Args:
        task: a name of TASKS or a JSONL path.
        spec: the zoo model (its kind, input shape and tokenizer decide the preparation).
        image_size: side an image task is resized to for a 3-channel model.
        max_length: tokens kept per text.
        train_limit, eval_limit: use only the first items of each split (quick runs).

    Raises:
        ValueError: a task the model cannot take (text for an image model, a token model
            without a tokenizer), an unknown task, a bad limit, a split that dropping the
            conflicting inputs empties.
    """
    check_int("image_size", image_size, 8)
    check_int("max_length", max_length, 2)
    check_int("train_limit", train_limit, 1, optional=True)
    check_int("eval_limit", eval_limit, 1, optional=True)
    check_task_model(task, spec)
    if task_kind(task) == "text":
        splits = TEXT_TASKS[task]() if task in TEXT_TASKS else jsonl_task(task)
        texts = {"train": splits.train_texts[:train_limit], "eval": splits.eval_texts[:eval_limit]}
        labels = {"train": splits.train_labels[:train_limit], "eval": splits.eval_labels[:eval_limit]}
        data = TokenData.tokenize(spec.tokenizer(), texts, labels, splits.classes, max_length)
        # compared as the model reads them: an uncased tokenizer makes "Great" and "great" one input,
        # and texts that agree in their first max_length tokens are one input too
        read_alike = _drop_conflicting_inputs(data, task, max_length)
        overlap = text_overlap(*([tuple(ids) for ids in data.ids[split]] for split in ("train", "eval")))
        if overlap.count:
            warnings.warn(f"task {task}: {overlap} as the model reads them (tokenized, at most {max_length} "
                          f"tokens): accuracy on them measures memory, not generalisation", stacklevel=2)
        data.overlap, data.conflicts = overlap, splits.conflicts + read_alike
        return data
    return _fashion_mnist(spec, image_size, train_limit, eval_limit)


def _drop_conflicting_inputs(data: TokenData, task: str, max_length: int) -> int:
    """Drop the items whose token ids (the text as the model reads it) occur with two or more
    labels, as lrdaccel.tasks.text drops texts with two labels: "Good" labelled pos and "good"
    labelled neg are one input to an uncased tokenizer. Returns how many inputs (warned once).

    Raises:
        ValueError: a split left with no items.
    """
    labels: dict[tuple, set[int]] = {}
    for split in ("train", "eval"):
        for ids, label in zip(data.ids[split], data.targets[split].tolist()):
            labels.setdefault(tuple(ids), set()).add(label)
    conflicting = {ids for ids, found in labels.items() if len(found) > 1}
    if not conflicting:
        return 0
    dropped = 0
    for split in ("train", "eval"):
        keep = [i for i, ids in enumerate(data.ids[split]) if tuple(ids) not in conflicting]
        dropped += len(data.ids[split]) - len(keep)
        if not keep:
            raise ValueError(f"task {task}: no {split} texts once the {len(conflicting)} input(s) that the model reads "
                             f"alike with two labels are dropped")
        data.ids[split] = [data.ids[split][i] for i in keep]
        data.targets[split] = data.targets[split][keep]
    warnings.warn(f"task {task}: {len(conflicting)} input(s) occur with two or more labels as the model reads them "
                  f"(tokenized, at most {max_length} tokens: e.g. texts that differ only in case); dropped their "
                  f"{dropped} items", stacklevel=3)
    return len(conflicting)


def _fashion_mnist(spec: ModelSpec, image_size: int, train_limit: int | None, eval_limit: int | None) -> TensorData:
    train = datasets.load("fashion-mnist", "train", limit=train_limit)
    test = datasets.load("fashion-mnist", "test", limit=eval_limit)
    classes = list(datasets.FASHION_MNIST_CLASSES)
    channels = spec.input_shape[0]
    if channels == 1:
        images = train.tensors[0]
        mean, std = float(images.mean()), float(images.std())
        return TensorData(TensorDataset(datasets.normalize(images, mean, std), train.tensors[1]),
                          TensorDataset(datasets.normalize(test.tensors[0], mean, std), test.tensors[1]), classes)
    if channels != 3:
        raise ValueError(f"model {spec.name!r} takes {channels} channels; fashion-mnist is prepared for 1 or 3")
    return TensorData(train, test, classes, transform=ImageNetInput(image_size))


class ImageNetInput:
    """Grey [N, 1, h, w] images in [0, 1] -> [N, 3, size, size] as an ImageNet model expects:
    resized (bilinear, antialiased), repeated over RGB, normalised by ImageNet's mean and std."""

    def __init__(self, size: int):
        self.size = size
        self.mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        self.std = torch.tensor(IMAGENET_STD)[:, None, None]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        resized = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                antialias=True)
        return (resized.expand(-1, 3, -1, -1) - self.mean) / self.std
