"""What decides a training run's result: `FinetuneConfig` and `DistillConfig`, stored in each
checkpoint. The fields they share mean the same and are checked by the same code."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lrdaccel._settings import check_choice, check_int, check_number
from lrdaccel.training.freezer import SCHEDULES

OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "constant")
# Distillation losses: "kl" on temperature-softened logits; for token states (an encoder's
# last_hidden_state) "cosine" between mask-averaged embeddings, "mse" between real tokens' states
# relative to the teacher's energy, or their sum; "auto" picks "kl" for logits [batch, classes]
# and "cosine+mse" for token states [batch, tokens, width].
DISTILL_LOSSES = ("auto", "kl", "cosine", "mse", "cosine+mse")
AMP_DTYPES = ("bfloat16", "float16")
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
        amp: autocast the forward and loss (in `amp_dtype`).
        amp_dtype: "bfloat16" (default, CPU and CUDA: float32's range, so no loss scaling) or
            "float16" (GPUs without bf16; a gradient scaler then skips steps that overflow).
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
    amp_dtype: str = "bfloat16"
    checkpoint_dir: str | None = None
    checkpoint_every_steps: int | None = None
    resume: bool = False
    max_steps: int | None = None
    seed: int = 0

    def __post_init__(self):
        _check_shared(self)
        for name in ("batch_size", "eval_batch_size"):
            check_int(name, getattr(self, name), 1)
        check_number("alpha", self.alpha, at_least=0, at_most=1)


@dataclass
class DistillConfig:
    """Everything that decides a distillation run's result (stored in each checkpoint).

    Attributes:
        epochs: passes over the unlabeled batches.
        lr: peak learning rate.
        optimizer: "adamw" or "sgd" (with `momentum`).
        momentum: SGD momentum.
        weight_decay: L2 (SGD) or decoupled (AdamW) weight decay.
        lr_schedule: "cosine" (to zero over the run, per step) or "constant".
        warmup_steps: linear learning-rate warm-up over the first steps (0: none).
        loss: "kl" (logits, temperature-softened), "cosine" (between mask-averaged
            embeddings), "mse" (real tokens' states, relative), "cosine+mse", or "auto": "kl"
            for logits [batch, classes], "cosine+mse" for token states [batch, tokens, width].
        temperature: softening temperature of "kl".
        match_layers: a full regex on module names (e.g. "encoder\\.layer\\.\\d+", every
            transformer block): their outputs are matched to the teacher's too (relative squared
            error, real tokens only), added to the loss: a signal for every block, not just the last.
        schedule: freezing schedule ("rotate", "freeze_one", "static") or None for no freezing.
        every_epochs: epochs per freezing phase.
        every_steps: optimizer steps per freezing phase (overrides every_epochs).
        freeze_undecomposed: keep every layer outside the decomposed ones frozen.
        eval_mode: train the model in eval mode (dropout off, BatchNorm on its running statistics),
            as the teacher runs and as the model will serve: the target is the teacher's exact
            output, and dropout noise only slows a short run. False: ordinary training mode.
        train_embeddings: also train nn.Embedding tables (default: frozen; few of their rows are
            seen in a short run, and their dense optimizer update would dominate a CPU step).
        amp: autocast the forward and loss (in `amp_dtype`).
        amp_dtype: "bfloat16" (default, CPU and CUDA: float32's range, so no loss scaling) or
            "float16" (GPUs without bf16; a gradient scaler then skips steps that overflow).
        checkpoint_dir: where `checkpoint.pt` is written (None: no checkpoints).
        checkpoint_every_steps: also checkpoint every N steps (default: end of each epoch only).
        resume: continue from `checkpoint_dir/checkpoint.pt`.
        max_steps: stop after this many optimizer steps in all (a checkpoint is written there).
        seed: seeds the RNGs and the batch order.
    """

    epochs: int = 1
    lr: float = 1e-4
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    loss: str = "auto"
    temperature: float = 2.0
    match_layers: str | None = None
    schedule: str | None = None
    every_epochs: int = 1
    every_steps: int | None = None
    freeze_undecomposed: bool = False
    eval_mode: bool = True
    train_embeddings: bool = False
    amp: bool = False
    amp_dtype: str = "bfloat16"
    checkpoint_dir: str | None = None
    checkpoint_every_steps: int | None = None
    resume: bool = False
    max_steps: int | None = None
    seed: int = 0

    def __post_init__(self):
        _check_shared(self)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_choice("loss", self.loss, DISTILL_LOSSES)
        if self.match_layers is not None:
            try:
                re.compile(self.match_layers)
            except (re.error, TypeError) as error:
                raise ValueError(f"match_layers must be a regex on module names, got {self.match_layers!r} "
                                 f"({error})") from None


def _check_shared(config) -> None:
    """The checks of the fields FinetuneConfig and DistillConfig share."""
    check_int("epochs", config.epochs, 1)
    check_int("every_epochs", config.every_epochs, 1)
    for name in ("every_steps", "checkpoint_every_steps", "max_steps"):
        check_int(name, getattr(config, name), 1, optional=True)
    check_int("seed", config.seed, 0)
    check_number("lr", config.lr, above=0)
    check_choice("optimizer", config.optimizer, OPTIMIZERS)
    check_choice("lr_schedule", config.lr_schedule, LR_SCHEDULES)
    check_choice("amp_dtype", config.amp_dtype, AMP_DTYPES)
    if config.schedule is not None and config.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES} or None, got {config.schedule!r}")
    check_number("temperature", config.temperature, above=0)
    check_number("momentum", config.momentum, at_least=0)
    check_number("weight_decay", config.weight_decay, at_least=0)
    if (config.resume or config.checkpoint_every_steps) and not config.checkpoint_dir:
        raise ValueError("resume and checkpoint_every_steps need checkpoint_dir")
