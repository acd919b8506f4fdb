"""RaceConfig: what every variant of a race shares (data, budget, optimizer, evaluation)."""

from __future__ import annotations

from dataclasses import dataclass

from lrdaccel._settings import check_choice, check_int, check_number, parse_device

LR_SCHEDULES = ("linear", "constant", "cosine")
MAX_STEPS = 10_000_000  # the batches' index lists alone would not fit in memory long before this


@dataclass
class RaceConfig:
    """Settings every variant shares, so that only what the variants do differs.

    Attributes:
        budget_epochs: passes over the training data (> 0; a fraction is allowed): every variant
            trains the same steps on the same batches in the same order. At most MAX_STEPS steps
            (checked here where the epochs alone exceed it, and in `steps` once the data is known).
        max_steps: stop earlier, after this many steps (quick runs).
        batch_size: training batch.
        eval_batch_size: evaluation batch.
        lr: AdamW's peak learning rate (a variant's `lr` option multiplies it).
        weight_decay: AdamW's decoupled weight decay.
        lr_schedule: "linear" (warm-up, then linearly to zero at the end of the budget, as BERT
            fine-tuning does), "cosine" (warm-up, then cosine to zero) or "constant" (after warm-up).
        warmup: fraction of the steps with a linear warm-up.
        evaluations: evaluations spread evenly over the run, plus one before the first step.
        freeze_embeddings: keep every nn.Embedding frozen in every variant (the word-embedding
            table is half of MiniLM's parameters and a fifth of its step time, and no variant
            compresses it): the same treatment for all.
        compile: train every variant through torch.compile (its compile time counts).
        amp: bf16 autocast for every variant's training and evaluation.
        device: where the race runs ("cpu", "cuda").
        calibration_batches: training batches (inputs only) builders may read: whitening,
            sensitivity, pruning importance.
        infer_batch_size: the batch the served models are timed on.
        infer_repeats: interleaved repeats of that timing.
        margin: the target is the original's final accuracy minus this many points.
        seed: the first seed; seeds: how many (seed, seed + 1, ...), each a full race.
    """

    budget_epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = 5e-5
    weight_decay: float = 0.01
    lr_schedule: str = "linear"
    warmup: float = 0.06
    evaluations: int = 20
    freeze_embeddings: bool = True
    compile: bool = False
    amp: bool = False
    device: str = "cpu"
    calibration_batches: int = 16
    infer_batch_size: int = 64
    infer_repeats: int = 5
    margin: float = 0.5
    seed: int = 0
    seeds: int = 1

    def __post_init__(self) -> None:
        check_number("budget_epochs", self.budget_epochs, above=0)
        if self.max_steps is None and self.budget_epochs > MAX_STEPS:
            raise ValueError(f"budget_epochs {self.budget_epochs!r} is over {MAX_STEPS:,} steps however small the "
                             f"data: give fewer epochs, or max_steps")
        check_int("max_steps", self.max_steps, 1, optional=True)
        for name in ("batch_size", "eval_batch_size", "evaluations", "calibration_batches", "infer_batch_size",
                     "infer_repeats", "seeds"):
            check_int(name, getattr(self, name), 1)
        check_int("seed", self.seed, 0)
        check_number("lr", self.lr, above=0)
        check_number("weight_decay", self.weight_decay, at_least=0)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_number("warmup", self.warmup, at_least=0, at_most=0.5)
        check_number("margin", self.margin, at_least=0)
        for name in ("freeze_embeddings", "compile", "amp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        parse_device(self.device)

    def steps(self, train_size: int) -> int:
        """Training steps of the budget for `train_size` items (at least one).

        Raises:
            ValueError: more than MAX_STEPS steps.
        """
        per_epoch = -(-train_size // self.batch_size)
        planned = self.budget_epochs * per_epoch  # a float: 1e308 epochs give inf, not an OverflowError
        if self.max_steps is not None and planned > self.max_steps:
            return self.max_steps
        if planned > MAX_STEPS:
            raise ValueError(f"budget_epochs {self.budget_epochs!r} is {planned:.3g} steps of batch {self.batch_size} "
                             f"on {train_size:,} items, over {MAX_STEPS:,}: give fewer epochs, or max_steps")
        return max(1, round(planned))
