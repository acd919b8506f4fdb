"""What a fine-tuning run did, epoch by epoch: data first (tests assert on it), a printer on top."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class EpochRecord:
    epoch: int  # 0-based
    train_loss: float  # mean over the epoch's samples (all processes)
    test_loss: float | None
    test_accuracy: float | None
    train_seconds: float
    eval_seconds: float
    trainable_share: float  # mean over the epoch's steps of the trainable share of all parameters
    phases: list[int] = field(default_factory=list)
    # distill: agreement with the teacher on the evaluation batches (top-1 for logits, mean cosine
    # of the mask-averaged embeddings for token states)
    test_agreement: float | None = None


@dataclass
class History:
    epochs: list[EpochRecord] = field(default_factory=list)
    completed: bool = False  # False when max_steps stopped the run early
    global_step: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        agreement = any(r.test_agreement is not None for r in self.epochs)
        lines = [f"{'epoch':>5} {'train loss':>10} {'test agr' if agreement else 'test acc':>8} {'train s':>8} "
                 f"{'share':>6}  phases"]
        for r in self.epochs:
            score = r.test_agreement if agreement else r.test_accuracy
            acc = f"{100 * score:7.2f}%" if score is not None else f"{'-':>8}"
            lines.append(f"{r.epoch + 1:>5} {r.train_loss:>10.4f} {acc} {r.train_seconds:>8.1f} "
                         f"{100 * r.trainable_share:>5.1f}%  {r.phases}")
        if not self.completed:
            lines.append(f"stopped at step {self.global_step} (max_steps)")
        return "\n".join(lines)
