"""The decomposition stage: `lrd.decompose` applies a Plan to a model, atomically.

- `apply`: the verb, `decompose(model, plan)`;
- `config`, `report`: DecomposeConfig and what the verb reports;
- `build`: the new modules of a plan, built from the original layers, and the all-or-nothing swap;
- `sequential`: layers calibrated one after another on the partly decomposed model's inputs;
- `merge_statistics`, `merge_build`, `merged_blocks`: bottlenecks merged into three narrower
  convs (arXiv 2407.20266), and read back from a model.

Named `decomposition`, not `decompose`, so that `lrdaccel.decompose` stays the function.
"""

from lrdaccel.decomposition.apply import decompose
from lrdaccel.decomposition.build import build_modules, swap_modules
from lrdaccel.decomposition.config import METHODS, DecomposeConfig
from lrdaccel.decomposition.report import DecomposeReport, LayerReport

__all__ = ["METHODS", "DecomposeConfig", "DecomposeReport", "LayerReport", "build_modules", "decompose",
           "swap_modules"]
