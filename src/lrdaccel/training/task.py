"""What a training run fits and how it is scored (`Task`), and the labelled-data task `finetune` uses.

`lrdaccel.training.loop.Run` drives any Task: the optimizer, freezing, schedule, DDP,
checkpoints and resume are the loop's; fetching a step's batch, its loss and the evaluation are
the task's. `lrd.distill` has its own task (lrdaccel.training.distill).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from lrdaccel._modules import call_model, move_inputs, output_tensor
from lrdaccel.training.config import FinetuneConfig


class Task:
    """What a run trains on and how it is scored; `lrdaccel.training.loop.Run` does the rest (optimizer, freezing,
    schedule, DDP, checkpoints, resume).

    Attributes:
        verb: "finetune" or "distill": names the checkpoint format and the messages.
        score: the EpochRecord field the evaluation score goes to ("test_accuracy" or
            "test_agreement").
        teacher: a model the loss compares with (moved to the run's device, kept in eval mode).
        size: items in an epoch (samples, or whole batches); sharded over processes.
        items_per_step: items per optimizer step.
    """

    verb: str = ""
    score: str = "test_accuracy"
    teacher: nn.Module | None = None
    size: int = 0
    items_per_step: int = 1

    def fetch(self, indices: list[int], device: torch.device) -> Any:
        """The step's batch for these item indices, on `device`."""
        raise NotImplementedError

    def loss(self, net: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """(the loss to minimise, how many samples it averages)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, device: torch.device, rank: int, world: int) -> tuple[float, float, int]:
        """(loss sum, score sum, samples) over this process's share of the evaluation data, the
        model in eval mode (called only where `has_evaluation`)."""
        raise NotImplementedError

    @property
    def has_evaluation(self) -> bool:
        return False

    def train_mode(self, model: nn.Module) -> None:
        """Put the model in the mode it trains in."""
        model.train()

    def describe(self) -> dict:
        """What else must match for a checkpoint to resume this run."""
        return {"teacher": self.teacher is not None}


class LabelledTask(Task):
    """Labelled (input, label) pairs: cross-entropy, plus distillation where a teacher is given.
    An input batch is a tensor, or a dict of tensors the model takes as keywords (texts)."""

    verb = "finetune"

    def __init__(self, train_data: Dataset, eval_data: Dataset | None, teacher: nn.Module | None,
                 transform: Callable | None, config: FinetuneConfig):
        self.train_data, self.eval_data, self.teacher = train_data, eval_data, teacher
        self.transform, self.config = transform, config
        self.size, self.items_per_step = len(train_data), config.batch_size

    def fetch(self, indices: list[int], device: torch.device) -> tuple[Any, torch.Tensor]:
        inputs, labels = fetch_items(self.train_data, indices)[:2]
        inputs, labels = move_inputs(inputs, device), labels.to(device)
        return (self.transform(inputs) if self.transform is not None else inputs), labels

    def loss(self, net: nn.Module, batch) -> tuple[torch.Tensor, int]:
        inputs, labels = batch
        logits = output_tensor(call_model(net, inputs)).float()
        loss = F.cross_entropy(logits, labels)
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = output_tensor(call_model(self.teacher, inputs)).float()
            loss = self.config.alpha * distillation_loss(logits, teacher_logits, self.config.temperature) \
                + (1 - self.config.alpha) * loss
        return loss, len(labels)

    @property
    def has_evaluation(self) -> bool:
        return self.eval_data is not None and len(self.eval_data) > 0

    def evaluate(self, model: nn.Module, device: torch.device, rank: int, world: int) -> tuple[float, float, int]:
        indices = list(range(rank, len(self.eval_data), world))
        loss_sum, correct = 0.0, 0
        size = self.config.eval_batch_size
        for i in range(0, len(indices), size):
            inputs, labels = fetch_items(self.eval_data, indices[i:i + size])[:2]
            inputs, labels = move_inputs(inputs, device), labels.to(device)
            if self.transform is not None:
                inputs = self.transform(inputs)
            with torch.autocast(device.type, dtype=amp_dtype(self.config), enabled=self.config.amp):
                logits = output_tensor(call_model(model, inputs)).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
        return loss_sum, correct, len(indices)


def amp_dtype(config) -> torch.dtype:
    """The autocast dtype of a run's config (FinetuneConfig or DistillConfig): bfloat16 unless it
    asks for float16 (anything without `amp_dtype`, such as a device, gets bfloat16). bfloat16 has
    float32's exponent range, so its gradients need no scaling."""
    return getattr(torch, getattr(config, "amp_dtype", "bfloat16"))


def needs_grad_scaler(config) -> bool:
    """float16 autocast underflows small gradients without loss scaling; bfloat16 does not."""
    return bool(config.amp) and amp_dtype(config) == torch.float16


def fetch_items(dataset: Dataset, indices: list[int]):
    """A batch: the dataset's own `fetch_batch(indices)` where it has one (lrdaccel.tasks' splits,
    whose texts are padded per batch), one indexing call on a TensorDataset, else the default
    collate of the items. Not a method named `batch`: a Hugging Face dataset has one, which groups
    the whole dataset into batches of a size."""
    fetch = getattr(dataset, "fetch_batch", None)
    if callable(fetch):
        return fetch(indices)
    if isinstance(dataset, TensorDataset):
        # The indices live with the data (a TensorDataset may be on the GPU already).
        return dataset[torch.as_tensor(indices, dtype=torch.long, device=dataset.tensors[0].device)]
    return default_collate([dataset[i] for i in indices])


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened logits, scaled by T^2 (Hinton et al.)."""
    return F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                    log_target=True, reduction="batchmean") * temperature ** 2
