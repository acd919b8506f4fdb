"""Time to accuracy: fine-tune a model and its lrdaccel variants (and the peers) on a real task,
side by side, and measure who reaches the original's accuracy first, and how fast each serves.

- `api`: `lrd.race(...)`; `setup`: a race on a zoo model and a named task; `config`: RaceConfig;
- `runner`: one seed, every variant in lockstep on the same batches;
- `variants`, `contestants`, `lrd_variant`: what each contestant does before training;
- `scoring`, `results`, `report`: the target, time to it, results.json, report.md, race.png.

The tasks themselves (real labelled data offline, a model made into a classifier) are in
lrdaccel.tasks. Named `racing`, not `race`, so that `lrdaccel.race` is always the function.
"""

from lrdaccel.racing.api import race
from lrdaccel.racing.config import RaceConfig
from lrdaccel.racing.variants import parse_variants

__all__ = ["RaceConfig", "parse_variants", "race"]
