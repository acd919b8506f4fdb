"""Training a decomposed model: sequential freezing (`freezer`), the fine-tuning loop (`loop`)
with its settings (`config`), record (`history`), checkpoints (`checkpoint`) and data-parallel
plumbing (`distributed`), evaluation (`evaluate`), unlabeled distillation on the same loop
(`distill`), and the Hugging Face Trainer callback (`hf`)."""

from lrdaccel.training.config import DistillConfig, FinetuneConfig
from lrdaccel.training.distill import distill
from lrdaccel.training.freezer import SCHEDULES, SequentialFreezer
from lrdaccel.training.history import EpochRecord, History
from lrdaccel.training.loop import finetune
from lrdaccel.training.phase_report import PhaseReport

__all__ = ["SCHEDULES", "DistillConfig", "EpochRecord", "FinetuneConfig", "History", "PhaseReport", "SequentialFreezer",
           "distill", "finetune"]
