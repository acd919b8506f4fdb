"""Deprecated: moved to `lrdaccel.training` (and `lrdaccel.finetune`, `lrdaccel.FinetuneConfig`)."""

import warnings

from lrdaccel.training.checkpoint import CHECKPOINT_NAME  # noqa: F401
from lrdaccel.training.config import FinetuneConfig  # noqa: F401
from lrdaccel.training.distributed import init_distributed  # noqa: F401
from lrdaccel.training.history import EpochRecord, History  # noqa: F401
from lrdaccel.training.loop import finetune  # noqa: F401

warnings.warn("lrdaccel.train is deprecated and will be removed in lrdaccel 0.3; use lrdaccel.finetune or "
              "lrdaccel.training", DeprecationWarning, stacklevel=2)
