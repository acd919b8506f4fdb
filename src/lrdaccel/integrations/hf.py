"""Deprecated: moved to `lrdaccel.training.hf`."""

import warnings

from lrdaccel.training.hf import SequentialFreezingCallback  # noqa: F401

warnings.warn("lrdaccel.integrations.hf is deprecated and will be removed in lrdaccel 0.3; use "
              "lrdaccel.training.hf", DeprecationWarning, stacklevel=2)
