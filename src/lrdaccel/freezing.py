"""Deprecated: moved to `lrdaccel.training.freezer` (and `lrdaccel.SequentialFreezer`)."""

import warnings

from lrdaccel._modules import clean_name  # noqa: F401
from lrdaccel.training.freezer import SCHEDULES, STATIC_FACTOR, SequentialFreezer  # noqa: F401
from lrdaccel.training.phase_report import PhaseReport  # noqa: F401

warnings.warn("lrdaccel.freezing is deprecated and will be removed in lrdaccel 0.3; use lrdaccel.SequentialFreezer "
              "or lrdaccel.training.freezer", DeprecationWarning, stacklevel=2)
