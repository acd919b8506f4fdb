"""What decides a fine-tuning run's result: `FinetuneConfig`, stored in each checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from lrdaccel._settings import check_choice, check_int, check_number
from lrdaccel.training.freezer import SCHEDULES

OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "constant")
# Settings that may change between a run and its resumption without changing the result.
RESUME_FREE = ("checkpoint_dir", "checkpoint_every_steps", "resume", "max_steps", "eval_batch_size")


@dataclass
class FinetuneConfig:
    """Everything that decides a fine-tuning run's result (stored in each checkpoint).

    Attributes:
        epochs: passes over the training data.
        lr: peak learning rate.
        optimizer: "sgd" (with `momentum`) or "adamw".
        momentum: SGD momentum.
        weight_decay: L2 (SGD) or decoupled (AdamW) weight decay.
        lr_schedule: "cosine" (to zero over the run, per step) or "constant".
        schedule: freezing schedule ("rotate", "freeze_one", "static") or None for no freezing.
        every_epochs: epochs per freezing phase.
        every_steps: optimizer steps per freezing phase (overrides every_epochs).
        freeze_undecomposed: keep every layer outside the decomposed ones frozen.
        batch_size: per process.
        eval_batch_size: per process, for evaluation.
        alpha: weight of the distillation loss when a teacher is given (1 - alpha on the task loss).
        temperature: softening temperature of the distillation KL.
        amp: autocast (bfloat16 on CPU; float16 with a grad scaler on CUDA).
        checkpoint_dir: where `checkpoint.pt` is written (None: no checkpoints).
        checkpoint_every_steps: also checkpoint every N steps (default: end of each epoch only).
        resume: continue from `checkpoint_dir/checkpoint.pt`.
        max_steps: stop after this many optimizer steps in all (a checkpoint is written there).
        seed: seeds the RNGs and the data order.
    """

    epochs: int = 1
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    schedule: str | None = "rotate"
    every_epochs: int = 1
    every_steps: int | None = None
    freeze_undecomposed: bool = False
    batch_size: int = 64
    eval_batch_size: int = 256
    alpha: float = 0.5
    temperature: float = 4.0
    amp: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every_steps: int | None = None
    resume: bool = False
    max_steps: int | None = None
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "every_epochs", "batch_size", "eval_batch_size"):
            check_int(name, getattr(self, name), 1)
        for name in ("every_steps", "checkpoint_every_steps", "max_steps"):
            check_int(name, getattr(self, name), 1, optional=True)
        check_int("seed", self.seed, 0)
        check_number("lr", self.lr, above=0)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES} or None, got {self.schedule!r}")
        check_number("alpha", self.alpha, at_least=0, at_most=1)
        check_number("temperature", self.temperature, above=0)
        check_number("momentum", self.momentum, at_least=0)
        check_number("weight_decay", self.weight_decay, at_least=0)
        if (self.resume or self.checkpoint_every_steps) and not self.checkpoint_dir:
            raise ValueError("resume and checkpoint_every_steps need checkpoint_dir")
