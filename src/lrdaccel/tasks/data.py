"""What a race trains and evaluates on: labelled items fetched as model-ready batches.

`RaceData` hides whether items are images or texts: `batch(split, indices)` gives `(inputs,
labels)` ready for the classifier (a tensor, or a dict of tensors called as model(**inputs)).
Every variant of a race is handed the very same batch object, so the data order is one thing,
not one per variant.

- `TensorData`: (input, label) datasets, with an optional per-batch transform (resizing
  Fashion-MNIST for an ImageNet CNN, normalising); `finetune`'s kind of dataset.
- `TokenData`: texts tokenized once up front, padded per batch to its longest text (dynamic
  padding: a batch of short glosses carries no 128-token padding).

`split(name)` is one split as a dataset `lrd.finetune` takes (`len` and `fetch_batch(indices)`),
so the training loop fetches the same padded batches the race does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from lrdaccel.tasks.text import Overlap

SPLITS = ("train", "eval")


class RaceData:
    """Labelled items of two splits, fetched as batches; `classes` names the labels.

    Attributes:
        overlap: for a text task, the evaluation items the model reads as a training item (the
            same token ids; count and share; None where not measured, as for images).
        conflicts: texts dropped from a text task because they occur with two or more labels.
    """

    classes: list[str]
    overlap: Overlap | None = None
    conflicts: int = 0

    def size(self, split: str) -> int:
        raise NotImplementedError

    def batch(self, split: str, indices: Sequence[int]) -> tuple[Any, torch.Tensor]:
        raise NotImplementedError

    def eval_batches(self, batch_size: int) -> list[list[int]]:
        """Index lists covering the evaluation split once (each item once)."""
        order = list(range(self.size("eval")))
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    def labels(self, split: str) -> torch.Tensor:
        raise NotImplementedError

    def split(self, split: str) -> "SplitView":
        """One split as a dataset for `lrd.finetune`."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return SplitView(self, split)

    def shuffled_batches(self, batch_size: int, count: int, seed: int) -> list[list[int]]:
        """The first `count` batches of the training items in an order drawn from `seed` alone
        (a fresh permutation per pass): what a run calibrates on before it trains."""
        generator = torch.Generator().manual_seed(seed)
        size, batches = self.size("train"), []
        while len(batches) < count:
            order = torch.randperm(size, generator=generator).tolist()
            batches += [order[i:i + batch_size] for i in range(0, size, batch_size)]
        return batches[:count]


@dataclass(frozen=True)
class SplitView:
    """A split of `data` as `lrd.finetune` reads a dataset: its size, and `fetch_batch(indices)`
    giving (inputs, labels) ready for the model (texts padded per batch)."""

    data: RaceData
    name: str

    def __len__(self) -> int:
        return self.data.size(self.name)

    def fetch_batch(self, indices: Sequence[int]) -> tuple[Any, torch.Tensor]:
        return self.data.batch(self.name, indices)


@dataclass
class TensorData(RaceData):
    """(input, label) datasets; `transform` maps a batch of inputs to what the model takes."""

    train: Dataset
    eval: Dataset
    classes: list[str]
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def _split(self, split: str) -> Dataset:
        return self.train if split == "train" else self.eval

    def size(self, split: str) -> int:
        return len(self._split(split))

    def batch(self, split: str, indices: Sequence[int]) -> tuple[Any, torch.Tensor]:
        dataset = self._split(split)
        if isinstance(dataset, TensorDataset):
            inputs, labels = dataset[torch.as_tensor(list(indices), dtype=torch.long)][:2]
        else:
            inputs, labels = default_collate([dataset[i] for i in indices])[:2]
        labels = torch.as_tensor(labels, dtype=torch.long)
        return (self.transform(inputs) if self.transform is not None else inputs), labels

    def labels(self, split: str) -> torch.Tensor:
        dataset = self._split(split)
        if isinstance(dataset, TensorDataset):
            return dataset.tensors[1].long()
        return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


@dataclass
class TokenData(RaceData):
    """Texts tokenized once; batches padded to their longest text.

    Attributes:
        ids: per split, each text's token ids (special tokens included, truncated to max_length).
        targets: per split, label indices.
        pad_id: the tokenizer's padding id.
        overlap, conflicts: as RaceData's.
    """

    ids: dict[str, list[list[int]]]
    targets: dict[str, torch.Tensor]
    classes: list[str]
    pad_id: int = 0
    overlap: Overlap | None = None
    conflicts: int = 0

    @classmethod
    def tokenize(cls, tokenizer: Any, texts: dict[str, list[str]], labels: dict[str, list[int]],
                 classes: list[str], max_length: int = 128) -> "TokenData":
        ids = {split: tokenizer(texts[split], truncation=True, max_length=max_length)["input_ids"] for split in SPLITS}
        targets = {split: torch.as_tensor(labels[split], dtype=torch.long) for split in SPLITS}
        return cls(ids, targets, list(classes), tokenizer.pad_token_id or 0)

    def size(self, split: str) -> int:
        return len(self.ids[split])

    def batch(self, split: str, indices: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        rows = [self.ids[split][i] for i in indices]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, :len(row)] = torch.as_tensor(row)
            mask[i, :len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}, self.targets[split][list(indices)]

    def eval_batches(self, batch_size: int) -> list[list[int]]:
        """By length, so that evaluation pads little (evaluation is not timed, but it is waited for)."""
        order = sorted(range(self.size("eval")), key=lambda i: len(self.ids["eval"][i]))
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    def labels(self, split: str) -> torch.Tensor:
        return self.targets[split]
