"""Calibration: what a model's layers see on real, unlabeled data.

- `statistics`: streamed input moments of each layer (for whitening and sequential calibration);
- `batches`: checking calibration batches and calling a model on one;
- `passes`: running a model only as far as the layers of interest, in their call order;
- `batchnorm`: BatchNorm running statistics re-estimated exactly (`lrd.recalibrate_batchnorm`);
- `corpora`: real English text that ships offline (WordNet, fortunes), split for good.
"""

from lrdaccel.calibration.batchnorm import BatchNormReport, recalibrate_batchnorm
from lrdaccel.calibration.statistics import InputStats, PairedStats, collect_input_stats

__all__ = ["BatchNormReport", "InputStats", "PairedStats", "collect_input_stats", "recalibrate_batchnorm"]
