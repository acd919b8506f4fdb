"""Time to accuracy: fine-tune a model and its lrdaccel variants (and the peers) on a real task,
side by side, and measure who reaches the original's accuracy first, and how fast each serves.

- `api`: `lrd.race(...)`; `setup`: a race on a zoo model and a named task; `config`: RaceConfig;
- `runner`: one seed, every variant in lockstep on the same batches, each with its own random
  stream (`streams`);
- `variants`, `contestants`, `lrd_variant`, `peer_variants`: what each contestant does before training;
- `scoring`, `verdict`: the target, the reference, time to it, standard errors and verdicts;
- `results`, `pooling`, `report`: results.json (and pooling runs), report.md, race.png;
- `saving`: `race --save`, every trained variant kept and loaded back.

The tasks themselves (real labelled data offline, a model made into a classifier) are in
lrdaccel.tasks. Named `racing`, not `race`, so that `lrdaccel.race` is always the function.
"""

from lrdaccel.racing.api import race
from lrdaccel.racing.config import RaceConfig
from lrdaccel.racing.saving import load_variant
from lrdaccel.racing.variants import parse_variants

__all__ = ["RaceConfig", "load_variant", "parse_variants", "race"]
